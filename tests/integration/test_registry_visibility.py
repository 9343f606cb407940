"""Repository visibility and repository-scoped tokens, over real TLS against a real registry.

Anonymous callers use the registry's public port with no client certificate; token callers
the same port with `authorization: Bearer <token>`; the test's own `user:admin` certificate
(mutual TLS on the main port) sets things up. Tokens are written straight to the test's etcd
prefix, as `berth token create` would.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from berth.cli.main import main
from berth.client import RegistryClient
from berth.registry.v1 import registry_pb2 as pb
from berth.registry.v1 import registry_pb2_grpc
from berthd.common.security.tokens import TOKENS, new_token
from berthd.common.store import Store

from .conftest import ServiceProcess, Services

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

Metadata = tuple[tuple[str, str], ...]


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image(layer: bytes) -> tuple[bytes, list[bytes]]:
    """An OCI manifest for one layer: (manifest, [config, layer])."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": sha(layer), "size": len(layer)}],
        }
    ).encode()
    return manifest, [config, layer]


class Caller:
    """A registry stub on the public port: anonymous, or with a bearer token."""

    def __init__(self, address: str, token: str | None = None) -> None:
        ca = Path(os.environ["BERTH_TLS_CA"]).read_bytes()
        self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca))
        self.stub = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self.metadata: Metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def __getattr__(self, method: str) -> Callable[..., object]:
        call = getattr(self.stub, method)
        return lambda request, **kw: call(request, metadata=self.metadata, timeout=30, **kw)

    def upload(self, repository: str, data: bytes) -> str:
        upload_id = self.StartUpload(pb.StartUploadRequest(repository=repository)).upload_id
        self.WriteUpload(iter([pb.WriteUploadRequest(upload_id=upload_id, offset=0, data=data)]))
        self.CommitUpload(pb.CommitUploadRequest(upload_id=upload_id, digest=sha(data)))
        return sha(data)

    def push(self, repository: str, tag: str, layer: bytes) -> str:
        manifest, blobs = image(layer)
        for blob in blobs:
            self.upload(repository, blob)
        request = pb.PutManifestRequest(
            repository=repository, reference=tag, media_type=OCI_MANIFEST, content=manifest
        )
        return self.PutManifest(request).digest

    def pull(self, repository: str, tag: str) -> bytes:
        """The image's layer, read as a client pulls: manifest, then blob."""
        got = self.GetManifest(pb.GetManifestRequest(repository=repository, reference=tag))
        layer = json.loads(got.content)["layers"][0]["digest"]
        chunks = self.ReadBlob(pb.ReadBlobRequest(repository=repository, digest=layer))
        return b"".join(c.data for c in chunks)

    def names(self) -> list[str]:
        """Every repository ListRepositories shows, one per page, so tokens are exercised."""
        names: list[str] = []
        token = ""
        while True:
            page = self.ListRepositories(pb.ListRepositoriesRequest(page_size=1, page_token=token))
            names += [r.name for r in page.repositories]
            assert page.repositories or not names, "an empty page after the first"
            token = page.next_page_token
            if not token:
                return names

    def found(self, term: str = "") -> list[str]:
        return [r.name for r in self.Search(pb.SearchRequest(term=term)).results]

    def close(self) -> None:
        self.channel.close()


def refused(code: grpc.StatusCode, call: Callable[[], object]) -> str:
    with pytest.raises(grpc.RpcError) as failed:
        result = call()
        if isinstance(result, Iterator):  # a server stream fails when read
            list(result)
    assert failed.value.code() == code, failed.value.details()
    return failed.value.details() or ""


