"""Build cache keys and records, without etcd: how keys chain through a stage, what a build arg
changes, what a prune frees. (The records' JSON: tests/unit/test_state.py.)"""

from __future__ import annotations

from collections.abc import Mapping

from berthd.builder.cache import freed_bytes, step_key
from berthd.builder.dockerfile import parse_dockerfile
from berthd.common.oci.manifest import Descriptor
from berthd.common.state.build_cache import CacheRecord

BASE_DIGEST = "sha256:" + "b" * 64
DOCKERFILE = """\
FROM test/busybox:1
ARG VERSION=1
ENV A=1
RUN echo $VERSION > /v
COPY src /src
RUN make -C /src
CMD ["run"]
"""


def keys(text: str, build_args: Mapping[str, str] | None = None, sources: str = "s1") -> list[str]:
    """The chain of keys of the last stage's steps, as the executor computes them."""
    build_args = build_args or {}
    df = parse_dockerfile(text, build_args)
    scope = df.scope(["PATH=/bin"], build_args)
    chain, parent = [], BASE_DIGEST
    for instruction in df.stages[-1].instructions:
        step = scope.step(instruction)
        copied = sources if step.instruction.cmd == "COPY" else ""
        parent = step_key(parent, step.cache_text, step.used_args, copied)
        chain.append(parent)
    return chain


def test_keys_are_stable_sha256_hex() -> None:
    first = keys(DOCKERFILE)
    assert first == keys(DOCKERFILE)
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in first)
    assert len(set(first)) == len(first)


def test_a_changed_step_changes_its_key_and_every_later_key_only() -> None:
    before = keys(DOCKERFILE)
    after = keys(DOCKERFILE.replace("ENV A=1", "ENV A=2"))
    assert after[:1] == before[:1]  # ARG, before the change
    assert all(a != b for a, b in zip(after[1:], before[1:], strict=True))


def test_changed_copy_sources_change_that_step_and_the_later_ones() -> None:
    before = keys(DOCKERFILE, sources="s1")
    after = keys(DOCKERFILE, sources="s2")
    copy = 3
    assert after[:copy] == before[:copy]
    assert all(a != b for a, b in zip(after[copy:], before[copy:], strict=True))


def test_whitespace_does_not_change_keys() -> None:
    spaced = DOCKERFILE.replace("ENV A=1", "ENV   A=1").replace("COPY src", "COPY  src")
    assert keys(spaced) == keys(DOCKERFILE)


def test_build_args_only_matter_where_they_are_used() -> None:
    default = keys(DOCKERFILE)
    # VERSION is declared and RUN sees it: the first RUN and everything after change.
    changed = keys(DOCKERFILE, {"VERSION": "2"})
    assert changed[:2] == default[:2]
    assert all(a != b for a, b in zip(changed[2:], default[2:], strict=True))
    # Given the same value as its default, or an arg nothing declares: nothing changes.
    assert keys(DOCKERFILE, {"VERSION": "1"}) == default
    assert keys(DOCKERFILE, {"OTHER": "x"}) == default


def test_the_parent_and_copy_origin_are_part_of_the_key() -> None:
    text = '{"cmd":"COPY"}'
    assert step_key("a", text) != step_key("b", text)
    assert step_key("a", text, (), "", "stage-key-1") != step_key("a", text, (), "", "k2")
    assert step_key("a", text, (("X", "1"),)) != step_key("a", text, (("X", "2"),))
    # Used args are a set: their order does not matter.
    both = (("X", "1"), ("Y", "2"))
    assert step_key("a", text, both) == step_key("a", text, tuple(reversed(both)))


def test_freed_bytes_counts_layers_no_kept_record_holds() -> None:
    def record(key: str, digest: str | None, size: int = 0) -> CacheRecord:
        layer = Descriptor("t", "sha256:" + digest * 64, size) if digest else None
        return CacheRecord(key, "RUN", layer, "", {})

    deleted = [record("1", "a", 10), record("2", "b", 20), record("3", "b", 20), record("4", None)]
    assert freed_bytes(deleted, []) == 30  # b counted once
    assert freed_bytes(deleted, [record("5", "b", 20)]) == 10  # b is still held
