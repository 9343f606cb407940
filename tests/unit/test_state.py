"""The typed etcd records of berthd.common.state, without etcd: keys, encode/decode round trips,
the JSON the services wrote before the modules existed, unknown fields, and which keys a
family claims."""

from __future__ import annotations

import json
from typing import Any

import pytest

from berthd.common.containers import ContainerConfig
from berthd.common.oci.manifest import Descriptor
from berthd.common.state.build_cache import BUILD_CACHE, CacheRecord
from berthd.common.state.containers import (
    CONTAINERS,
    STATUSES,
    STOPPED,
    ContainerStatus,
    DesiredContainer,
)
from berthd.common.state.endpoints import ENDPOINTS, EndpointRecord, endpoint_key
from berthd.common.state.family import Change, Family
from berthd.common.state.images import (
    BUILDS,
    IMAGES,
    ORIGIN_BUILD,
    BuildRecord,
    ImageOrigin,
    origin_of,
)
from berthd.common.state.nodes import NODE_LAYERS, NODES, NodeLayers, NodeRecord
from berthd.common.store import Entry, WatchEvent

CID = "c" * 64
DIGEST = "sha256:" + "d" * 64


def with_unknown(raw: bytes, **extra: Any) -> bytes:
    return json.dumps({**json.loads(raw), **extra}).encode()


# Keys ------------------------------------------------------------------------------------------


def test_every_family_builds_and_parses_its_keys() -> None:
    assert CONTAINERS.key(CID) == f"cluster/containers/{CID}"
    assert STATUSES.key(CID) == f"containers/{CID}/status"
    assert NODES.key("n1") == "nodes/n1"
    assert NODE_LAYERS.key("n1") == "cluster/node-layers/n1"
    assert endpoint_key("registry", "host-1") == "endpoints/registry/host-1"
    assert IMAGES.key(DIGEST) == f"images/{DIGEST}"
    assert BUILDS.key(DIGEST) == f"builds/{DIGEST}"
    assert BUILD_CACHE.key("k" * 64) == "build-cache/" + "k" * 64
    families: list[Family[Any]] = [CONTAINERS, STATUSES, NODES, NODE_LAYERS, IMAGES, BUILDS]
    for family in families:
        assert family.id_of(family.key("x1")) == "x1"
    assert ENDPOINTS.id_of("endpoints/registry/host-1") == "registry/host-1"


def test_a_family_claims_only_its_own_keys() -> None:
    assert STATUSES.id_of(f"cluster/containers/{CID}") is None
    assert STATUSES.id_of(f"containers/{CID}") is None
    assert STATUSES.id_of(f"containers/{CID}/other") is None
    assert STATUSES.id_of("containers/a/b/status") is None
    assert STATUSES.id_of("containers//status") is None
    assert CONTAINERS.id_of(f"containers/{CID}/status") is None
    assert NODES.id_of("cluster/node-layers/n1") is None
    assert NODE_LAYERS.id_of("nodes/n1") is None
    assert NODES.id_of("nodes/") is None
    assert IMAGES.id_of(f"builds/{DIGEST}") is None


@pytest.mark.parametrize("bad", ["", "a/b"])
def test_keys_refuse_ids_that_would_leave_the_family(bad: str) -> None:
    with pytest.raises(ValueError):
        STATUSES.key(bad)
    with pytest.raises(ValueError):
        endpoint_key(bad, "host-1")
    with pytest.raises(ValueError):
        NODES.key("")


# Desired containers and their statuses ---------------------------------------------------------


def desired() -> DesiredContainer:
    config = ContainerConfig(image="busybox", name="web", command=["sleep", "9"])
    return DesiredContainer(
        id=CID, name="web", node="n1", config=config, desired=STOPPED, cpu_millis=250,
        constraints=["node.labels.zone==a"], service="s1", slot=2, scheduled_at=5.0,
        service_version=3, previous_node="n0",
    )  # fmt: skip


def test_desired_container_round_trip_and_unknown_fields() -> None:
    record = desired()
    assert DesiredContainer.decode(record.encode()) == record
    assert DesiredContainer.decode(with_unknown(record.encode(), future="x")) == record
    assert CONTAINERS.decode(CID, record.encode()) == record


def test_desired_container_reads_the_json_the_cluster_wrote() -> None:
    raw = (
        b'{"id":"' + CID.encode() + b'","name":"web","node":"n1","config":{"image":"busybox",'
        b'"name":"web","entrypoint":[],"command":["sleep","9"],"env":[],"working_dir":"",'
        b'"user":"","hostname":"","labels":{},"mounts":[],"read_only_rootfs":false,'
        b'"memory_bytes":0,"cpu_millis":0,"cpu_shares":0,"pids_limit":0,'
        b'"restart_policy":"no","restart_max_retries":0,"network_mode":"none"},'
        b'"desired":"stopped","cpu_millis":250,"memory_bytes":0,'
        b'"constraints":["node.labels.zone==a"],"service":"s1","slot":2,"scheduled_at":5.0,'
        b'"service_version":3,"previous_node":"n0"}'
    )
    assert DesiredContainer.decode(raw) == desired()


