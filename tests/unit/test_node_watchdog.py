"""The fence's rule and the watchdog's decisions, without servers: which containers a node cut
off (or whose agent is dead) stops, when, and when a dead agent's watchdog has nothing left to
guard."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from berthd.common.containers import ContainerConfig
from berthd.common.state.containers import MANAGED_LABEL, SERVICE_LABEL, DesiredContainer
from berthd.main import build_parser
from berthd.node.fence import Disconnection, Observation, Sight, is_replica, victims
from berthd.node.records import EXITED, RESTARTING, RUNNING, ContainerDir, ContainerRecord
from berthd.node.watchdog import (
    PID_FILE,
    Guard,
    _mark_stopped,
    parse_args,
    replace_watchdog,
    watchdog_argv,
)


def record(
    name: str, state: str = RUNNING, managed: bool = True, service: str = ""
) -> ContainerRecord:
    labels = {MANAGED_LABEL: "true"} if managed else {}
    if service:
        labels[SERVICE_LABEL] = service
    return ContainerRecord(
        id=name * 4,
        name=name,
        config=ContainerConfig("test/busybox:1", name=name, labels=labels),
        image_digest="sha256:" + "b" * 64,
        chain_ids=[],
        state=state,
    )


REPLICA = record("web1", service="web")
SOLO = record("solo")
LOCAL = record("local", managed=False)  # made on the node directly
EXITED_REPLICA = record("web2", state=EXITED, service="web")
RESTARTING_REPLICA = record("web3", state=RESTARTING, service="web")
ALL = [REPLICA, SOLO, LOCAL, EXITED_REPLICA, RESTARTING_REPLICA]


SEEN = Observation(Sight.SEEN)
ABSENT = Observation(Sight.ABSENT)


def names(found: list[ContainerRecord]) -> list[str]:
    return [r.name for r in found]


def test_replicas_go_after_stop_after_standalone_ones_only_with_their_own_limit() -> None:
    assert names(victims(ALL, 5, stop_after=6, standalone_after=0)) == []
    assert names(victims(ALL, 6, stop_after=6, standalone_after=0)) == ["web1", "web3"]
    # Standalone cluster containers: never with a limit of 0, after theirs otherwise.
    assert names(victims(ALL, math.inf, stop_after=6, standalone_after=0)) == ["web1", "web3"]
    assert names(victims(ALL, 20, stop_after=6, standalone_after=20)) == ["web1", "solo", "web3"]
    # Containers made on the node, and exited ones, never.
    assert "local" not in names(victims(ALL, math.inf, 1, 1))
    assert "web2" not in names(victims(ALL, math.inf, 1, 1))
    # Stopped already: not again.
    assert names(victims(ALL, 6, 6, 0, spared={REPLICA.id})) == ["web3"]


def test_a_replica_is_known_by_its_label_or_by_the_desired_state() -> None:
    assert is_replica(REPLICA)
    assert not is_replica(SOLO)
    # Created before the label existed: the fence still has the desired record.
    desired = DesiredContainer(id=SOLO.id, name="web.1", node="n", config=SOLO.config)
    desired.service = "web"
    assert is_replica(SOLO, desired)


def test_time_counts_from_the_first_failed_check() -> None:
    lost = Disconnection()
    assert lost.observe(SEEN, 100.0) == 0
    assert lost.observe(ABSENT, 101.0) == 0
    assert lost.observe(ABSENT, 104.5) == 3.5
    assert lost.observe(SEEN, 105.0) == 0
    assert lost.observe(ABSENT, 110.0) == 0  # a new run of failures starts over


def test_the_watchdog_stops_each_replica_once_then_has_nothing_to_guard() -> None:
    guard = Guard([REPLICA, SOLO, LOCAL, EXITED_REPLICA], stop_after=6, standalone_after=0)
    assert not guard.done
    assert guard.step(SEEN, 0.0) == []  # the dead agent's lease has not expired yet
    assert guard.step(ABSENT, 1.0) == []
    assert guard.step(ABSENT, 6.9) == []
    assert guard.step(SEEN, 7.0) == []  # seen again: the count starts over
    assert guard.step(ABSENT, 8.0) == []
    assert names(guard.step(ABSENT, 14.0)) == ["web1"]
    assert guard.step(ABSENT, 15.0) == []
    assert guard.done  # the standalone container runs on, and is not guarded


def test_a_watchdog_that_would_never_stop_anything_is_done_at_once() -> None:
    assert Guard([SOLO, LOCAL, EXITED_REPLICA], stop_after=6, standalone_after=0).done
    assert Guard([REPLICA], stop_after=0, standalone_after=0).done
    assert not Guard([SOLO], stop_after=0, standalone_after=60).done


def test_a_stopped_container_is_recorded_as_stopped_by_the_user(tmp_path: Path) -> None:
    # So the agent that comes back adopts it as exited and does not restart it.
    for original in (record("wa", service="web"), record("rb", RESTARTING, service="web")):
        cdir = ContainerDir(tmp_path / original.id)
        cdir.root.mkdir()
        cdir.save(original)
        _mark_stopped(cdir, original)
        saved = cdir.load()
        assert saved.stopped_by_user
        assert saved.state == (RUNNING if original.state == RUNNING else EXITED)


def test_the_watchdog_gets_the_agents_etcd_tls_and_fencing_settings(tmp_path: Path) -> None:
    agent = build_parser().parse_args(
        [
            "node",
            "--node-id=n1",
            "--etcd=10.0.0.1:2379",
            "--etcd-prefix=/p/",
            "--tls-ca=ca.crt",
            "--tls-cert=n1.crt",
            "--tls-key=n1.key",
            "--stop-after-disconnect=12",
            "--stop-standalone-after-disconnect=40",
        ]
    )
    args = parse_args(watchdog_argv(agent, tmp_path / "data")[3:])
    assert (args.node_id, args.etcd, args.etcd_prefix) == ("n1", "10.0.0.1:2379", "/p/")
    assert args.data_dir == (tmp_path / "data").absolute()
    assert args.tls_ca == str(Path("ca.crt").absolute())  # the agent's cwd is not its own
    assert args.tls_cert == str(Path("n1.crt").absolute())
    assert (args.stop_after_disconnect, args.stop_standalone_after_disconnect) == (12, 40)


def test_an_agent_that_cannot_record_its_watchdogs_pid_runs_without_one(tmp_path: Path) -> None:
    # A watchdog nobody could find by its pid would never be replaced or killed.
    (tmp_path / PID_FILE / "in-the-way").mkdir(parents=True)
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    assert replace_watchdog(tmp_path, sleeper) is None
    assert replace_watchdog(tmp_path / "missing", None) is None  # fencing off: none starts
