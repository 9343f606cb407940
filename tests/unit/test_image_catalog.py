"""The image catalog's pure logic (berthd.image.catalog) and the parts of commit and import that
need no server (berthd.image.commit): history pairing, shared sizes, hosts, removal rules,
the commit config, and packing an imported tarball."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import tarfile
from pathlib import Path
from typing import Any, cast

import pytest

from berth.client.registry import ManifestData
from berth.registry.v1 import registry_pb2
from berthd.common.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    error_for_code,
)
from berthd.common.images import Content, ImageStore
from berthd.common.oci import mediatypes
from berthd.common.oci.manifest import (
    Descriptor,
    as_oci_layer,
    build_image_manifest,
    parse_image_config,
    parse_manifest,
)
from berthd.common.rpc.registry import BatchedManifest, ManifestEntry, RegistryApi
from berthd.common.state.registry import NameChange
from berthd.common.tarsafe import UnsafeLayer
from berthd.image.catalog import (
    ContainerUse,
    Target,
    catalog_figures,
    catalog_name,
    check_unused,
    container_use,
    hosts_holding,
    pair_history,
    parse_created,
    removal_plan,
    shared_sizes,
    unreferenced,
)
from berthd.image.catalog import _dangling as dangling
from berthd.image.commit import check_tar, commit_config, pack_layer
from berthd.image.names import Snapshot


def digest(name: str) -> str:
    return "sha256:" + hashlib.sha256(name.encode()).hexdigest()


def layer(name: str, size: int) -> Descriptor:
    return Descriptor(mediatypes.OCI_LAYER_TAR_GZIP, digest(name), size)


def config_of(history: list[dict], layers: int = 0) -> bytes:
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [digest(f"d{i}") for i in range(layers)]},
            "history": history,
        }
    ).encode()


# --- history -------------------------------------------------------------------------------------


def test_history_pairs_non_empty_steps_with_layers_in_order() -> None:
    config = parse_image_config(
        config_of(
            [
                {"created": "2024-01-02T03:04:05.123456789Z", "created_by": "ADD rootfs"},
                {"created_by": "ENV A=1", "empty_layer": True},
                {"created_by": "RUN make", "comment": "built", "author": "me"},
            ]
        )
    )
    steps = pair_history(config, [layer("a", 10), layer("b", 20)])
    assert [(s.layer, s.size, s.created_by, s.empty_layer) for s in steps] == [
        (digest("a"), 10, "ADD rootfs", False),
        ("", 0, "ENV A=1", True),
        (digest("b"), 20, "RUN make", False),
    ]
    assert steps[0].created == pytest.approx(1704164645.123456)
    assert (steps[2].comment, steps[2].author) == ("built", "me")


def test_history_shorter_or_longer_than_the_layers() -> None:
    no_history = parse_image_config(config_of([]))
    steps = pair_history(no_history, [layer("a", 1), layer("b", 2)])
    assert [(s.layer, s.size, s.created_by) for s in steps] == [
        (digest("a"), 1, ""),
        (digest("b"), 2, ""),
    ]
    too_long = parse_image_config(config_of([{"created_by": "x"}, {"created_by": "y"}]))
    steps = pair_history(too_long, [layer("a", 1)])
    assert [(s.layer, s.size) for s in steps] == [(digest("a"), 1), ("", 0)]


def test_created_times_that_cannot_be_read_are_none() -> None:
    assert parse_created(None) is None
    assert parse_created("yesterday") is None
    assert parse_created("1970-01-01T00:00:10Z") == 10.0


# --- sizes, hosts, figures -----------------------------------------------------------------------


def test_shared_size_counts_layers_another_image_uses() -> None:
    base, app, other, solo = layer("base", 100), layer("app", 7), layer("other", 5), layer("s", 3)
    sizes = shared_sizes(
        {
            "one": [base, app],
            "two": [base, other, base],  # a layer listed twice counts once
            "three": [solo],
            "four": [app],
        }
    )
    assert sizes == {"one": 107, "two": 100, "three": 0, "four": 7}


def test_hosts_are_nodes_holding_every_layer() -> None:
    a, b = layer("a", 1), layer("b", 2)
    nodes = {
        "n1": {a.digest: 1, b.digest: 2},
        "n2": {a.digest: 1},
        "n0": {b.digest: 2, a.digest: 1},
    }
    assert hosts_holding([a, b], nodes) == ["n0", "n1"]
    assert hosts_holding([a], nodes) == ["n0", "n1", "n2"]
    assert hosts_holding([layer("c", 1)], nodes) == []


def test_catalog_figures_count_shared_blobs_once() -> None:
    base = layer("base", 100)

    def image(name: str, layers: list[Descriptor]) -> Content:
        cfg = Descriptor(mediatypes.OCI_IMAGE_CONFIG, digest(f"config-{name}"), 10)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": mediatypes.OCI_IMAGE_MANIFEST,
                "config": cfg.to_dict(),
                "layers": [x.to_dict() for x in layers],
            }
        ).encode()
        config = parse_image_config(config_of([], len(layers)))
        return Content(
            digest(name),
            mediatypes.OCI_IMAGE_MANIFEST,
            manifest,
            parse_manifest(manifest),
            b"{}",
            config,
        )

    one, two = image("one", [base, layer("x", 5)]), image("two", [base])
    assert (one.size, two.size) == (115, 110)
    assert catalog_figures({"one": one, "two": two}) == (2, 100 + 5 + 10 + 10)


# --- the snapshot and the content cache ---------------------------------------------------------


class FakeRegistry:
    """The parts of RegistryApi the catalog reads, over manifests and configs in memory."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.entries: list[ManifestEntry] = []
        self.reads: list[str] = []

    async def list_manifests(self, repository: str = "") -> list[ManifestEntry]:
        return list(self.entries)

    async def get_manifest(self, repository: str, reference: str) -> ManifestData:
        self.reads.append(reference)
        return ManifestData(reference, mediatypes.OCI_IMAGE_MANIFEST, self.blobs[reference])

    async def read_blob(self, repository: str, digest: str, size: int | None = None) -> bytes:
        self.reads.append(digest)
        assert size == len(self.blobs[digest])
        return self.blobs[digest]

    async def get_manifests(
        self, names: list[tuple[str, str]], include_configs: bool = False
    ) -> list[BatchedManifest]:
        """A batch: each manifest and, when asked, its config (or what `sent` says)."""
        self.reads.append(f"batch of {len(names)}")
        results = []
        for repository, digest in names:
            content = self.blobs.get(digest)
            manifest = (
                ManifestData(digest, mediatypes.OCI_IMAGE_MANIFEST, content) if content else None
            )
            config = parse_manifest(content).config if content else None
            sent = self.sent.get(digest, self.blobs[config.digest] if config else b"")
            results.append(BatchedManifest(repository, manifest, sent if include_configs else b""))
        return results

    sent: dict[str, bytes] = {}


