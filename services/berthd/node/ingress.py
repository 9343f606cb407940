"""The routing mesh across hosts: a node whose mesh has backends on a network it has no
container on still joins that network's overlay, as every Swarm node has a sandbox on its
ingress network.

Mesh flows are masqueraded (berthd.node.ports), so their source is the address of the device
they leave through. For the replicas' replies to come back through the tunnel, that device is
the node's vxlan device of the network, and its address one the other nodes route to this
node: its own slice's .0 (berthd.node.overlay). So the node claims a slice of the network (the
claim a container's attach makes, NetworkManager.claim_slice) while its mesh has backends
there, and releases it when neither containers nor backends remain on the network. No bridge
and no addresses are made: the slice gives the vxlan device its address and the other nodes
their route back. A container that starts on the network meanwhile takes the same slice.

A node that makes no tunnels (`berthd up`: a loopback underlay) claims nothing: the other
nodes' bridges are in its namespace and their slices' routes already lead there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

from berthd.common.state.networks import SLICES_PREFIX, NetworkRecord, Slice
from berthd.common.store import Store
from berthd.node.network import Attachment, _link_exists, bridge_name
from berthd.node.overlay import slice_key

log = logging.getLogger("berthd.node.ingress")

IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


class Ingress:
    """The slices this node holds for its mesh, each as a stand-in attachment (no bridge, no
    namespace) that gives the overlay the network's device."""

    def __init__(
        self,
        store: Store | None,
        node_id: str,
        claim: Callable[[NetworkRecord], Awaitable[Slice]],
        release: Callable[[str, str], Awaitable[None]],
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.claim = claim
        self.release = release
        self.held: dict[str, Attachment] = {}  # network id -> stand-in
        self._swept = False

    def holds(self, network_id: str) -> bool:
        """Whether the mesh keeps this node's slice of the network (its last container's
        detach must not release it)."""
        return network_id in self.held

    async def sync(
        self, attachments: Iterable[Attachment], wanted: Mapping[str, tuple[str, str]]
    ) -> tuple[list[Attachment], list[Attachment]]:
        """Claim a slice of each `wanted` network (id -> (name, range)) not yet held; the
        stand-ins the overlay needs now (networks with no container here) and those no longer
        wanted, to `release` once the overlay dropped their devices."""
        local = {a.network_id: a for a in attachments}
        for network_id, (name, subnet) in sorted(wanted.items()):
            if network_id in self.held:
                continue
            if network_id in local:
                slice_ = Slice(local[network_id].slice)
            else:
                try:
                    slice_ = await self.claim(NetworkRecord(network_id, name, subnet))
                except Exception as exc:  # full, removed, or etcd away: tried at the next change
                    log.warning("the mesh cannot reach network %s from here: %s", name, exc)
                    continue
                # This node forwards the mesh's flows into the tunnel.
                IP_FORWARD.write_text("1\n")
                log.info("network slice held for the mesh", extra={"network": name})
            self.held[network_id] = Attachment(
                network=name,
                network_id=network_id,
                subnet=subnet,
                slice=slice_.subnet,
                bridge=bridge_name(network_id, self.node_id),
                internal=False,
                netns="",
            )
        dropped = [self.held.pop(n) for n in sorted(self.held) if n not in wanted]
        stand_ins = [a for n, a in sorted(self.held.items()) if n not in local]
        return stand_ins, [a for a in dropped if a.network_id not in local]

    async def release_all(self, dropped: Iterable[Attachment]) -> None:
        for a in dropped:
            await self.release(a.network_id, a.slice)
            log.info("network slice of the mesh released", extra={"network": a.network})

    async def sweep(self, attachments: Iterable[Attachment]) -> None:
        """Once, when the agent first knows its mesh: release the slices it holds for
        networks with neither a container nor a backend (a mesh's slice whose backends went
        while the agent was away)."""
        if self._swept or self.store is None:
            return
        entries, _ = await self.store.snapshot(SLICES_PREFIX)
        keep = {a.network_id for a in attachments} | set(self.held)
        for entry in entries:
            ids = slice_key(entry.key)
            if ids is None or ids[1] != self.node_id or ids[0] in keep:
                continue
            # A bridge: a container attached since `attachments` was read holds it.
            if await asyncio.to_thread(_link_exists, bridge_name(ids[0], self.node_id)):
                continue
            await self.release(ids[0], Slice.decode(self.node_id, entry.value).subnet)
            log.info("stale network slice released", extra={"network": ids[0]})
        self._swept = True
