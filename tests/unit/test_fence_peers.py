"""The fence's peer check, without servers: an unreachable etcd fences only when it may be
this host's partition, never when the peers say etcd is down for everyone; an absent
registration (etcd answers) always counts. The watchdog of a dead agent decides the same way."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from berthd.common.containers import ContainerConfig
from berthd.common.state.containers import MANAGED_LABEL, SERVICE_LABEL
from berthd.node.fence import (
    PEERS_ASKED,
    Disconnection,
    Observation,
    PeerAnswer,
    Peers,
    Sight,
)
from berthd.node.records import RUNNING, ContainerRecord
from berthd.node.watchdog import Guard

REACHES, ALIVE, SILENT = PeerAnswer.REACHES_ETCD, PeerAnswer.ALIVE, PeerAnswer.SILENT


def unreachable(*answers: PeerAnswer) -> Observation:
    return Observation(Sight.UNREACHABLE, answers)


def test_an_outage_is_etcd_unreachable_with_a_majority_of_peers_answering_and_none_reaching_it():
    assert unreachable(ALIVE).outage  # 1/1
    assert unreachable(ALIVE, ALIVE, SILENT).outage  # 2/3
    assert unreachable().outage  # no peer known (one node): never fence on an unreachable etcd
    # Too few answer: maybe this host is the one cut off.
    assert not unreachable(SILENT).outage
    assert not unreachable(ALIVE, SILENT).outage  # 1/2 is no majority: two sides, no winner
    assert not unreachable(ALIVE, SILENT, SILENT).outage
    # A peer reaches etcd: it is up, and only this host cannot reach it.
    assert not unreachable(REACHES).outage
    assert not unreachable(ALIVE, ALIVE, REACHES).outage
    # etcd answers: the registration is there, or its absence proves the lease expired.
    assert not Observation(Sight.SEEN).outage
    assert not Observation(Sight.ABSENT).outage
    assert not Observation(Sight.ABSENT, (ALIVE,)).outage


def test_an_outage_holds_the_clock_and_a_partition_starts_it_afresh(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lost = Disconnection()
    caplog.set_level(logging.INFO, "berthd.node.fence")
    assert lost.observe(Observation(Sight.SEEN), 0.0) == 0
    # The peers' health lags etcd by a few seconds: a first check may see one reach it.
    assert lost.observe(unreachable(REACHES), 1.0) == 0
    assert lost.observe(unreachable(REACHES), 3.0) == 2.0
    # Then they say they cannot reach it either: held, and for as long as it lasts.
    assert lost.observe(unreachable(ALIVE), 4.0) == 0
    assert lost.observe(unreachable(ALIVE), 500.0) == 0
    held = [r.message for r in caplog.records if "not fencing" in r.message]
    assert held == ["etcd unreachable but 1/1 peers answer: not fencing"]  # once
    # The peer goes silent: maybe this host was cut off after all; the clock starts from 0.
    assert lost.observe(unreachable(SILENT), 501.0) == 0
    assert lost.observe(unreachable(SILENT), 531.0) == 30.0
    # etcd answers without the registration: counted whatever the peers would say.
    assert lost.observe(Observation(Sight.ABSENT), 532.0) == 31.0
    assert lost.observe(Observation(Sight.SEEN), 533.0) == 0
    assert lost.observe(unreachable(), 534.0) == 0  # nobody to ask: held
    assert any("no other node known" in r.message for r in caplog.records)


def replica() -> ContainerRecord:
    labels = {MANAGED_LABEL: "true", SERVICE_LABEL: "web"}
    return ContainerRecord(
        id="w" * 64,
        name="web.1",
        config=ContainerConfig("test/busybox:1", name="web.1", labels=labels),
        image_digest="sha256:" + "b" * 64,
        chain_ids=[],
        state=RUNNING,
    )


def test_the_watchdog_of_a_dead_agent_holds_in_an_etcd_outage_too() -> None:
    guard = Guard([replica()], stop_after=6, standalone_after=0)
    assert guard.step(unreachable(ALIVE, ALIVE), 0.0) == []
    assert guard.step(unreachable(ALIVE, ALIVE), 600.0) == []
    # etcd back, the dead agent's lease expires: the cluster moves the replica, it stops.
    assert guard.step(Observation(Sight.ABSENT), 601.0) == []
    assert [r.name for r in guard.step(Observation(Sight.ABSENT), 607.0)] == ["web.1"]


def test_peers_are_remembered_on_disk_without_this_node_and_asked_a_few_at_a_time(
    tmp_path: Path,
) -> None:
    path = tmp_path / "peers.json"
    nodes = {f"n{i}": f"10.0.0.{i}:5060" for i in range(12)}
    peers = Peers("n0", path)
    asyncio.run(peers.remember({**nodes, "n11": ""}))  # a node without an address: not asked
    expected = {k: v for k, v in nodes.items() if k not in ("n0", "n11")}
    assert json.loads(path.read_text()) == expected
    chosen = peers.chosen()
    assert len(chosen) == PEERS_ASKED and "10.0.0.0:5060" not in chosen
    assert peers.chosen() == chosen  # the same ones at every check
    # Another node asks another set (each peer is not asked by everyone).
    assert Peers("n1", None).known == {}
    other = Peers("n5", None)
    asyncio.run(other.remember(nodes))
    assert other.chosen() != chosen
    # A watchdog reads what its agent remembered.
    watchdog = Peers("n0", path)
    watchdog.load()
    assert watchdog.known == expected
    assert watchdog.chosen() == chosen


def test_no_or_a_broken_peers_file_is_no_peer_known(tmp_path: Path) -> None:
    missing = Peers("n0", tmp_path / "absent.json")
    missing.load()
    assert missing.known == {}
    (tmp_path / "broken.json").write_text("[1, 2")
    broken = Peers("n0", tmp_path / "broken.json")
    broken.load()
    assert broken.known == {}
    (tmp_path / "list.json").write_text("[1, 2]")
    wrong = Peers("n0", tmp_path / "list.json")
    wrong.load()
    assert wrong.known == {}