def stored_image(blobs: dict[str, bytes], name: str) -> str:
    """An image manifest and its config in `blobs`; returns the manifest digest."""
    config = config_of([], 1).replace(b"amd64", name.encode())
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = build_image_manifest(
        Descriptor(mediatypes.OCI_IMAGE_CONFIG, config_digest, len(config)), [layer(name, 5)]
    )
    manifest_digest = "sha256:" + hashlib.sha256(manifest).hexdigest()
    blobs[config_digest], blobs[manifest_digest] = config, manifest
    return manifest_digest


def test_the_names_follow_changes_and_count_the_users_of_each_digest() -> None:
    names = Snapshot()
    one, two, index = digest("one"), digest("two"), digest("index")
    cfg, base = digest("cfg"), digest("base")
    for change in (
        NameChange("manifest", "a", one, (cfg, base)),
        NameChange("manifest", "b", one, (cfg, base)),
        NameChange("manifest", "a", two, (base, base)),  # a layer twice counts once
        NameChange("manifest", "a", index, (two,)),
        NameChange("tag", "a", "1", one),
        NameChange("tag", "a", "2", one),
        NameChange("tag", "a", "multi", index),
        NameChange("tag", "a", "broken", None),  # a damaged record reads as absent
    ):
        assert names.apply(change) is None
    assert names.holders(one) == ["a", "b"]
    assert names.tags_of(one) == [("a", "1"), ("a", "2")]
    assert (names.tag("a", "multi"), names.tag("b", "1"), names.tag("a", "broken")) == (
        index,
        None,
        None,
    )
    assert names.users == {cfg: 2, base: 3, two: 1}
    # An untagged copy is dangling; an image an index of its repository lists is not.
    images = cast(dict[str, Content], {one: None, two: None})
    assert dangling(names, images) == [("b", one)]
    # A tag moved, then the index and one copy of `one` deleted.
    names.apply(NameChange("tag", "a", "2", two))
    assert (names.tags_of(one), names.tags_of(two)) == ([("a", "1")], [("a", "2")])
    assert names.apply(NameChange("manifest", "a", index, None)) == index
    assert names.apply(NameChange("manifest", "a", one, None)) is None  # b holds it still
    assert names.users == {cfg: 1, base: 2}
    frozen = names.copy()
    assert names.apply(NameChange("manifest", "b", one, None)) == one
    assert (names.holders(one), frozen.holders(one)) == ([], ["b"])
    assert Snapshot.of(frozen.manifests, frozen.tags).users == frozen.users