def test_status_round_trip_and_the_shapes_nodes_wrote() -> None:
    status = ContainerStatus(
        node="n1", name="web", state="running", pid=42, started_at=5.0, restart_count=1,
        image_digest=DIGEST, updated_at=6.0,
    )  # fmt: skip
    assert ContainerStatus.decode(status.encode()) == status
    assert ContainerStatus.decode(with_unknown(status.encode(), cgroup="x")) == status
    # What node/containers.py wrote: every field, sorted keys.
    written = (
        b'{"error":"","exit_code":137,"finished_at":9.5,"image_digest":"' + DIGEST.encode() + b'",'
        b'"name":"web","node":"n1","oom_killed":true,"pid":0,"restart_count":0,'
        b'"started_at":5.0,"state":"exited","updated_at":10.0}'
    )
    exited = ContainerStatus.decode(written)
    assert (exited.state, exited.exit_code, exited.oom_killed) == ("exited", 137, True)
    assert (exited.finished_at, exited.image_digest) == (9.5, DIGEST)
    # What node/converge.py wrote (before failures had a reason) for a container it could not
    # create, and for one whose start failed.
    failed = ContainerStatus.decode(
        b'{"error":"no such image","name":"web","node":"n1","state":"","updated_at":1.0}'
    )
    assert (failed.state, failed.failure_reason, failed.failure_message, failed.pid) == (
        "create_failed", "CREATE_FAILED", "no such image", 0,
    )  # fmt: skip
    assert failed.create_failed and failed.started_at is None
    start = ContainerStatus.decode(b'{"error":"exec failed","state":"exited","updated_at":1.0}')
    assert (start.state, start.failure_reason) == ("exited", "START_FAILED")
    # What it writes now: the state CREATE_FAILED with a reason, and the attempt it made.
    now = ContainerStatus(
        node="n1", state="create_failed", failure_reason="IMAGE_NOT_FOUND",
        failure_message="no such image", attempt=2, updated_at=1.0,
    )  # fmt: skip
    assert ContainerStatus.decode(now.encode()) == now and now.create_failed
    # Nulls read as zero values.
    assert ContainerStatus.decode(b'{"exit_code":null,"pid":null}').exit_code == 0


# Nodes -----------------------------------------------------------------------------------------


def test_node_record_round_trip_and_the_json_agents_wrote() -> None:
    raw = (
        b'{"address":"127.0.0.1:5060","cpus":4,"id":"n1","labels":{"zone":"a"},'
        b'"memory_bytes":1024,"runtime_version":"runc 1.1","version":"0.1.0"}'
    )
    record = NodeRecord("n1", "127.0.0.1:5060", {"zone": "a"}, 4, 1024, "0.1.0", "runc 1.1")
    assert NodeRecord.decode(raw) == record
    assert record.encode() == raw
    assert NodeRecord.decode(with_unknown(raw, gpus=2)) == record
    # The key names a record that does not name itself.
    assert NODES.decode("n2", b'{"cpus":2}') == NodeRecord("n2", cpus=2)


def test_node_layers_are_a_plain_object() -> None:
    raw = b'{"sha256:aa":10,"sha256:bb":20}'
    layers = NodeLayers.decode(raw)
    assert layers == NodeLayers({"sha256:aa": 10, "sha256:bb": 20})
    assert layers.encode() == raw
    with pytest.raises(ValueError):
        NodeLayers.decode(b"[]")


# Endpoints -------------------------------------------------------------------------------------


def test_endpoint_round_trip_and_the_json_servers_wrote() -> None:
    raw = (
        b'{"address":"10.0.0.1:5050","instance":"host-1","metrics":"http://x/metrics",'
        b'"pid":7,"public_address":"10.0.0.1:5051","service":"registry","started_at":1.5,'
        b'"version":"0.1"}'
    )
    record = ENDPOINTS.decode("registry/host-1", raw)
    assert record == EndpointRecord(
        "registry", "host-1", "10.0.0.1:5050", "http://x/metrics", 7, "0.1", 1.5, "10.0.0.1:5051"
    )
    assert record.encode() == raw and record.id == "registry/host-1"
    assert ENDPOINTS.decode("registry/host-1", with_unknown(raw, zone="a")) == record
    # The key wins over the value.
    assert ENDPOINTS.decode("image/i2", raw).service == "image"
    # A registry serving the OCI HTTP API says where.
    served = EndpointRecord("registry", "host-1", "10.0.0.1:5050", http_url="http://10.0.0.1:5000")
    assert ENDPOINTS.decode("registry/host-1", served.encode()) == served


