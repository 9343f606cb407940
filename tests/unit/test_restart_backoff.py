"""The node's restart backoff (docs/node.md): doubling from 100 ms, capped at 5 s."""

from __future__ import annotations

from berthd.node.containers import restart_delay


def test_restart_delay_doubles_from_100_ms_up_to_5_s() -> None:
    delays = [restart_delay(n) for n in range(10)]
    assert delays[:7] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0]
    assert delays[7:] == [5.0, 5.0, 5.0]
    assert restart_delay(10**6) == 5.0  # a container that crashed all year