async def test_content_is_fetched_once_into_memory_and_dropped_when_gone() -> None:
    blobs: dict[str, bytes] = {}
    one, two = stored_image(blobs, "one"), stored_image(blobs, "two")
    fake = FakeRegistry(blobs)
    images = ImageStore(cast(RegistryApi, fake))
    config_one = parse_manifest(blobs[one]).config
    assert config_one is not None
    await images.content(one, "a")
    await images.content(one, "a")
    assert fake.reads == [one, config_one.digest]  # the manifest, then its config by size
    images.forget(one)
    await images.content(one, "a")
    assert fake.reads[2:] == [one, config_one.digest]
    # The cache holds at most its bytes: the least recently used goes first.
    small = ImageStore(cast(RegistryApi, fake), cache_bytes=len(blobs[one]) + 10)
    await small.content(one, "a")
    await small.content(two, "a")
    assert (small.cached(one), small.cached(two) is not None) == (None, True)


async def test_many_contents_come_in_one_batch_verified_and_only_what_is_not_cached() -> None:
    blobs: dict[str, bytes] = {}
    one, two, three = (stored_image(blobs, name) for name in ("one", "two", "three"))
    fake = FakeRegistry(blobs)
    images = ImageStore(cast(RegistryApi, fake))
    await images.content(one, "a")
    fake.reads.clear()
    # `three`'s config comes back wrong (a flipped byte): it is read alone and verified there.
    config_three = parse_manifest(blobs[three]).config
    assert config_three is not None
    fake.sent = {three: blobs[config_three.digest].replace(b"three", b"thref")}
    gone = digest("gone")
    found = await images.contents([(one, "a"), (two, "a"), (three, "a"), (gone, "a")])
    assert sorted(found) == sorted([one, two, three])  # what is gone is left out
    assert fake.reads == ["batch of 3", three, config_three.digest]
    assert found[two].config is not None and found[two].created is None
    assert images.cached(two) is found[two]
    fake.reads.clear()
    assert sorted(await images.contents([(one, "a"), (two, "a")])) == sorted([one, two])
    assert fake.reads == []  # all cached: no call


