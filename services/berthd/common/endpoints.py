"""Finding another berth service: a flag, else the endpoints every instance registers in etcd.

Every server registers `endpoints/<service>/<instance>` (berthd.common.state.endpoints) bound
to its lease (common/server.py), so a live instance is always listed and a dead one vanishes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from berthd.common.errors import Unavailable
from berthd.common.state.endpoints import instances
from berthd.common.store import Store

AddressGetter = Callable[[], Awaitable[str]]


def service_address(store: Store, service: str, flag: str = "") -> AddressGetter:
    """An async getter for `service`'s address: `flag` when given, else a registered instance
    (looked up on every call, so a restarted service on a new port is found)."""

    async def address() -> str:
        if flag:
            return flag
        found = await instances(store, service)
        if not found:
            raise Unavailable(
                f"no {service} service is registered in etcd; start one or pass --{service}"
            )
        return found[0].address

    return address
