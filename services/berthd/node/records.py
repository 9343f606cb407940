"""A container's record on disk: its config plus what the node observed.

Records live in `<data>/containers/<id>/container.json`, written atomically, so an agent that
restarts (even after SIGKILL) finds every container again and adopts it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from berth.files import atomic_write
from berthd.common.containers import ContainerConfig, from_dict
from berthd.common.errors import InvalidArgument
from berthd.node.idmap import IdMap

log = logging.getLogger("berthd.node.records")

CREATED = "created"
RUNNING = "running"
EXITED = "exited"
RESTARTING = "restarting"
STATES = (CREATED, RUNNING, EXITED, RESTARTING)


@dataclass
class ContainerRecord:
    id: str
    name: str
    config: ContainerConfig
    image_digest: str
    chain_ids: list[str]
    created_at: float = field(default_factory=time.time)
    state: str = CREATED
    pid: int = 0
    exit_code: int = 0
    oom_killed: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    restart_count: int = 0
    # Why the last start failed (failure_reason START_FAILED), for a person; "" when it did not.
    error: str = ""
    failure_reason: str = ""
    # Set by stop/kill from a user: restart policies do not bring the container back.
    stopped_by_user: bool = False
    # The cluster's DesiredContainer.attempt this container was last created or started for.
    attempt: int = 0
    # [start, size] of a remapped container's user namespace (`--userns remap`), fixed when it
    # is created: its upper dir holds ids of that range even if the node's range changes.
    # Empty: the host's user namespace.
    idmap: list[int] = field(default_factory=list)
    # Its attachment to a network while it runs (berthd.node.network.Attachment as JSON);
    # empty when it is on none or not running.
    network: dict[str, Any] = field(default_factory=dict)
    # Its health while it runs with a health check (berthd.node.health.Health as JSON: status,
    # failing_streak, log); empty otherwise.
    health: dict[str, Any] = field(default_factory=dict)
    # The cluster took it out of traffic before stopping it (DesiredContainer.withdrawn_at):
    # no mesh traffic, no service DNS name.
    withdrawn: bool = False

    @property
    def id_map(self) -> IdMap | None:
        return IdMap(*self.idmap) if self.idmap else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["config"] = json.loads(self.config.to_json())
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ContainerRecord:
        data = dict(data)
        data["config"] = from_dict(data["config"])
        record = cls(**data)
        record._check()
        if record.idmap:
            IdMap(*record.idmap)  # a bad range fails the load, not a later mount
        return record

    def _check(self) -> None:
        """A record the agent acts on (signals a pid, mounts chain ids) has fields of the
        right kinds: a damaged one fails here, at load, not in the monitor later."""
        if self.state not in STATES:
            raise ValueError(f"unknown state {self.state!r}")
        for name in ("id", "name", "image_digest", "error", "failure_reason"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} is not a string")
        for name in ("pid", "exit_code", "restart_count", "attempt"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} is not an integer")
        for name in ("created_at", "started_at", "finished_at"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, int | float):
                raise TypeError(f"{name} is not a number")
        if not isinstance(self.chain_ids, list) or not all(
            isinstance(c, str) for c in self.chain_ids
        ):
            raise TypeError("chain_ids is not a list of strings")


class ContainerDir:
    """The files of one container under `<data>/containers/<id>/`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.record = root / "container.json"
        self.upper = root / "upper"
        self.work = root / "work"
        self.rootfs = root / "rootfs"
        self.bundle = root / "bundle"
        self.log = root / "ctr.log"
        self.exit_dir = root / "exit"
        self.persist = root / "persist"
        self.pid_file = root / "pidfile"
        self.conmon_pid_file = root / "conmon.pid"
        self.etc = root / "etc"
        # Docker's init layer: mount points runc needs, stacked right under the upper dir.
        self.init = root / "init"

    def make(self) -> None:
        for path in (
            self.upper,
            self.work,
            self.rootfs,
            self.bundle,
            self.exit_dir,
            self.persist,
            self.etc,
            self.init,
        ):
            path.mkdir(parents=True, exist_ok=True)

    def save(self, record: ContainerRecord) -> None:
        atomic_write(self.record, json.dumps(record.to_json()).encode())

    def load(self) -> ContainerRecord:
        return ContainerRecord.from_json(json.loads(self.record.read_text()))


def load_records(root: Path) -> dict[str, ContainerRecord]:
    """Every container record under `root` (`<data>/containers`), by id. A record that cannot
    be read or makes no sense is skipped with a log line: one damaged file must not keep the
    agent (and every other container) from starting. Its directory stays for a person to see."""
    records: dict[str, ContainerRecord] = {}
    for path in sorted(root.iterdir()):
        record_file = path / "container.json"
        # Temporary files of a write cut short (atomic_write's names): never a record.
        for leftover in path.glob(".container.json.*.tmp"):
            with contextlib.suppress(OSError):
                leftover.unlink()
        if not record_file.exists():
            continue
        try:
            record = ContainerDir(path).load()
            if record.id != path.name:
                raise ValueError(f"it names container {record.id}")
        except (OSError, ValueError, KeyError, TypeError, InvalidArgument) as exc:
            # OSError: a disk that fails under the record (EIO), or no file where it should be.
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            log.error("skipping unreadable container record %s: %s", record_file, reason)
            continue
        records[record.id] = record
    return records