async def test_a_registry_without_batch_reads_is_read_one_image_at_a_time() -> None:
    blobs: dict[str, bytes] = {}
    one, two = stored_image(blobs, "one"), stored_image(blobs, "two")

    class OlderRegistry(FakeRegistry):
        async def get_manifests(self, *args: Any, **kw: Any) -> list[BatchedManifest]:
            raise error_for_code("UNIMPLEMENTED", "Method not found!")

    fake = OlderRegistry(blobs)
    found = await ImageStore(cast(RegistryApi, fake)).contents([(one, "a"), (two, "a")])
    assert sorted(found) == sorted([one, two]) and len(fake.reads) == 4


# --- removal rules -------------------------------------------------------------------------------


def snapshot_of(holders: dict[str, list[str]], tags: dict[tuple[str, str], str]) -> Snapshot:
    manifests = {digest(name): {repo: () for repo in repos} for name, repos in holders.items()}
    return Snapshot.of(manifests, {key: digest(name) for key, name in tags.items()})


def test_untag_keeps_an_image_tagged_elsewhere_and_deletes_the_last_tag_everywhere() -> None:
    snap = snapshot_of({"m": ["a", "b"]}, {("a", "1"): "m", ("b", "2"): "m"})
    plan = removal_plan(Target(digest("m"), "a", "1", "tag"), snap)
    assert (plan.untag, plan.delete_from, plan.whole) == ([("a", "1")], [], False)
    snap = snapshot_of({"m": ["a", "b"]}, {("a", "1"): "m"})
    plan = removal_plan(Target(digest("m"), "a", "1", "tag"), snap)
    assert (plan.untag, plan.delete_from, plan.whole) == ([("a", "1")], ["a", "b"], True)


def test_digest_removes_from_one_repository_and_id_from_all() -> None:
    snap = snapshot_of({"m": ["a", "b"]}, {("a", "1"): "m"})
    plan = removal_plan(Target(digest("m"), "b", None, "digest"), snap)
    assert (plan.untag, plan.delete_from, plan.whole) == ([], ["b"], False)
    plan = removal_plan(Target(digest("m"), "a", None, "id"), snap)
    assert (plan.untag, plan.delete_from, plan.whole) == ([], ["a", "b"], True)


def test_containers_block_removals_that_take_their_image_or_name() -> None:
    tags = {("a", "1"): digest("m"), ("a", "2"): digest("m")}
    by_tag = container_use("c" * 64, "a:1", tags)
    by_digest = container_use("d" * 64, f"a@{digest('m')}", tags)
    assert by_tag == ContainerUse("c" * 64, "a", "1", digest("m"))
    assert by_digest == ContainerUse("d" * 64, "a", None, digest("m"))
    assert container_use("e", "127.0.0.1:5000/a:1", tags) is None
    assert container_use("e", "a", tags) == ContainerUse("e", "a", "latest", None)

    snap = snapshot_of({"m": ["a"]}, {("a", "1"): "m", ("a", "2"): "m"})
    untag_2 = removal_plan(Target(digest("m"), "a", "2", "tag"), snap)
    check_unused(untag_2, digest("m"), digest("cfg"), [by_tag])  # another tag: fine
    untag_1 = removal_plan(Target(digest("m"), "a", "1", "tag"), snap)
    with pytest.raises(FailedPrecondition) as raised:
        check_unused(untag_1, digest("m"), digest("cfg"), [by_tag])
    assert str(raised.value) == (
        'conflict: unable to remove repository reference "a:1" (must force) - image is being '
        f"used by container {'c' * 12}"
    )
    delete = removal_plan(Target(digest("m"), "a", None, "id"), snap)
    with pytest.raises(FailedPrecondition) as raised:
        check_unused(delete, digest("m"), digest("cfg"), [by_digest])
    short = digest("cfg")[7:19]
    assert str(raised.value) == (
        f"conflict: unable to delete {short} (must be forced) - image is being used by "
        f"container {'d' * 12}"
    )


def test_unreferenced_blobs_in_order_once() -> None:
    a, b, c = layer("a", 1), layer("b", 2), layer("c", 3)
    assert unreferenced([a, b, a, c], {b.digest}) == [a, c]


