"""A seeded fault schedule: the same seed and length always give the same faults, so a failing
run replays with `CHAOS_SEED=<n> make chaos`.

A fault either SIGKILLs a component (restarted when the fault ends) or cuts a host's link
(restored when it ends). Faults come in groups, one group after another: most groups are one
fault, some are two that overlap (a link cut while a service is down, two services down at
once), since real faults do not wait for each other. Two faults overlap only when each one's
recovery still works while the other lasts: a restarted component must reach etcd, so etcd is
never down together with another killed component, and a host's agent is never restarted while
that host is cut off. A component that does not come back is then a finding, not a knock-on
effect of the other fault.
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
    "builder",
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
GAP = (1.0, 5.0)  # healthy time between two groups of faults
OVERLAP_CHANCE = 0.3  # a group has a second fault that begins while the first lasts


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


def can_overlap(a: tuple[str, str], b: tuple[str, str]) -> bool:
    """Whether faults (action, target) a and b may last at the same time: each one's recovery
    must not need what the other took away."""
    if a[1] == b[1]:
        return False
    if (KILL, "etcd") in (a, b):
        return a[0] == CUT or b[0] == CUT  # any other restart needs etcd
    kills = {t for action, t in (a, b) if action == KILL}
    cuts = {t for action, t in (a, b) if action == CUT}
    return not any(f"node-{host}" in kills for host in cuts)


def generate(
    seed: int,
    length: float,
    components: tuple[str, ...] = COMPONENTS,
    hosts: tuple[str, ...] = HOSTS,
) -> list[Fault]:
    """Groups of faults that all begin within `length` seconds, in order of their start; a
    group's second fault begins while its first lasts, and the next group after both ended."""
    rng = random.Random(seed)
    targets = [(KILL, c) for c in components] + [(CUT, h) for h in hosts]

    def draw(at: float, choices: list[tuple[str, str]]) -> Fault:
        action, target = rng.choice(choices)
        long = action == CUT and rng.random() < LONG_CUT_CHANCE
        duration = round(rng.uniform(*(LONG_CUT if long else SHORT)), 1)
        return Fault(at, action, target, duration)

    faults: list[Fault] = []
    at = round(rng.uniform(*GAP), 1)
    while at < length:
        first = draw(at, targets)
        group = [first]
        if rng.random() < OVERLAP_CHANCE:
            begins = round(first.at + rng.uniform(0.2, first.duration - 0.2), 1)
            choices = [t for t in targets if can_overlap((first.action, first.target), t)]
            group.append(draw(begins, choices))
        faults += group
        at = round(max(f.end for f in group) + rng.uniform(*GAP), 1)
    return faults
