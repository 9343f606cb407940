"""Finding another berth service: a flag, else the endpoints every instance registers in etcd.

Every server registers `endpoints/<service>/<instance>` (berthd.common.state.endpoints) bound
to its lease (common/server.py), so a live instance is always listed and a dead one vanishes.
"""

from __future__ import annotations

import time

from berthd.common.errors import Unavailable
from berthd.common.state.endpoints import instances
from berthd.common.store import Store

# How long an instance that could not be reached is passed over, when another is registered:
# a dead instance stays listed until its lease expires (a few seconds).
AVOID_SECONDS = 10.0


class ServiceAddress:
    """An async getter for `service`'s address: `flag` when given, else a registered instance
    (looked up on every call, so a restarted service on a new port is found), passing over one
    the caller could not reach lately (`unreachable`) while another is registered: a retry goes
    to a live instance instead of the dead one whose registration has not expired yet."""

    def __init__(self, store: Store, service: str, flag: str = "") -> None:
        self.store = store
        self.service = service
        self.flag = flag
        self._avoid: dict[str, float] = {}  # address -> until when (monotonic)

    async def __call__(self) -> str:
        if self.flag:
            return self.flag
        found = await instances(self.store, self.service)
        if not found:
            raise Unavailable(
                f"no {self.service} service is registered in etcd; start one or pass "
                f"--{self.service}"
            )
        now = time.monotonic()
        self._avoid = {a: until for a, until in self._avoid.items() if until > now}
        reachable = [i for i in found if i.address not in self._avoid]
        return (reachable or found)[0].address

    def unreachable(self, address: str) -> None:
        """The caller's connection to `address` failed: try the others first for a while."""
        self._avoid[address] = time.monotonic() + AVOID_SECONDS


def service_address(store: Store, service: str, flag: str = "") -> ServiceAddress:
    """`service`'s address getter (ServiceAddress)."""
    return ServiceAddress(store, service, flag)