def test_new_names_have_no_host_and_no_digest() -> None:
    assert (catalog_name("x/y").repository, catalog_name("x/y").tag) == ("x/y", "latest")
    with pytest.raises(InvalidArgument, match=r"berth push SRC 127\.0\.0\.1:5000/x:1"):
        catalog_name("127.0.0.1:5000/x:1", "target")
    with pytest.raises(InvalidArgument, match="without a digest"):
        catalog_name(f"x@{digest('m')}")


# --- commit config -------------------------------------------------------------------------------


def test_commit_config_adds_the_layer_a_history_step_and_the_changes() -> None:
    parent = json.loads(
        config_of([{"created_by": "ADD rootfs"}, {"created_by": "CMD", "empty_layer": True}], 1)
    )
    parent["config"] = {"Cmd": ["sh"], "Env": ["PATH=/bin"]}
    parent["author"] = "parent author"
    config = commit_config(
        parent,
        ['CMD ["cat", "/x"]', "ENV A=1"],
        digest("new"),
        "c" * 64,
        ["sh", "-c", "echo hi > /x"],
        "",
        "added x",
        "2025-01-01T00:00:00Z",
    )
    assert config["config"] == {"Cmd": ["cat", "/x"], "Env": ["PATH=/bin", "A=1"]}
    assert config["rootfs"]["diff_ids"] == [digest("d0"), digest("new")]
    assert config["history"][-1] == {
        "created": "2025-01-01T00:00:00Z",
        "created_by": "sh -c echo hi > /x",
        "comment": "added x",
    }
    assert (config["created"], config["container"]) == ("2025-01-01T00:00:00Z", "c" * 64)
    assert "author" not in config
    assert parent["config"] == {"Cmd": ["sh"], "Env": ["PATH=/bin"]}  # parent left alone
    steps = pair_history(
        parse_image_config(json.dumps(config).encode()), [layer("p", 1), layer("n", 2)]
    )
    assert (steps[-1].layer, steps[-1].comment) == (digest("n"), "added x")


def test_commit_config_pads_a_parent_without_history() -> None:
    parent = json.loads(config_of([], 2))
    config = commit_config(parent, [], digest("new"), "c", ["sh"], "me", "", "2025-01-01T00:00:00Z")
    assert len(config["history"]) == 3
    assert config["history"][-1] == {
        "created": "2025-01-01T00:00:00Z",
        "created_by": "sh",
        "author": "me",
    }
    assert config["author"] == "me"
    steps = pair_history(
        parse_image_config(json.dumps(config).encode()), [layer(x, 1) for x in "abn"]
    )
    assert steps[-1].layer == digest("n")


def test_docker_layer_types_are_renamed_for_an_oci_manifest() -> None:
    docker = Descriptor(mediatypes.DOCKER_LAYER_TAR_GZIP, digest("l"), 5, {"a": "b"})
    assert as_oci_layer(docker) == Descriptor(
        mediatypes.OCI_LAYER_TAR_GZIP, digest("l"), 5, {"a": "b"}
    )
    foreign = Descriptor(mediatypes.DOCKER_FOREIGN_LAYER, digest("f"), 5, urls=("http://x",))
    assert as_oci_layer(foreign) == Descriptor(
        mediatypes.OCI_LAYER_NONDISTRIBUTABLE_TAR_GZIP, digest("f"), 5, urls=("http://x",)
    )
    oci = Descriptor(mediatypes.OCI_LAYER_TAR_GZIP, digest("o"), 5)
    assert as_oci_layer(oci) is oci


# --- import: packing a tarball -------------------------------------------------------------------


def tar_bytes(*entries: tarfile.TarInfo, data: dict[str, bytes] | None = None) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info in entries:
            payload = (data or {}).get(info.name)
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o755
    return info


