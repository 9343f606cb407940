"""Secrets end to end: a cluster with a secrets key, a node agent, real runc containers.

A secret goes in through the cluster, sits encrypted in etcd, reaches only the node the
container is placed on, lives in a tmpfs outside the node's data directory, is read at
/run/secrets in the container, and never shows in etcd in clear, in inspect output or on disk.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from berth.cli.main import main
from berth.client import ClusterClient, ContainerConfig, SecretClient, SecretReference
from berth.cluster.v1 import cluster_pb2, cluster_pb2_grpc, secrets_pb2, secrets_pb2_grpc
from berth.error_details import from_rpc_error
from berth.errors import BerthClientError
from berth.tls import secure_channel
from berthd.cluster.secrets import SECRETS, SecretBox, SecretCore, secret_guards
from berthd.common.errors import FailedPrecondition, NotFound, Unavailable
from berthd.common.rpc.secrets import SecretFile
from berthd.common.state.containers import CONTAINERS, DesiredContainer
from berthd.common.store import Store
from berthd.node.secrets import SecretMounts, default_dir

from .conftest import ClusterCA, NodeProcess, ServiceProcess, Services, wait_until

pytestmark = pytest.mark.integration

VALUE = b"s3cret-\xf0\x9f\x94\x91-value\n"
OTHER = b"second secret"
SLEEP = ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done"]


def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "secrets.key"
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


@pytest.fixture
def cluster(
    services: Services, node_agent: NodeProcess, registry: ServiceProcess, tmp_path: Path
) -> Iterator[ServiceProcess]:
    process = services.start("cluster", f"--secrets-key={key_file(tmp_path)}")
    with ClusterClient(process.address) as client:
        wait_until(lambda: client.nodes() and client.nodes()[0].state == "ready", 30, "the node")
    yield process
    # Through the cluster first: the node agent's own cleanup would race its converger.
    with ClusterClient(process.address) as client:
        for service in client.services():
            client.remove_service(service.id)
        for container in client.list(all=True):
            client.remove(container.id, force=True)
    # The agent's (now empty) secrets directory under /run.
    secrets_dir = default_dir(node_agent.data_dir)
    for directory in (secrets_dir, secrets_dir.parent):
        with contextlib.suppress(OSError):
            directory.rmdir()


def running(client: ClusterClient, ref: str, timeout: float = 60) -> None:
    def ready() -> bool:
        found = client.inspect(ref)
        assert found.state != "create_failed", (found.failure_reason, found.error)
        return found.state == "running"

    wait_until(ready, timeout, f"container {ref}")


def mounts() -> str:
    return Path("/proc/self/mountinfo").read_text()


def files_under(root: Path) -> Iterator[Path]:
    """Every regular file under root, not crossing into other file systems (overlay rootfs)."""
    device = root.stat().st_dev
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if os.lstat(Path(directory, d)).st_dev == device]
        for name in files:
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                yield path


def credentials(ca: ClusterCA, identity: str, name: str) -> grpc.ChannelCredentials:
    cert = ca.issue(name, identity)
    return grpc.ssl_channel_credentials(
        root_certificates=ca.ca_cert.read_bytes(),
        private_key=cert.with_suffix(".key").read_bytes(),
        certificate_chain=cert.read_bytes(),
    )


def container_secrets(address: str, creds: grpc.ChannelCredentials, container_id: str) -> object:
    """GetContainerSecrets as the certificate's principal: the reply, or (code, reason)."""
    with grpc.secure_channel(address, creds) as channel:
        stub = secrets_pb2_grpc.SecretServiceStub(channel)
        request = secrets_pb2.GetContainerSecretsRequest(container_id=container_id)
        try:
            return stub.GetContainerSecrets(request, timeout=30)
        except grpc.RpcError as err:
            return err.code(), from_rpc_error(err).reason


