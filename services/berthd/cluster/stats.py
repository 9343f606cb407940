"""`berth stats` for many containers: one BatchContainerStats call per node, all nodes at once.

Each node reads its containers' cgroups twice with one short interval for all, so the time of a
listing is about one interval plus the slowest node, whatever the number of containers. A
container the cluster cannot sample (its node holds no lease or does not answer) gets an error
in its entry instead of failing the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from berth.types.v1 import container_pb2
from berthd.cluster.core import ClusterCore, ContainerView
from berthd.common.errors import BerthError
from berthd.common.rpc.node import NodeApi


@dataclass
class StatsEntry:
    view: ContainerView
    sample: container_pb2.ContainerStats  # zero figures with an error or without a process
    error: str = ""


async def sample_stats(
    core: ClusterCore, refs: list[str], node_api: Callable[[str, str], NodeApi]
) -> list[StatsEntry]:
    """A sample of each named container (of every active one when none is named), in the order
    asked. `node_api(address, node_id)` gives the client of a node. A named container that does
    not exist is NotFound, as for ContainerStats."""
    if refs:
        views = list(await asyncio.gather(*(core.inspect(ref) for ref in refs)))
    else:
        views = await core.list()
    entries = [StatsEntry(view, container_pb2.ContainerStats()) for view in views]
    by_node: dict[str, list[StatsEntry]] = {}
    for entry in entries:
        # A container its node has not reported yet (still pulling) has no cgroup to read.
        if entry.view.status is not None and entry.view.desired.node:
            by_node.setdefault(entry.view.desired.node, []).append(entry)

    async def ask(node: str, asked: list[StatsEntry]) -> None:
        try:
            address = await core.node_address(asked[0].view)
            # One container listed twice is sampled once.
            ids = list(dict.fromkeys(entry.view.id for entry in asked))
            samples = dict(zip(ids, await node_api(address, node).stats_many(ids), strict=True))
        except BerthError as exc:
            for entry in asked:
                entry.error = str(exc)
            return
        for entry in asked:
            entry.sample = samples[entry.view.id]

    await asyncio.gather(*(ask(node, asked) for node, asked in by_node.items()))
    return entries
