"""The image catalog (berthd.image.catalog) and import over a real registry process and etcd,
and commit through a real cluster service and node agent."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from isal import igzip

from berth.client import ClusterClient, NodeClient, RegistryClient
from berth.errors import BerthClientError
from berthd.common.containers import ContainerConfig
from berthd.common.errors import FailedPrecondition, InvalidArgument, NotFound
from berthd.common.rpc.cluster import ClusterApi
from berthd.common.rpc.registry import RegistryApi
from berthd.common.state.build_cache import CACHE_REPOSITORY
from berthd.common.state.containers import CONTAINERS, DesiredContainer
from berthd.common.state.images import BUILDS, IMAGES, BuildRecord
from berthd.common.state.nodes import NODE_LAYERS, NodeLayers
from berthd.common.store import Store
from berthd.common.tarsafe import UnsafeLayer
from berthd.image.catalog import Catalog
from berthd.image.commit import commit, import_tarball

from .conftest import ServiceProcess, Services, wait_until
from .images import busybox_layer, push_image, sha, tar_of

pytestmark = pytest.mark.integration

BASE = tar_of({"etc/base": b"shared by both images\n" * 100})
APP = tar_of({"app/run": b"only in app\n" * 50})
TOOL = tar_of({"tool/bin": b"only in tool\n" * 70})


def gz_size(layer: bytes) -> int:
    """Size of a layer as push_image stores it."""
    return len(igzip.compress(layer, compresslevel=1, mtime=0))


@pytest.fixture
async def catalog(store: Store, registry: ServiceProcess, tmp_path: Path) -> AsyncIterator[Catalog]:
    catalog = Catalog(store, RegistryApi(registry.address), tmp_path / "scratch")
    yield catalog
    await catalog.close()


@pytest.fixture
def two_images(client: RegistryClient, tmp_path: Path) -> tuple[str, str]:
    """test/app:1 (BASE + APP) and test/tool:1 (BASE + TOOL): they share the BASE layer."""
    app = push_image(client, "test/app", "1", [BASE, APP], tmp_path, cmd=["run"])
    tool = push_image(client, "test/tool", "1", [BASE, TOOL], tmp_path, cmd=["tool"])
    return app, tool


async def run_record(store: Store, container_id: str, image: str) -> None:
    """A cluster container record, as the cluster service writes it."""
    desired = DesiredContainer(container_id, "c", "node1", ContainerConfig(image=image))
    await CONTAINERS.put(store, container_id, desired)


# --- inspect, history, list ----------------------------------------------------------------------


async def test_inspect_by_tag_digest_and_id_prefix(
    catalog: Catalog, two_images: tuple[str, str], store: Store
) -> None:
    app, _ = two_images
    detail = await catalog.inspect("test/app:1")
    assert detail.digest == app
    assert detail.repo_tags == ["test/app:1"]
    assert detail.repo_digests == [f"test/app@{app}"]
    assert detail.diff_ids == [sha(BASE), sha(APP)]
    assert [layer.size for layer in detail.layers] == [gz_size(BASE), gz_size(APP)]
    assert detail.size == sum(layer.size for layer in detail.layers) + len(
        await catalog.registry.read_blob("test/app", detail.id)
    )
    assert detail.platform == "linux/amd64"
    assert [(s.layer, s.created_by) for s in detail.history] == [
        (detail.layers[0].digest, "tests/integration/images.py"),
        (detail.layers[1].digest, "tests/integration/images.py"),
    ]
    assert (detail.origin, detail.hosts) == ("", [])
    # Built by the builder: its record says so, until the image service records an origin.
    await BUILDS.put(store, app, BuildRecord("Dockerfile.app"))
    detail = await catalog.inspect("test/app:1")
    assert (detail.origin, detail.origin_detail) == ("build", "Dockerfile.app")
    await catalog.record_origin(app, "test/app", "import", "app.tar")
    assert (await catalog.inspect("test/app:1")).origin == "import"
    for ref in (
        f"test/app@{app}",
        app,
        app[:19],  # sha256: + 12 hex
        app[7:15],
        detail.id,
        detail.id[7:11],
    ):
        assert (await catalog.inspect(ref)).digest == app, ref
    history = await catalog.history("test/app:1")
    assert [s.layer for s in history] == [detail.layers[1].digest, detail.layers[0].digest]


async def test_unknown_external_and_ambiguous_references(
    catalog: Catalog, client: RegistryClient, tmp_path: Path
) -> None:
    push_image(client, "test/one", "1", [BASE], tmp_path)
    for ref in ("test/one:2", "test/none", "sha256:" + "0" * 64, "beef"):
        with pytest.raises(NotFound) as raised:
            await catalog.inspect(ref)
        assert str(raised.value) == f"No such image: {ref}"
    with pytest.raises(InvalidArgument, match="external registry"):
        await catalog.inspect("127.0.0.1:5000/test/one:1")
    with pytest.raises(InvalidArgument):
        await catalog.inspect("Test/Upper")
    # Two image ids starting with the same 4 hex digits, found by trying history texts.
    seen: dict[str, int] = {}
    for n in range(100000):
        prefix = hashlib.sha256(_config(n)).hexdigest()[:4]
        if prefix in seen:
            break
        seen[prefix] = n
    for tag, number in (("a", seen[prefix]), ("b", n)):
        _push_with_config(client, "test/ambiguous", tag, _config(number), tmp_path)
    with pytest.raises(FailedPrecondition) as raised:
        await catalog.inspect(prefix)
    assert f"image id prefix {prefix} is ambiguous: it matches 2 images" in str(raised.value)


def _config(n: int) -> bytes:
    return json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": []},
            "history": [{"created_by": f"variant {n}", "empty_layer": True}],
        }
    ).encode()


def _push_with_config(client: RegistryClient, repo: str, tag: str, config: bytes, tmp: Path) -> str:
    path = tmp / f"config-{sha(config)[7:19]}"
    path.write_bytes(config)
    client.push_blob(repo, path, sha(config), len(config))
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha(config),
                "size": len(config),
            },
            "layers": [],
        }
    ).encode()
    return client.put_manifest(repo, tag, "application/vnd.oci.image.manifest.v1+json", manifest)


async def test_list_shared_size_hosts_and_containers(
    catalog: Catalog, two_images: tuple[str, str], store: Store
) -> None:
    app, tool = two_images
    app_detail = await catalog.inspect(app)
    base, app_layer = app_detail.layers
    # node1 holds every layer of app; node2 only the shared base.
    held = {base.digest: base.size, app_layer.digest: 1}
    await NODE_LAYERS.put(store, "node1", NodeLayers(held))
    await NODE_LAYERS.put(store, "node2", NodeLayers({base.digest: base.size}))
    await run_record(store, "a" * 64, "test/app:1")
    await run_record(store, "b" * 64, f"test/app@{app}")
    await run_record(store, "c" * 64, "test/other:1")

    rows = {(r.repository, r.tag): r for r in await catalog.list()}
    assert set(rows) == {("test/app", "1"), ("test/tool", "1")}
    assert rows["test/app", "1"].shared_size == base.size
    assert rows["test/tool", "1"].shared_size == base.size
    assert rows["test/app", "1"].size == app_detail.size
    assert rows["test/app", "1"].hosts == ("node1",)
    assert rows["test/tool", "1"].hosts == ()
    assert (rows["test/app", "1"].containers, rows["test/tool", "1"].containers) == (2, 0)
    assert (await catalog.inspect("test/app:1")).hosts == ["node1"]
    assert [r.repository for r in await catalog.list("test/tool")] == ["test/tool"]
    assert await catalog.list("test/tool:2") == []
    assert await catalog.list(dangling_only=True) == []
    assert await catalog.figures() == (2, _distinct_bytes(app_detail, await catalog.inspect(tool)))


def _distinct_bytes(*images) -> int:
    sizes = {}
    for image in images:
        sizes.update({layer.digest: layer.size for layer in image.layers})
        sizes[image.id] = len(image.config)
    return sum(sizes.values())


# --- tag, remove, prune ---------------------------------------------------------------------------


async def test_tag_into_another_repository_keeps_the_digest(
    catalog: Catalog, two_images: tuple[str, str], client: RegistryClient, tmp_path: Path
) -> None:
    app, _ = two_images
    assert await catalog.tag("test/app:1", "other/name:v2") == app
    assert await catalog.tag(app[:12], "other/name") == app  # tag latest
    detail = await catalog.inspect("other/name:v2")
    assert detail.digest == app
    assert detail.repo_tags == ["other/name:latest", "other/name:v2", "test/app:1"]
    assert detail.repo_digests == [f"other/name@{app}", f"test/app@{app}"]
    for blob in [*detail.layers, detail.id]:
        digest = blob if isinstance(blob, str) else blob.digest
        assert client.stat_blob("other/name", digest) is not None
    with pytest.raises(InvalidArgument, match=r"berth push SRC 127\.0\.0\.1:5000/x:1"):
        await catalog.tag("test/app:1", "127.0.0.1:5000/x:1")
    with pytest.raises(NotFound):
        await catalog.tag("test/missing:1", "x:1")


async def test_removing_one_of_two_images_sharing_a_layer(
    catalog: Catalog,
    two_images: tuple[str, str],
    client: RegistryClient,
    store: Store,
    tmp_path: Path,
) -> None:
    app, _ = two_images
    app_detail = await catalog.inspect(app)
    await catalog.record_origin(app, "test/app", "import", "-")
    removal = await catalog.remove("test/app:1")
    assert removal.untagged == ["test/app:1"]
    # The manifest, then the layer and config only it used; never the shared base layer.
    assert removal.deleted == [app, app_detail.layers[1].digest, app_detail.id]
    assert await IMAGES.get(store, app) is None
    with pytest.raises(BerthClientError) as raised:
        client.get_manifest("test/app", app)
    assert raised.value.code == "NOT_FOUND"
    with pytest.raises(NotFound) as unknown:
        await catalog.inspect(app)
    assert unknown.value.reason == "IMAGE_NOT_FOUND"
    assert unknown.value.details.resource_name == app
    # The other image is whole: every blob still reads back and verifies.
    tool_detail = await catalog.inspect("test/tool:1")
    for n, blob in enumerate([*(layer.digest for layer in tool_detail.layers), tool_detail.id]):
        client.pull_blob("test/tool", blob, tmp_path / f"check-{n}")
    assert [r.tag for r in await catalog.list(all=True)] == ["1"]


async def test_untag_keeps_an_image_with_other_tags_and_remove_by_id_takes_all(
    catalog: Catalog, two_images: tuple[str, str]
) -> None:
    app, _ = two_images
    await catalog.tag("test/app:1", "test/app:2")
    await catalog.tag("test/app:1", "copy/app:1")
    removal = await catalog.remove("test/app:2")
    assert (removal.untagged, removal.deleted) == (["test/app:2"], [])
    assert (await catalog.inspect(app)).repo_tags == ["copy/app:1", "test/app:1"]
    removal = await catalog.remove(app[7:19])
    assert sorted(removal.untagged) == ["copy/app:1", "test/app:1"]
    assert removal.deleted[0] == app
    assert {(r.repository, r.tag) for r in await catalog.list(all=True)} == {("test/tool", "1")}


async def test_remove_refuses_an_image_a_container_uses_unless_forced(
    catalog: Catalog, two_images: tuple[str, str], store: Store
) -> None:
    app, _ = two_images
    await run_record(store, "f" * 64, "test/app:1")
    with pytest.raises(FailedPrecondition) as raised:
        await catalog.remove("test/app:1")
    assert str(raised.value).startswith('conflict: unable to remove repository reference "test/')
    assert str(raised.value).endswith(f"image is being used by container {'f' * 12}")
    assert (await catalog.inspect("test/app:1")).digest == app  # nothing was touched
    removal = await catalog.remove("test/app:1", force=True)
    assert removal.deleted[0] == app


async def test_prune_dangling_then_all_unused(
    catalog: Catalog, client: RegistryClient, store: Store, tmp_path: Path
) -> None:
    old = push_image(client, "test/moving", "1", [BASE, APP], tmp_path)
    new = push_image(client, "test/moving", "1", [BASE, TOOL], tmp_path)
    kept = push_image(client, "test/kept", "1", [TOOL], tmp_path)
    await run_record(store, "e" * 64, "test/kept:1")
    rows = await catalog.list(all=True)
    assert {(r.repository, r.tag, r.digest) for r in rows} == {
        ("test/moving", "", old),
        ("test/moving", "1", new),
        ("test/kept", "1", kept),
    }
    assert [r.digest for r in await catalog.list(dangling_only=True)] == [old]
    old_detail = await catalog.inspect(old)

    removed, reclaimed = await catalog.prune()
    assert [r.deleted for r in removed] == [[old, sha_of_layer(old_detail, 1), old_detail.id]]
    assert reclaimed == len(old_detail.manifest) + old_detail.layers[1].size + len(
        old_detail.config
    )
    assert await catalog.list(dangling_only=True) == []

    removed, reclaimed = await catalog.prune(all=True)
    assert [r.untagged for r in removed] == [["test/moving:1"]]
    assert [r.digest for r in await catalog.list(all=True)] == [kept]
    assert reclaimed > 0


def sha_of_layer(detail, index: int) -> str:
    return detail.layers[index].digest


# --- import ------------------------------------------------------------------------------------


async def chunks_of(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
async def test_import_makes_a_one_layer_image(
    catalog: Catalog, client: RegistryClient, tmp_path: Path, compressed: bool
) -> None:
    rootfs = busybox_layer()
    upload = gzip.compress(rootfs) if compressed else rootfs
    detail = await import_tarball(
        catalog,
        chunks_of(upload, 64 * 1024),
        "test/imported:1",
        "from a tarball",
        ['CMD ["sh"]', "ENV A=1"],
        "rootfs.tar",
    )
    assert detail.repo_tags == ["test/imported:1"]
    assert detail.diff_ids == [sha(rootfs)]
    assert len(detail.layers) == 1
    assert (detail.origin, detail.origin_detail) == ("import", "rootfs.tar")
    config = json.loads(detail.config)
    assert config["config"] == {"Cmd": ["sh"], "Env": ["A=1"]}
    assert [(s.created_by, s.comment) for s in detail.history] == [
        ("Imported from rootfs.tar", "from a tarball")
    ]
    blob = tmp_path / "layer"
    client.pull_blob("test/imported", detail.layers[0].digest, blob)
    assert gzip.decompress(blob.read_bytes()) == rootfs
    assert list((tmp_path / "scratch").iterdir()) == []  # nothing left behind


async def test_import_untagged_and_hostile(
    catalog: Catalog, client: RegistryClient, tmp_path: Path
) -> None:
    detail = await import_tarball(catalog, chunks_of(BASE), "", "", [], "-")
    assert detail.repo_tags == []
    assert detail.repo_digests == [f"imported@{detail.digest}"]
    assert [r.digest for r in await catalog.list(dangling_only=True)] == [detail.digest]

    hostile = tar_of({"../../etc/cron.d/evil": b"* * * * * root sh\n"})
    with pytest.raises(UnsafeLayer) as raised:
        await import_tarball(catalog, chunks_of(hostile), "test/evil:1", "", [], "-")
    assert 'import: tar entry "../../etc/cron.d/evil"' in str(raised.value)
    with pytest.raises(InvalidArgument, match="FROM is not supported"):
        await import_tarball(catalog, chunks_of(BASE), "test/x:1", "", ["FROM x"], "-")
    with pytest.raises(InvalidArgument, match="registry host"):
        await import_tarball(catalog, chunks_of(BASE), "localhost:5000/x:1", "", [], "-")
    assert [r.repository for r in await catalog.list(all=True)] == ["imported"]
    assert list((tmp_path / "scratch").iterdir()) == []


# --- commit through a cluster ------------------------------------------------------------------


async def test_commit_a_running_container(
    catalog: Catalog,
    services: Services,
    node_agent,
    busybox: str,
    client: RegistryClient,
    tmp_path: Path,
) -> None:
    cluster = services.start("cluster")
    cluster_api = ClusterApi(cluster.address)

    script = "rm /etc/group; echo hi > /root/new; touch /tmp/ready; while true; do sleep 1; done"
    with ClusterClient(cluster.address) as c:
        wait_until(lambda: c.nodes() and c.nodes()[0].state == "ready", 30, "node")
        box = c.run(ContainerConfig(busybox, command=["sh", "-c", script]))
        try:
            wait_until(lambda: c.inspect(box.id).state == "running", 60, "container")
            with NodeClient(node_agent.address) as node:
                wait_until(lambda: ("A", "/tmp/ready") in node.changes(box.id), 30, "the script")

            stages: list[str] = []
            parent = await catalog.inspect(busybox)
            parent_cmd = json.loads(parent.config)["config"]["Cmd"]
            detail = await commit(
                catalog,
                cluster_api,
                box.name,
                "test/committed:v1",
                "berth tests",
                "removed group, added new",
                True,
                ['CMD ["cat", "/root/new"]'],
                lambda event: stages.append(event.id),
            )
            with NodeClient(node_agent.address) as node:  # exec needs it thawed
                assert node.exec(box.id, ["echo", "resumed"]).stdout == b"resumed\n"
            untagged = await commit(
                catalog, cluster_api, box.id[:12], "", "", "", False, [], lambda _: None
            )
        finally:
            c.remove(box.id, force=True)

    assert stages[0] == "resolve" and "export" in stages and stages[-1] == "write"
    assert detail.repo_tags == ["test/committed:v1"]
    assert (detail.origin, detail.origin_detail) == ("commit", box.id)
    assert [layer.digest for layer in detail.layers[:-1]] == [x.digest for x in parent.layers]
    assert detail.diff_ids[:-1] == parent.diff_ids
    config = json.loads(detail.config)
    assert config["config"]["Cmd"] == ["cat", "/root/new"]
    assert config["author"] == "berth tests"
    assert config["container"] == box.id
    top = (await catalog.history("test/committed:v1"))[0]
    assert (top.layer, top.comment, top.author) == (
        detail.layers[-1].digest,
        "removed group, added new",
        "berth tests",
    )
    assert top.created_by == f"sh -c {script}"
    out = tmp_path / "new-layer"
    client.pull_blob("test/committed", detail.layers[-1].digest, out)
    raw = gzip.decompress(out.read_bytes())
    assert sha(raw) == detail.diff_ids[-1]
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        names = tar.getnames()
    assert "etc/.wh.group" in names and "root/new" in names
    # Without a name the image stays untagged in its parent's repository.
    assert (untagged.repo_tags, untagged.repo_digests) == ([], [f"test/busybox@{untagged.digest}"])
    assert json.loads(untagged.config)["config"]["Cmd"] == parent_cmd

    with pytest.raises(InvalidArgument, match="ENTRYPOINT"):
        await commit(catalog, cluster_api, box.id, "x:1", "", "", False, ["ONBUILD RUN x"], print)
    with pytest.raises(NotFound):
        await commit(catalog, cluster_api, "no-such", "x:1", "", "", False, [], print)


async def test_prune_spares_the_build_cache(
    catalog: Catalog, client: RegistryClient, tmp_path: Path
) -> None:
    """docs/image.md: prune never removes the builder's intermediate images in
    berth/build-cache, even one whose manifest is also a tagged image prune -a removes (a
    base image the builder pushed as the state before a RUN)."""
    only_cached = push_image(client, CACHE_REPOSITORY, "t", [BASE, APP], tmp_path)
    client.delete_tag(CACHE_REPOSITORY, "t")  # the builder's images are untagged
    unused = push_image(client, "test/base", "1", [BASE, TOOL], tmp_path)
    assert push_image(client, CACHE_REPOSITORY, "t", [BASE, TOOL], tmp_path) == unused
    client.delete_tag(CACHE_REPOSITORY, "t")

    removed, _ = await catalog.prune()
    assert removed == []
    removed, _ = await catalog.prune(all=True)
    assert [r.untagged for r in removed] == [["test/base:1"]]
    for digest in (only_cached, unused):  # both still whole in the cache repository
        manifest = json.loads(client.get_manifest(CACHE_REPOSITORY, digest).content)
        for n, blob in enumerate([manifest["config"], *manifest["layers"]]):
            client.pull_blob(CACHE_REPOSITORY, blob["digest"], tmp_path / f"{digest[7:19]}-{n}")
    with pytest.raises(BerthClientError) as gone:
        client.get_manifest("test/base", "1")
    assert gone.value.code == "NOT_FOUND"


async def test_rmi_never_removes_the_build_cache_copy(
    catalog: Catalog, client: RegistryClient, tmp_path: Path
) -> None:
    """Before: `rmi <digest>` (and `rmi name:tag` of the last tag) deleted the image from
    every repository, the builder's cache repository included, so the cache records naming
    it broke. Now rmi removes the user-visible references only, as `docker rmi` leaves
    BuildKit's cache alone; naming the cache's copy itself is refused."""
    # Two built images: the builder keeps each untagged in its cache repository too.
    app = push_image(client, "test/app", "1", [BASE, APP], tmp_path)
    tool = push_image(client, "test/tool", "1", [BASE, TOOL], tmp_path)
    for digest, layers in ((app, [BASE, APP]), (tool, [BASE, TOOL])):
        assert push_image(client, CACHE_REPOSITORY, "t", layers, tmp_path) == digest
        client.delete_tag(CACHE_REPOSITORY, "t")

    by_digest = await catalog.remove(app)
    assert (by_digest.untagged, by_digest.deleted) == (["test/app:1"], [])
    by_tag = await catalog.remove("test/tool:1")
    assert (by_tag.untagged, by_tag.deleted) == (["test/tool:1", f"test/tool@{tool}"], [])
    for digest in (app, tool):  # gone from the catalog's names, whole in the cache
        with pytest.raises(NotFound):
            await catalog.inspect(f"test/app@{digest}")
        manifest = json.loads(client.get_manifest(CACHE_REPOSITORY, digest).content)
        for n, blob in enumerate([manifest["config"], *manifest["layers"]]):
            client.pull_blob(CACHE_REPOSITORY, blob["digest"], tmp_path / f"{digest[7:19]}-{n}")

    # Only the cache holds them now: by digest, id or the cache's name, rmi says where they
    # are and what removes them.
    for ref in (app, tool[7:19], f"{CACHE_REPOSITORY}@{app}"):
        with pytest.raises(FailedPrecondition) as refused:
            await catalog.remove(ref, force=True)
        assert refused.value.reason == "IMAGE_IN_BUILD_CACHE"
        assert CACHE_REPOSITORY in str(refused.value)
        assert "berth builder prune" in str(refused.value)
    assert client.get_manifest(CACHE_REPOSITORY, app).digest == app