async def test_a_secret_reaches_only_its_container_and_never_the_disk(
    cluster: ServiceProcess,
    node_agent: NodeProcess,
    busybox: str,
    store: Store,
    cluster_ca: ClusterCA,
) -> None:
    address = cluster.address
    with SecretClient(address) as secrets, ClusterClient(address) as client:
        created = secrets.create("db-pass", VALUE, {"env": "test"})
        secrets.create("api.key", OTHER)
        assert created.created_by == "user:admin" and len(created.id) == 25
        config = ContainerConfig(
            busybox,
            name="app",
            command=SLEEP,
            secrets=[
                SecretReference("db-pass", "password", 0o400, 1000, 1000),
                SecretReference("api.key"),
            ],
        )
        box = client.run(config)
        running(client, box.id)

        # Inside: the files, their content, owners and modes, and read-only.
        shown = client.exec(box.id, ["cat", "/run/secrets/password"])
        assert shown.exit_code == 0 and shown.stdout == VALUE
        assert client.exec(box.id, ["cat", "/run/secrets/api.key"]).stdout == OTHER
        stat = client.exec(box.id, ["stat", "-c", "%n %a %u %g", *_paths("password", "api.key")])
        assert stat.stdout.decode().splitlines() == [
            "/run/secrets/password 400 1000 1000",
            "/run/secrets/api.key 444 0 0",
        ]
        write = client.exec(box.id, ["sh", "-c", "echo x > /run/secrets/password"])
        assert write.exit_code != 0 and b"Read-only file system" in write.stderr
        ls = client.exec(box.id, ["ls", "-a", "/run/secrets"]).stdout.decode().split()
        assert sorted(ls) == [".", "..", "api.key", "password"]

        # On the node: a tmpfs of its own, outside the data directory.
        tmpfs = default_dir(node_agent.data_dir) / box.id
        assert f" {tmpfs} " in mounts()
        assert not tmpfs.is_relative_to(node_agent.data_dir)
        on_disk = [p for p in files_under(node_agent.data_dir) if VALUE in p.read_bytes()]
        assert on_disk == []
        assert any(p.name == "config.json" for p in files_under(node_agent.data_dir))

        # In etcd: ciphertext only, under secrets/<name>, and nowhere in clear.
        raw = await store.get("secrets/db-pass")
        assert raw is not None
        record = json.loads(raw.value)
        assert record["cipher"] == "AES-256-GCM" and "ciphertext" in record
        assert base64.b64decode(record["ciphertext"]) != VALUE
        encoded = (VALUE, OTHER, base64.b64encode(VALUE), base64.b64encode(OTHER))
        entries = await store.list("")
        assert len(entries) > 5
        leaks = [e.key for e in entries if any(value in e.value for value in encoded)]
        assert leaks == []

        # In inspect: the references, never the values.
        with secure_channel(address) as channel:
            stub = cluster_pb2_grpc.ClusterServiceStub(channel)
            reply = stub.GetContainer(cluster_pb2.GetContainerRequest(container=box.id))
        assert [s.name for s in reply.container.spec.secrets] == ["db-pass", "api.key"]
        assert VALUE not in reply.SerializeToString() and OTHER not in reply.SerializeToString()
        assert [s.name for s in secrets.list()] == ["api.key", "db-pass"]

        # Only the placement node gets the values: not another node, not the administrator.
        node_id = node_agent.node_id
        own = container_secrets(address, credentials(cluster_ca, f"node:{node_id}", "own"), box.id)
        assert isinstance(own, secrets_pb2.GetContainerSecretsResponse)
        assert [(s.reference.target, s.data) for s in own.secrets] == [
            ("password", VALUE),
            ("api.key", OTHER),
        ]
        assert own.secrets[1].reference.mode == 0o444
        other = credentials(cluster_ca, "node:other-node", "other-node")
        admin = credentials(cluster_ca, "user:admin", "admin")
        for creds in (other, admin):
            assert container_secrets(address, creds, box.id) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "NOT_THE_CONTAINERS_NODE",
            )

        # In use: not removable (Docker's rule).
        with pytest.raises(BerthClientError) as refused:
            secrets.remove("db-pass")
        assert refused.value.code == "FAILED_PRECONDITION"
        assert refused.value.reason == "SECRET_IN_USE"
        assert "in use by container app" in refused.value.message

        # Removed with its container: the tmpfs goes, then the secret may.
        client.remove(box.id, force=True)
        assert f" {tmpfs} " not in mounts() and not tmpfs.exists()
        secrets.remove("db-pass")
        secrets.remove(secrets.list()[0].id[:8])  # by id prefix
        assert secrets.list() == []
        assert await store.get("secrets/db-pass") is None


