"""The chaos test: a workload on the 3-host harness while a seeded schedule kills components and
cuts links, then invariants checked once the cluster settles. See test_chaos.py."""
