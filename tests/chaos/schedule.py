"""A seeded fault schedule: the same seed and length always give the same faults, so a failing
run replays with `CHAOS_SEED=<n> make chaos`.

A fault either SIGKILLs a component (restarted when the fault ends) or cuts a host's link
(restored when it ends). Faults come one after another, never overlapping: each one's recovery
(a restart that must reach etcd, say) then happens on an otherwise whole cluster, so a component
that does not come back is a finding, not a knock-on effect of a second fault.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

KILL = "kill"
CUT = "cut"

# What the harness runs, by the names tests/chaos/cluster.py gives them.
COMPONENTS = (
    "etcd",
    "registry",
    "image",
    "cluster-1",
    "cluster-2",
    "node-host1",
    "node-host2",
    "node-host3",
)
HOSTS = ("host1", "host2", "host3")

# Most faults are short; some cuts outlast the node agents' fencing delay (30 s), so a
# partitioned host stops its replicas while the others replace them.
SHORT = (1.0, 8.0)
LONG_CUT = (32.0, 45.0)
LONG_CUT_CHANCE = 0.15
GAP = (1.0, 5.0)  # healthy time between two faults


@dataclass(frozen=True)
class Fault:
    at: float  # seconds from the schedule's start
    action: str  # KILL or CUT
    target: str  # a component (KILL) or a host (CUT)
    duration: float  # how long it stays dead or cut off

    @property
    def end(self) -> float:
        return self.at + self.duration

    def __str__(self) -> str:
        return f"{self.at:7.1f}s {self.action} {self.target} for {self.duration:.1f}s"


def generate(
    seed: int,
    length: float,
    components: tuple[str, ...] = COMPONENTS,
    hosts: tuple[str, ...] = HOSTS,
) -> list[Fault]:
    """Faults that all start within `length` seconds, in order, none overlapping another."""
    rng = random.Random(seed)
    targets = [(KILL, c) for c in components] + [(CUT, h) for h in hosts]
    faults: list[Fault] = []
    at = round(rng.uniform(*GAP), 1)
    while at < length:
        action, target = rng.choice(targets)
        long = action == CUT and rng.random() < LONG_CUT_CHANCE
        duration = round(rng.uniform(*(LONG_CUT if long else SHORT)), 1)
        faults.append(Fault(at, action, target, duration))
        at = round(at + duration + rng.uniform(*GAP), 1)
    return faults
