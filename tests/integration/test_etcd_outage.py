"""etcd going away and coming back: every call says so (UNAVAILABLE, reason ETCD_UNAVAILABLE,
one clean line), health turns NOT_SERVING, `berthd status` names the cause; all recovers when
etcd returns.

The test kills an etcd of its own (the session's is shared by every test), with its own
ports and data directory, and starts it again on the same ones.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from berth.cli.main import main
from berth.cluster.v1 import cluster_pb2 as pb
from berth.cluster.v1 import cluster_pb2_grpc
from berth.error_details import from_rpc_error
from berth.registry.v1 import registry_pb2, registry_pb2_grpc
from berth.tls import CA_FILE, CLIENT_CERT, CLIENT_KEY, TLS_DIR, secure_channel
from berth.types.v1 import container_pb2

from .conftest import ClusterCA, ServiceProcess, Services, wait_until
from .own_etcd import OwnEtcd

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A guard only: each wait ends on the event itself (the watchdog looks every 2 s).
GUARD = 60


def health(address: str, service: str = "") -> int:
    with secure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def failure(call) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details(), from_rpc_error(info.value).reason


def assert_clean_etcd_error(code: grpc.StatusCode, message: str, reason: str, endpoint: str):
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "ETCD_UNAVAILABLE"), message
    assert f"the cluster state store (etcd at {endpoint}) cannot be reached" in message
    for raw in ("AioRpcError", "<", "StatusCode", "debug_error_string", "\n"):
        assert raw not in message


def status_dir(tmp_path: Path, ca: ClusterCA, own_etcd: OwnEtcd, started: list[ServiceProcess]):
    """A state directory as `berthd up` leaves it, naming this test's processes."""
    state = tmp_path / "state"
    (state / TLS_DIR).mkdir(parents=True)
    for name, source in (
        (CA_FILE, ca.ca_cert),
        (CLIENT_CERT, Path(os.environ["BERTH_TLS_CERT"])),
        (CLIENT_KEY, Path(os.environ["BERTH_TLS_KEY"])),
    ):
        (state / TLS_DIR / name).symlink_to(source)
    cluster = {
        "state_dir": str(state),
        "etcd": {"endpoint": own_etcd.endpoint, "pid": 0},
        "services": {p.name: {"address": p.address, "pid": p.proc.pid} for p in started},
    }
    (state / "cluster.json").write_text(json.dumps(cluster))
    return state


def berthd_status(state: Path) -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, "-m", "berthd.main", "status", f"--state-dir={state}"],
        capture_output=True,
        text=True,
        timeout=GUARD,
    )
    return done.returncode, done.stdout.splitlines()


def test_etcd_down_is_unavailable_everywhere_and_not_serving_until_it_returns(
    own_etcd: OwnEtcd,
    own_etcd_services: Services,
    cluster_ca: ClusterCA,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = own_etcd_services.registry()
    cluster = own_etcd_services.start("cluster")
    state = status_dir(tmp_path, cluster_ca, own_etcd, [registry, cluster])
    for service in (registry, cluster):
        assert health(service.address) == SERVING
        assert health(service.address, "etcd") == SERVING
    channel = secure_channel(cluster.address)
    stub = cluster_pb2_grpc.ClusterServiceStub(channel)
    registry_channel = secure_channel(registry.address)
    registry_stub = registry_pb2_grpc.RegistryServiceStub(registry_channel)
    spec = container_pb2.ContainerSpec(image="test/absent:1", command=["true"])
    # A follower of events before the outage: its stream ends with the same clean error.
    events = stub.Events(pb.EventsRequest(), timeout=GUARD)

    own_etcd.kill()

    code, message, reason = failure(lambda: stub.ListContainers(pb.ListContainersRequest()))
    assert_clean_etcd_error(code, message, reason, own_etcd.endpoint)
    for request in (
        pb.RunContainerRequest(spec=spec),
        pb.RunContainerRequest(spec=spec, request_id="outage-1"),  # the idempotency claim
    ):
        code, message, reason = failure(lambda r=request: stub.RunContainer(r, timeout=30))
        assert_clean_etcd_error(code, message, reason, own_etcd.endpoint)
    code, message, reason = failure(lambda: stub.ListNodes(pb.ListNodesRequest(page_size=1)))
    assert_clean_etcd_error(code, message, reason, own_etcd.endpoint)
    code, message, reason = failure(
        lambda: registry_stub.ListRepositories(registry_pb2.ListRepositoriesRequest())
    )
    assert_clean_etcd_error(code, message, reason, own_etcd.endpoint)
    code, message, reason = failure(lambda: list(events))
    assert_clean_etcd_error(code, message, reason, own_etcd.endpoint)

    # The CLI: one line naming the cause, and a failure exit.
    capsys.readouterr()
    assert main(["--host", cluster.address, "ps"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("Error: the cluster state store (etcd at"), err
    assert "AioRpcError" not in err and "internal error" not in err

    # Health: NOT_SERVING while etcd is away, and `berthd status` says which and why.
    for service in (registry, cluster):
        wait_until(lambda s=service: health(s.address) == NOT_SERVING, GUARD, "NOT_SERVING")
        assert health(service.address, "etcd") == NOT_SERVING
    code, lines = berthd_status(state)
    assert code == 1
    rows = {line.split()[0]: line for line in lines[1:]}
    for name in ("registry", "cluster"):
        assert "UNHEALTHY" in rows[name] and "cannot reach etcd" in rows[name], lines

    own_etcd.start()

    for service in (registry, cluster):
        wait_until(lambda s=service: health(s.address) == SERVING, GUARD, "SERVING again")
        assert health(service.address, "etcd") == SERVING
    assert list(stub.ListContainers(pb.ListContainersRequest(all=True)).containers) == []
    code, message, reason = failure(lambda: stub.RunContainer(pb.RunContainerRequest(spec=spec)))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_SUITABLE_NODE")
    code, lines = berthd_status(state)
    assert code == 0, lines
    channel.close()
    registry_channel.close()
