"""A stage after some of its steps: its layers, config and history, what its image would be if
it ended there; and the history entry a step adds."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from berthd.builder.cache import SCRATCH, CacheRecord
from berthd.builder.dockerfile import ARCHITECTURE, Step
from berthd.builder.instructions import author, history_text
from berthd.common.oci.manifest import Descriptor

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HISTORY_COMMENT = "buildkit.dockerfile.v0"


@dataclass(frozen=True)
class State:
    """A stage after some of its steps: what its image would be if it ended here."""

    key: str  # cache key of the last step (a stage's first: its base's key or digest)
    layers: tuple[Descriptor, ...]
    diff_ids: tuple[str, ...]
    config: dict[str, Any]  # the image config's `config` section
    history: tuple[dict[str, Any], ...]
    platform: dict[str, str]  # architecture, os (and variant)
    author: str = ""
    created: str = ""  # the base image's, until a step adds history
    image: str = ""  # this state's image in the cache repository, once pushed

    def after(self, key: str, config: dict[str, Any], record: CacheRecord, step: Step) -> State:
        layers, diff_ids = self.layers, self.diff_ids
        if record.layer is not None:
            layers, diff_ids = (*layers, record.layer), (*diff_ids, record.diff_id)
        return replace(
            self,
            key=key,
            layers=layers,
            diff_ids=diff_ids,
            config=config,
            # Key order as etcd gives records back (sorted), so fresh and cached agree.
            history=(*self.history, dict(sorted(record.history.items()))),
            author=author(step) or self.author,
            created=str(record.history.get("created") or self.created),
            image=record.image,
        )

    def image_config(self, labels: dict[str, str] | None = None) -> dict[str, Any]:
        """The OCI image config of this state, byte-stable for the same state."""
        config = copy.deepcopy(self.config)
        if labels:
            config["Labels"] = {**(config.get("Labels") or {}), **labels}
        doc: dict[str, Any] = {**self.platform}
        if self.author:
            doc["author"] = self.author
        if self.created:
            doc["created"] = self.created
        doc["config"] = config
        doc["rootfs"] = {"type": "layers", "diff_ids": list(self.diff_ids)}
        doc["history"] = list(self.history)
        return doc


def scratch_state() -> State:
    return State(
        key=SCRATCH,
        layers=(),
        diff_ids=(),
        config={"Env": [DEFAULT_PATH]},
        history=(),
        platform={"architecture": ARCHITECTURE, "os": "linux"},
    )


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def history_entry(step: Step, config_before: dict[str, Any], empty: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "created": now(),
        "created_by": history_text(step, config_before),
        "comment": HISTORY_COMMENT,
    }
    if empty:
        entry["empty_layer"] = True
    return entry
