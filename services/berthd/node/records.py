"""A container's record on disk: its config plus what the node observed.

Records live in `<data>/containers/<id>/container.json`, written atomically, so an agent that
restarts (even after SIGKILL) finds every container again and adopts it.
"""

from __future__ import annotations

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
        if record.idmap:
            IdMap(*record.idmap)  # a bad range fails the load, not a later mount
        return record


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
    """Every container record under `root` (`<data>/containers`), by id."""
    records: dict[str, ContainerRecord] = {}
    for path in sorted(root.iterdir()):
        record_file = path / "container.json"
        if not record_file.exists():
            continue
        try:
            record = ContainerDir(path).load()
        except (ValueError, KeyError, TypeError, InvalidArgument) as exc:
            # A config that no longer validates must not keep the agent from starting.
            log.error("skipping unreadable container record %s: %s", record_file, exc)
            continue
        records[record.id] = record
    return records
