"""BatchGetManifests in the registry's core (issue 14: the image service's first listing after
a push): many manifests and their image configs in one call, their records read a hundred to
an etcd transaction, what a repository does not hold or the caller may not pull reported as
not found, and a response that stops at its size budget for the caller to ask again. Real
etcd, the registry's core in this process (to count its etcd reads)."""

from __future__ import annotations

from pathlib import Path

import pytest

from berthd.common.errors import InvalidArgument
from berthd.registry import core
from berthd.registry.blobstore import BlobStore
from berthd.registry.core import Registry
from berthd.registry.metadata import Metadata

from .counting import CountingStore
from .test_registry import OCI_MANIFEST, image
from .test_registry_counts import push

pytestmark = pytest.mark.integration


async def test_a_batch_reads_manifests_and_configs_in_a_few_etcd_reads(
    counting: CountingStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(BlobStore(tmp_path / "blobs"), Metadata(counting))
    names = []
    for n in range(150):
        repository = f"lib/r{n:03}"
        names.append((repository, await push(registry, repository, ["1"], bytes([n % 256, 1]))))
    gone = ("lib/r000", names[1][1])  # a manifest of another repository
    asked = [*names, gone]

    counting.reads = 0
    found = await registry.get_manifests(asked, include_configs=True)
    assert counting.reads == 2  # 151 records: two transactions, not a read each
    assert [(m.repository, m.digest) for m in found] == asked
    assert [m.found for m in found] == [True] * 150 + [False]
    first = found[0]
    manifest, blobs = image([bytes([0, 1])])
    assert (first.content, first.media_type, first.config) == (manifest, OCI_MANIFEST, blobs[0])
    assert (await registry.get_manifests(names[:1]))[0].config == b""  # configs only if asked

    # A caller who may not pull a repository learns nothing of it.
    hidden = await registry.get_manifests(names[:3], True, lambda repo: repo != "lib/r001")
    assert [m.found for m in hidden] == [True, False, True] and hidden[1].content == b""

    # The response stops at its budget (at least one result); the caller asks for the rest.
    monkeypatch.setattr(core, "BATCH_RESPONSE_BYTES", 1)
    assert len(await registry.get_manifests(names[:5], True)) == 1

    # A malformed name is INVALID_ARGUMENT with its reason and the request's field.
    for bad, reason in (
        ([("lib/r000", "sha256:12")], "DIGEST_INVALID"),
        ([("UP", names[0][1])], "NAME_INVALID"),
    ):
        with pytest.raises(InvalidArgument) as refused:
            await registry.get_manifests(bad)
        assert refused.value.reason == reason
        assert refused.value.details.field_violations[0][0] == "manifests"
    with pytest.raises(InvalidArgument, match="at most 1000"):
        await registry.get_manifests(names * 7)