# Images and builds -----------------------------------------------------------------------------


def test_image_origin_and_build_record_round_trip() -> None:
    raw = b'{"created_at":1.0,"origin":"pull","origin_detail":"busybox","repository":"lib/bb"}'
    origin = ImageOrigin("pull", "busybox", "lib/bb", 1.0)
    assert ImageOrigin.decode(raw) == origin and origin.encode() == raw
    assert ImageOrigin.decode(with_unknown(raw, by="me")) == origin
    build = BuildRecord("Dockerfile.dev", 2.0)
    assert BuildRecord.decode(build.encode()) == build
    assert json.loads(build.encode()) == {"dockerfile": "Dockerfile.dev", "created_at": 2.0}
    assert BuildRecord.decode(with_unknown(build.encode(), tags=["x"])) == build
    assert build.origin() == ImageOrigin(ORIGIN_BUILD, "Dockerfile.dev", "", 2.0)


class FakeStore:
    """Store.get over a dict, enough for reads by key."""

    def __init__(self, values: dict[str, bytes]) -> None:
        self.values = values

    async def get(self, key: str) -> Entry | None:
        value = self.values.get(key)
        return Entry(key, value, 1, 1, 0) if value is not None else None


async def test_origin_of_prefers_the_image_services_record_then_the_builders() -> None:
    pulled, built = ImageOrigin("pull", "busybox", "lib/bb", 1.0), BuildRecord("Dockerfile", 2.0)
    both = FakeStore({IMAGES.key(DIGEST): pulled.encode(), BUILDS.key(DIGEST): built.encode()})
    assert await origin_of(both, DIGEST) == pulled  # type: ignore[arg-type]
    only_built = FakeStore({BUILDS.key(DIGEST): built.encode()})
    assert await origin_of(only_built, DIGEST) == built.origin()  # type: ignore[arg-type]
    assert await origin_of(FakeStore({}), DIGEST) is None  # type: ignore[arg-type]
    unreadable = FakeStore({IMAGES.key(DIGEST): b"not json", BUILDS.key(DIGEST): built.encode()})
    assert await origin_of(unreadable, DIGEST) == built.origin()  # type: ignore[arg-type]


# Build cache -----------------------------------------------------------------------------------


def test_cache_records_round_trip_through_their_json() -> None:
    layer = Descriptor("application/vnd.oci.image.layer.v1.tar+gzip", "sha256:" + "c" * 64, 42)
    history = {"created": "2024-01-01T00:00:00Z", "created_by": "RUN x # buildkit"}
    record = CacheRecord("k" * 64, "RUN x", layer, "sha256:" + "d" * 64, history, 1.0, 2.0, 3)
    assert BUILD_CACHE.decode(record.key, record.encode()) == record
    assert BUILD_CACHE.decode(record.key, with_unknown(record.encode(), x=1)) == record
    assert "key" not in json.loads(record.encode()) and record.size == 42
    empty = CacheRecord("e" * 64, "ENV A=1", None, "", {"empty_layer": True})
    again = BUILD_CACHE.decode(empty.key, empty.encode())
    assert (again.layer, again.size) == (None, 0)


def test_cache_record_reads_the_json_the_builder_wrote() -> None:
    raw = (
        b'{"created_at":1.0,"diff_id":"","history":{"empty_layer":true},"image":"",'
        b'"instruction":"ENV A=1","last_used":2.0,"layer":null,"uses":3}'
    )
    record = BUILD_CACHE.decode("k1", raw)
    assert record == CacheRecord("k1", "ENV A=1", None, "", {"empty_layer": True}, 1.0, 2.0, 3)
    assert record.encode() == raw


# Watch events of several families --------------------------------------------------------------


def test_change_decodes_its_own_family_and_skips_the_rest() -> None:
    status = ContainerStatus(state="running", updated_at=1.0)
    put = WatchEvent("put", STATUSES.key(CID), status.encode())
    assert STATUSES.change(put) == Change("put", CID, status)
    assert CONTAINERS.change(put) is None and NODES.change(put) is None
    deleted = WatchEvent("delete", STATUSES.key(CID), b"")
    assert STATUSES.change(deleted) == Change("delete", CID, None)
    assert STATUSES.change(WatchEvent("put", STATUSES.key(CID), b"{broken")) is None
    assert NODES.change(WatchEvent("delete", "nodes/n1", b"")) == Change("delete", "n1", None)