ROOTFS = tar_bytes(
    entry("bin", tarfile.DIRTYPE),
    entry("bin/tool"),
    entry("bin/alias", tarfile.SYMTYPE, "tool"),
    entry("bin/hard", tarfile.LNKTYPE, "bin/tool"),
    data={"bin/tool": b"#!/bin/sh\necho hi\n"},
)


@pytest.mark.parametrize(
    "compress",
    [lambda b: b, gzip.compress, bz2.compress, lzma.compress],
    ids=["plain", "gzip", "bzip2", "xz"],
)
def test_pack_layer_hashes_the_tar_and_gzips_it(tmp_path: Path, compress) -> None:
    source, dest = tmp_path / "in", tmp_path / "out.tar.gz"
    source.write_bytes(compress(ROOTFS))
    packed = pack_layer(source, dest)
    blob = dest.read_bytes()
    assert packed.diff_id == "sha256:" + hashlib.sha256(ROOTFS).hexdigest()
    assert (packed.digest, packed.size) == ("sha256:" + hashlib.sha256(blob).hexdigest(), len(blob))
    assert gzip.decompress(blob) == ROOTFS


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([entry("/etc/passwd")], 'tar entry "/etc/passwd": absolute path'),
        ([entry("a/../../x")], "contains '..'"),
        ([entry("evil", tarfile.SYMTYPE, "/etc"), entry("evil/passwd")], '"evil" is a symlink'),
        ([entry("h", tarfile.LNKTYPE, "/etc/shadow")], 'tar entry "h": absolute path'),
        ([entry("h", tarfile.LNKTYPE, "later"), entry("later")], "is not a file earlier"),
        ([entry("d/.wh..."), entry("d", tarfile.DIRTYPE)], "whiteout of an invalid name"),
        ([entry(".")], "the root must be a directory"),
    ],
)
def test_hostile_entries_are_refused_naming_them(entries, message: str) -> None:
    with pytest.raises(UnsafeLayer) as raised:
        check_tar(io.BytesIO(tar_bytes(*entries)))
    assert message in str(raised.value)
    assert str(raised.value).startswith("import: tar entry ")


def test_a_symlink_replaced_by_a_directory_is_safe_again() -> None:
    entries = [entry("x", tarfile.SYMTYPE, "/etc"), entry("x", tarfile.DIRTYPE), entry("x/f")]
    assert check_tar(io.BytesIO(tar_bytes(*entries))) == 3


def test_not_a_tar_corrupt_data_and_the_size_cap(tmp_path: Path) -> None:
    source, dest = tmp_path / "in", tmp_path / "out"
    source.write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(InvalidArgument, match="not a tar archive"):
        pack_layer(source, dest)
    source.write_bytes(gzip.compress(ROOTFS)[:-30] + b"garbage-garbage-garbage-garbage")
    with pytest.raises(InvalidArgument, match="not valid compressed data"):
        pack_layer(source, dest)
    source.write_bytes(gzip.compress(ROOTFS))
    with pytest.raises(ResourceExhausted, match="larger than 1024 bytes"):
        pack_layer(source, dest, max_bytes=1024)


async def test_a_batch_read_asks_again_for_what_a_response_left_out() -> None:
    class OneAtATime(RegistryApi):
        """A registry whose every BatchGetManifests response stops after one result."""

        asked: list[int] = []

        async def unary(self, method: str, request: Any, **kw: Any) -> Any:
            assert method == "BatchGetManifests"
            self.asked.append(len(request.manifests))
            name = request.manifests[0]
            return registry_pb2.BatchGetManifestsResponse(
                results=[
                    registry_pb2.BatchManifest(
                        repository=name.repository, digest=name.digest, found=False
                    )
                ]
            )

    api = OneAtATime("127.0.0.1:1")
    names = [("a", digest(str(n))) for n in range(3)]
    found = await api.get_manifests(names, include_configs=True)
    assert [(m.repository, m.manifest) for m in found] == [("a", None)] * 3
    assert api.asked == [3, 2, 1]