def eventually(check: Callable[[], bool], what: str, timeout: float = 3.0) -> float:
    """Seconds until check() holds (a visibility change shows within a couple of seconds)."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"{what} not within {timeout}s"
        time.sleep(0.05)
    return time.monotonic() - start


async def make_token(store: Store, name: str, role: str, *repositories: str) -> str:
    record, token = new_token(name, role, list(repositories), 0, "user:admin")
    await TOKENS.put(store, record.id, record)
    return token


@pytest.fixture
def admin(registry: ServiceProcess) -> Iterator[RegistryClient]:
    with RegistryClient(registry.address) as client:
        yield client


UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
DENIED = grpc.StatusCode.PERMISSION_DENIED


def test_anonymous_callers_find_and_pull_public_repositories_only(
    registry: ServiceProcess, admin: RegistryClient, tmp_path: Path
) -> None:
    layers = {name: os.urandom(2048) for name in ("lib/open", "lib/secret", "team/hidden")}
    for name, layer in layers.items():
        path = tmp_path / name.replace("/", "-")
        manifest, blobs = image(layer)
        for blob in blobs:
            path.write_bytes(blob)
            admin.push_blob(name, path, sha(blob), len(blob))
        admin.put_manifest(name, "1", OCI_MANIFEST, manifest)
    assert admin.get_repository("lib/open").visibility == "private"  # private by default
    opened = admin.update_repository("lib/open", description="open to all", visibility="public")
    assert (opened.visibility, opened.description) == ("public", "open to all")
    # Other updates leave the visibility alone.
    assert admin.update_repository("lib/open", labels={"k": "v"}).visibility == "public"

    anonymous = Caller(registry.public_address)
    try:
        # Listings and search show the public repository, never a private one.
        assert anonymous.names() == ["lib/open"]
        assert anonymous.found() == ["lib/open"]
        assert anonymous.found("lib") == ["lib/open"]
        assert anonymous.found("secret") == []
        assert anonymous.found("hidden") == []
        manifests = anonymous.ListManifests(pb.ListManifestsRequest(repository="lib/open"))
        assert [m.repository for m in manifests.manifests] == ["lib/open"]
        # Every repository's manifests at once: only for callers with a credential.
        refused(UNAUTHENTICATED, lambda: anonymous.ListManifests(pb.ListManifestsRequest()))
        # The admin sees everything, with each visibility.
        everything = {r.name: r.visibility for r in admin.iter_repositories()}
        assert everything == {
            "lib/open": "public",
            "lib/secret": "private",
            "team/hidden": "private",
        }

        # Pull the public image, end to end.
        assert anonymous.pull("lib/open", "1") == layers["lib/open"]
        repo = anonymous.GetRepository(pb.GetRepositoryRequest(repository="lib/open")).repository
        assert repo.visibility == pb.VISIBILITY_PUBLIC and repo.tag_count == 1
        tags = anonymous.ListTags(pb.ListTagsRequest(repository="lib/open")).tags
        assert [t.name for t in tags] == ["1"]
        layer = sha(layers["lib/open"])
        stat = anonymous.StatBlob(pb.StatBlobRequest(repository="lib/open", digest=layer))
        assert stat.descriptor.size == 2048
        # A batch read shows the public manifest and nothing of the private one.
        batch = pb.BatchGetManifestsRequest(
            manifests=[
                pb.ManifestName(repository=name, digest=sha(image(layers[name])[0]))
                for name in ("lib/open", "lib/secret")
            ],
            include_configs=True,
        )
        results = anonymous.BatchGetManifests(batch).results
        assert [(r.repository, r.found) for r in results] == [
            ("lib/open", True),
            ("lib/secret", False),
        ]
        assert results[0].config == image(layers["lib/open"])[1][0]
        assert (results[1].content, results[1].config) == (b"", b"")

        # A private repository answers as one that does not exist: authenticate first.
        secret = sha(layers["lib/secret"])
        for call in (
            lambda: anonymous.pull("lib/secret", "1"),
            lambda: anonymous.ReadBlob(pb.ReadBlobRequest(repository="lib/secret", digest=secret)),
            lambda: anonymous.StatBlob(pb.StatBlobRequest(repository="lib/secret", digest=secret)),
            lambda: anonymous.ListTags(pb.ListTagsRequest(repository="lib/secret")),
            lambda: anonymous.GetRepository(pb.GetRepositoryRequest(repository="lib/secret")),
            lambda: anonymous.ListManifests(pb.ListManifestsRequest(repository="lib/secret")),
        ):
            assert "authentication required" in refused(UNAUTHENTICATED, call)
        missing = refused(
            UNAUTHENTICATED,
            lambda: anonymous.GetRepository(pb.GetRepositoryRequest(repository="no/such")),
        )
        private = refused(
            UNAUTHENTICATED,
            lambda: anonymous.GetRepository(pb.GetRepositoryRequest(repository="lib/secret")),
        )
        assert missing.replace("no/such", "X") == private.replace("lib/secret", "X")
        # Public is pull only: pushing, mounting and changing it need a credential.
        refused(
            UNAUTHENTICATED,
            lambda: anonymous.StartUpload(pb.StartUploadRequest(repository="lib/open")),
        )
        refused(
            UNAUTHENTICATED,
            lambda: anonymous.MountBlob(
                pb.MountBlobRequest(repository="lib/open", digest=secret, from_repository="x/y")
            ),
        )
        refused(
            UNAUTHENTICATED,
            lambda: anonymous.UpdateRepository(
                pb.UpdateRepositoryRequest(repository="lib/open", visibility=pb.VISIBILITY_PRIVATE)
            ),
        )

        # Public, then private again: the change takes effect at once on this instance.
        admin.update_repository("lib/open", visibility="private")
        refused(UNAUTHENTICATED, lambda: anonymous.pull("lib/open", "1"))
        assert anonymous.names() == [] and anonymous.found() == []
        admin.update_repository("lib/secret", visibility="public")
        assert anonymous.pull("lib/secret", "1") == layers["lib/secret"]
        assert anonymous.names() == ["lib/secret"]
    finally:
        anonymous.close()


def test_a_visibility_change_reaches_other_instances_within_seconds(
    services: Services, registry: ServiceProcess, admin: RegistryClient, tmp_path: Path
) -> None:
    layer = os.urandom(512)
    manifest, blobs = image(layer)
    for blob in blobs:
        path = tmp_path / "blob"
        path.write_bytes(blob)
        admin.push_blob("lib/app", path, sha(blob), len(blob))
    admin.put_manifest("lib/app", "1", OCI_MANIFEST, manifest)
    # A second instance over the same blobs and etcd, as a load balancer would spread calls.
    other = services.registry(tmp_path / "registry-data")
    anonymous = Caller(other.public_address)
    try:
        refused(UNAUTHENTICATED, lambda: anonymous.pull("lib/app", "1"))  # now cached: private
        admin.update_repository("lib/app", visibility="public")

        def pullable() -> bool:
            try:
                return anonymous.pull("lib/app", "1") == layer
            except grpc.RpcError as exc:
                assert exc.code() == UNAUTHENTICATED
                return False

        assert eventually(pullable, "public on the other instance") < 2.5
        admin.update_repository("lib/app", visibility="private")
        assert eventually(lambda: not pullable(), "private on the other instance") < 2.5
    finally:
        anonymous.close()


async def test_tokens_push_and_pull_only_where_their_role_and_scope_allow(
    registry: ServiceProcess, admin: RegistryClient, store: Store, tmp_path: Path
) -> None:
    developer = Caller(
        registry.public_address, await make_token(store, "ci", "developer", "team/*")
    )
    reader = Caller(registry.public_address, await make_token(store, "viewer", "reader"))
    anonymous = Caller(registry.public_address)
    other_layer = os.urandom(1024)
    manifest, blobs = image(other_layer)
    for blob in blobs:
        path = tmp_path / "blob"
        path.write_bytes(blob)
        admin.push_blob("other/x", path, sha(blob), len(blob))
    admin.put_manifest("other/x", "1", OCI_MANIFEST, manifest)
    try:
        # The developer pushes to its scope and pulls back what it pushed.
        layer = os.urandom(4096)
        digest = developer.push("team/app", "1", layer)
        assert developer.pull("team/app", "1") == layer
        assert admin.get_manifest("team/app", "1").digest == digest

        # Outside its scope: refused, as a known caller (PERMISSION_DENIED).
        message = refused(
            DENIED, lambda: developer.StartUpload(pb.StartUploadRequest(repository="other/x"))
        )
        assert "repository:push on other/x" in message
        manifest = admin.get_manifest("other/x", "1").content
        refused(
            DENIED,
            lambda: developer.PutManifest(
                pb.PutManifestRequest(
                    repository="other/x", reference="2", media_type=OCI_MANIFEST, content=manifest
                )
            ),
        )
        refused(DENIED, lambda: developer.pull("other/x", "1"))
        assert "other/x" not in developer.names() and "team/app" in developer.names()
        assert developer.found("other") == []
        token = ""
        listed: list[str] = []
        while True:
            request = pb.ListManifestsRequest(page_size=1, page_token=token)
            page = developer.ListManifests(request)
            listed += [m.repository for m in page.manifests]
            token = page.next_page_token
            if not token:
                break
        assert listed == ["team/app"]

        # Another caller's upload session in other/x: no write, look, commit or cancel.
        admin_stub = registry_pb2_grpc.RegistryServiceStub(
            grpc.secure_channel(registry.address, admin_credentials())
        )
        session = admin_stub.StartUpload(pb.StartUploadRequest(repository="other/x")).upload_id
        data = b"not yours"
        refused(
            DENIED,
            lambda: developer.WriteUpload(
                iter([pb.WriteUploadRequest(upload_id=session, offset=0, data=data)])
            ),
        )
        refused(DENIED, lambda: developer.GetUpload(pb.GetUploadRequest(upload_id=session)))
        refused(
            DENIED,
            lambda: developer.CommitUpload(
                pb.CommitUploadRequest(upload_id=session, digest=sha(data))
            ),
        )
        refused(DENIED, lambda: developer.CancelUpload(pb.CancelUploadRequest(upload_id=session)))
        refused(
            UNAUTHENTICATED, lambda: anonymous.GetUpload(pb.GetUploadRequest(upload_id=session))
        )
        # The session is untouched: its owner writes and commits it.
        admin_stub.WriteUpload(
            iter([pb.WriteUploadRequest(upload_id=session, offset=0, data=data)])
        )
        admin_stub.CommitUpload(pb.CommitUploadRequest(upload_id=session, digest=sha(data)))
        # An unknown session is just unknown.
        refused(
            grpc.StatusCode.NOT_FOUND,
            lambda: developer.GetUpload(pb.GetUploadRequest(upload_id="0" * 32)),
        )

        # Mounting reads the source: not from a private repository out of scope, named or not.
        secret = sha(other_layer)
        refused(
            DENIED,
            lambda: developer.MountBlob(
                pb.MountBlobRequest(repository="team/app", digest=secret, from_repository="other/x")
            ),
        )
        anywhere = developer.MountBlob(pb.MountBlobRequest(repository="team/app", digest=secret))
        assert not anywhere.mounted
        refused(
            grpc.StatusCode.NOT_FOUND,
            lambda: developer.StatBlob(pb.StatBlobRequest(repository="team/app", digest=secret)),
        )
        # From a repository in scope, it mounts.
        mine = sha(layer)
        mounted = developer.MountBlob(
            pb.MountBlobRequest(repository="team/copy", digest=mine, from_repository="team/app")
        )
        assert mounted.mounted
        # Once other/x is public, its blobs may be mounted, by name or not.
        admin.update_repository("other/x", visibility="public")
        anywhere = developer.MountBlob(pb.MountBlobRequest(repository="team/app", digest=secret))
        assert anywhere.mounted
        assert developer.pull("other/x", "1") == other_layer
        assert "other/x" in developer.names() and developer.found("other") == ["other/x"]

        # A reader pulls anything, pushes nothing, changes nothing.
        assert reader.pull("team/app", "1") == layer
        for call in (
            lambda: reader.StartUpload(pb.StartUploadRequest(repository="team/app")),
            lambda: reader.push("team/app", "2", b"x"),
            lambda: reader.UpdateRepository(
                pb.UpdateRepositoryRequest(repository="team/app", visibility=pb.VISIBILITY_PUBLIC)
            ),
            lambda: reader.UpdateRepository(
                pb.UpdateRepositoryRequest(repository="team/app", description="mine now")
            ),
            lambda: reader.GetUpload(pb.GetUploadRequest(upload_id=session)),
        ):
            refused(DENIED, call)
        # Neither may the developer change a repository (that needs repository:delete).
        refused(
            DENIED,
            lambda: developer.UpdateRepository(
                pb.UpdateRepositoryRequest(repository="team/app", visibility=pb.VISIBILITY_PUBLIC)
            ),
        )
        assert admin.get_repository("team/app").visibility == "private"
        # A bad token is no credential at all.
        stranger = Caller(registry.public_address, "berth_0123456789abcdef_" + "x" * 43)
        refused(UNAUTHENTICATED, lambda: stranger.found())
        stranger.close()
    finally:
        for caller in (developer, reader, anonymous):
            caller.close()


def test_cli_sets_and_shows_visibility(
    registry: ServiceProcess,
    admin: RegistryClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest, blobs = image(b"layer")
    for blob in blobs:
        path = tmp_path / "blob"
        path.write_bytes(blob)
        admin.push_blob("demo/app", path, sha(blob), len(blob))
    admin.put_manifest("demo/app", "1", OCI_MANIFEST, manifest)
    at = ["--registry", registry.address]
    assert main(["registry", "set", "demo/app", "--visibility", "public", *at]) == 0
    out = capsys.readouterr().out
    assert [line.split() for line in out.splitlines() if line.startswith("Visibility")] == [
        ["Visibility:", "public"]
    ]
    assert admin.get_repository("demo/app").visibility == "public"
    assert main(["registry", "ls", *at]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split()[:2] == ["NAME", "VISIBILITY"] and row.split()[:2] == [
        "demo/app",
        "public",
    ]
    assert main(["registry", "set", "demo/app", "--visibility", "private", *at]) == 0
    capsys.readouterr()
    assert main(["registry", "inspect", "demo/app", "--format", "json", *at]) == 0
    assert json.loads(capsys.readouterr().out)["visibility"] == "private"
    anonymous = Caller(registry.public_address)
    try:
        assert anonymous.names() == []
    finally:
        anonymous.close()


def admin_credentials() -> grpc.ChannelCredentials:
    """The test's `user:admin` certificate, for the mutual-TLS port."""
    return grpc.ssl_channel_credentials(
        Path(os.environ["BERTH_TLS_CA"]).read_bytes(),
        Path(os.environ["BERTH_TLS_KEY"]).read_bytes(),
        Path(os.environ["BERTH_TLS_CERT"]).read_bytes(),
    )