def _paths(*names: str) -> list[str]:
    return [f"/run/secrets/{name}" for name in names]


async def test_a_spec_naming_a_missing_secret_is_refused_and_services_hold_theirs(
    cluster: ServiceProcess, busybox: str, services: Services, tmp_path: Path
) -> None:
    address = cluster.address
    with SecretClient(address) as secrets, ClusterClient(address) as client:
        missing = ContainerConfig(busybox, command=["true"], secrets=[SecretReference("nope")])
        for call in (
            lambda: client.run(missing),
            lambda: client.create_service("svc", missing, replicas=0),
        ):
            with pytest.raises(BerthClientError) as refused:
                call()
            assert (refused.value.code, refused.value.reason) == ("NOT_FOUND", "SECRET_NOT_FOUND")
            assert "no such secret: nope" in refused.value.message
        assert client.list(all=True) == [] and client.services() == []

        secrets.create("tls", b"key material")
        with pytest.raises(BerthClientError) as taken:
            secrets.create("tls", b"again")
        assert (taken.value.code, taken.value.reason) == ("ALREADY_EXISTS", "SECRET_NAME_IN_USE")
        for name, data, words in (
            ("-bad", b"x", "invalid secret name"),
            ("big", b"x" * (500 * 1024 + 1), "at most 500 KiB"),
            ("empty", b"", "must not be empty"),
        ):
            with pytest.raises(BerthClientError, match=words) as bad:
                secrets.create(name, data)
            assert (bad.value.code, bad.value.reason) == ("INVALID_ARGUMENT", "INVALID_SECRET_SPEC")

        template = ContainerConfig(busybox, command=["true"], secrets=[SecretReference("tls")])
        client.create_service("web", template, replicas=0)
        with pytest.raises(BerthClientError, match="in use by service web") as held:
            secrets.remove("tls")
        assert held.value.reason == "SECRET_IN_USE"
        with secure_channel(address) as channel:
            stub = cluster_pb2_grpc.ClusterServiceStub(channel)
            current = stub.GetService(cluster_pb2.GetServiceRequest(service="web")).service
            current.spec.template.secrets.add(name="nope")
            update = cluster_pb2.UpdateServiceRequest(
                service=current.id, spec=current.spec, version=current.version
            )
            with pytest.raises(grpc.RpcError) as unknown:
                stub.UpdateService(update)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert from_rpc_error(unknown.value).reason == "SECRET_NOT_FOUND"
        client.remove_service("web")

        # A cluster instance without a key lists and removes, but cannot seal.
        keyless = services.start("cluster")
        with SecretClient(keyless.address) as other:
            assert [s.name for s in other.list()] == ["tls"]
            with pytest.raises(BerthClientError) as no_key:
                other.create("new", b"x")
            assert (no_key.value.code, no_key.value.reason) == (
                "FAILED_PRECONDITION",
                "SECRETS_KEY_MISSING",
            )
            other.remove("tls")
        keyless.stop()

        # The CLI: create from a file and from stdin, ls as a table and as JSON, rm.
        value = tmp_path / "value"
        value.write_bytes(b"from a file")
        assert main(["--host", address, "secret", "create", "cli-one", str(value)]) == 0
        assert main(["--host", address, "--format", "json", "secret", "ls"]) == 0
        assert main(["--host", address, "secret", "rm", "cli-one", "absent"]) == 1
        assert secrets.list() == []


async def test_a_secret_the_cluster_cannot_open_fails_the_creation(
    cluster: ServiceProcess, busybox: str, store: Store
) -> None:
    address = cluster.address
    with SecretClient(address) as secrets, ClusterClient(address) as client:
        secrets.create("db-pass", VALUE)
        # Someone with write access to etcd alters the ciphertext: it no longer opens.
        entry = await store.get("secrets/db-pass")
        assert entry is not None
        record = json.loads(entry.value)
        raw = bytearray(base64.b64decode(record["ciphertext"]))
        raw[0] ^= 0xFF
        record["ciphertext"] = base64.b64encode(bytes(raw)).decode()
        await store.put("secrets/db-pass", json.dumps(record).encode())

        config = ContainerConfig(busybox, command=SLEEP, secrets=[SecretReference("db-pass")])
        box = client.run(config)
        deadline = time.monotonic() + 60
        while (found := client.inspect(box.id)).state != "create_failed":
            assert found.state in ("pending",), found
            assert time.monotonic() < deadline, "no CREATE_FAILED"
            time.sleep(0.1)
        assert found.failure_reason == "SECRET_UNAVAILABLE"
        assert "secret db-pass does not decrypt" in found.error
        assert VALUE.decode() not in found.error


