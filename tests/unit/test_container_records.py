"""Container records on the node's disk: a damaged record is skipped with a log line when the
agent loads them, never the end of the agent; writes leave no half-written record."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from berthd.common.containers import ContainerConfig
from berthd.node.records import ContainerDir, ContainerRecord, load_records

GOOD = "a" * 64


def record(container_id: str = GOOD) -> ContainerRecord:
    return ContainerRecord(
        id=container_id,
        name="web",
        config=ContainerConfig("test/busybox:1", name="web"),
        image_digest="sha256:" + "b" * 64,
        chain_ids=["sha256:" + "c" * 64],
    )


def saved(root: Path, container_id: str = GOOD) -> Path:
    cdir = ContainerDir(root / container_id)
    cdir.root.mkdir(parents=True)
    cdir.save(record(container_id))
    return cdir.record


def damage(root: Path, name: str, content: bytes | None) -> Path:
    """A container directory whose record holds `content` (None: a directory in its place)."""
    path = root / name / "container.json"
    path.parent.mkdir(parents=True)
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    return path


def fields(**changes: object) -> bytes:
    data = record("d" * 64).to_json()
    data.update(changes)
    return json.dumps(data).encode()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (b"", "empty (a crash before the rename, by an older agent)"),
        (b'{"id": "', "truncated"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[]", "not an object"),
        (None, "unreadable: a directory where the file should be"),
        (fields(id="e" * 64), "names another container than its directory"),
        (fields(state="dancing"), "a state the agent does not know"),
        (fields(pid="12"), "a pid that is no number"),
        (fields(chain_ids="sha256:x"), "chain ids that are no list"),
        (fields(config={"image": 5}), "a config that no longer validates"),
    ],
)
def test_a_damaged_record_is_skipped_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes | None, why: str
) -> None:
    saved(tmp_path)
    path = damage(tmp_path, "d" * 64, content)
    records = load_records(tmp_path)
    assert list(records) == [GOOD], why
    assert f"skipping unreadable container record {path}" in caplog.text, why


def test_an_unreadable_disk_skips_the_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved(tmp_path)
    broken = saved(tmp_path, "d" * 64)
    real = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if self == broken:
            raise OSError(errno.EIO, "Input/output error")
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)
    assert list(load_records(tmp_path)) == [GOOD]
    assert f"skipping unreadable container record {broken}" in caplog.text


def test_leftovers_of_an_interrupted_write_are_removed(tmp_path: Path) -> None:
    path = saved(tmp_path)
    leftover = path.with_name(".container.json.0badcafe.tmp")
    leftover.write_bytes(b'{"id": ')
    assert list(load_records(tmp_path)) == [GOOD]
    assert not leftover.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == ["container.json"]