async def test_a_removal_and_an_acceptance_that_race_never_both_win(store: Store) -> None:
    """RemoveSecret's delete compares that no container or service record changed since it
    looked for users; an acceptance compares that the secret is still there (real etcd)."""
    core = SecretCore(store, SecretBox(os.urandom(32)))
    await core.create("db", b"value", {}, "user:test")
    config = ContainerConfig("busybox", command=["true"], secrets=[SecretReference("db")])
    late = DesiredContainer(id="a" * 64, name="late", node="n1", config=config)

    users, unchanged = await core.users("db")
    assert users == []
    guards = await secret_guards(store, [config])  # a RunContainer, accepted meanwhile
    ok, _ = await store.txn(guards, [CONTAINERS.op_put(store, late.id, late)])
    assert ok
    ok, _ = await store.txn(unchanged, [SECRETS.op_delete(store, "db")])
    assert not ok  # the removal that looked before the acceptance loses
    with pytest.raises(FailedPrecondition, match="in use by container late"):
        await core.remove("db")

    await CONTAINERS.delete(store, late.id)
    guards = await secret_guards(store, [config])
    await core.remove("db")  # removed after the acceptance read the secret
    ok, _ = await store.txn(guards, [CONTAINERS.op_put(store, late.id, late)])
    assert not ok
    with pytest.raises(NotFound, match="no such secret: db"):
        await secret_guards(store, [config])


async def test_the_node_mounts_fills_and_releases_a_tmpfs_per_container(tmp_path: Path) -> None:
    files = [
        SecretFile("db", "pw", 0o400, 1000, 1001, VALUE),
        SecretFile("k", "k", 0o444, 0, 0, b""),
    ]

    async def fetch(container_id: str) -> list[SecretFile]:
        if container_id.startswith("f"):
            raise Unavailable("cannot reach the cluster at 127.0.0.1:1 (connection refused)")
        return files

    mounts_ = SecretMounts(tmp_path / "run" / "secrets", fetch)
    refs = [SecretReference("db", "pw", 0o400, 1000, 1001), SecretReference("k")]
    kept, stale, failing = "a" * 64, "b" * 64, "f" * 64
    try:
        path = await mounts_.ensure(kept, "app", refs)
        assert path is not None and path.is_mount() and f" {path} " in mounts()
        assert (path / "pw").read_bytes() == VALUE
        info = (path / "pw").stat()
        assert (info.st_mode & 0o7777, info.st_uid, info.st_gid) == (0o400, 1000, 1001)
        assert (path / "k").stat().st_mode & 0o7777 == 0o444
        with pytest.raises(OSError, match="Read-only file system"):
            (path / "new").write_text("x")
        assert await mounts_.ensure(kept, "app", refs) == path  # a restart reuses it
        assert await mounts_.ensure(kept, "app", []) is None  # no secrets: nothing to mount

        with pytest.raises(FailedPrecondition, match="cannot get the secrets") as refused:
            await mounts_.ensure(failing, "box", refs)
        assert refused.value.reason == "SECRET_UNAVAILABLE"
        assert "connection refused" in str(refused.value)
        assert not mounts_.path(failing).exists()
        with pytest.raises(FailedPrecondition, match="sent no value for other"):
            await mounts_.ensure(stale, "box", [SecretReference("other")])

        # An agent that starts again releases what it no longer has.
        await mounts_.ensure(stale, "old", refs)
        mounts_.sweep([kept])
        assert not mounts_.path(stale).exists() and mounts_.mounted(kept)
        mounts_.release(kept)
        assert not mounts_.path(kept).exists() and f" {path} " not in mounts()
    finally:
        for container in (kept, stale, failing):
            mounts_.release(container)
