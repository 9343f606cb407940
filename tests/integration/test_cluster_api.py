"""The cluster's contract with one node: request_id idempotency, pagination, structured errors,
and what DesiredState means for a container that exits on its own."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from berth.client import ClusterClient
from berth.cluster.v1 import cluster_pb2 as pb
from berth.cluster.v1 import cluster_pb2_grpc
from berth.error_details import from_rpc_error
from berth.node.v1 import node_pb2, node_pb2_grpc
from berth.tls import secure_channel
from berth.types.v1 import container_pb2

from .conftest import NodeProcess, Services, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
def cluster(services: Services, node_agent: NodeProcess, registry):
    process = services.start("cluster")
    with ClusterClient(process.address) as client:
        wait_until(lambda: client.nodes() and client.nodes()[0].state == "ready", 30, "the node")
    channel = secure_channel(process.address)
    yield process.address, cluster_pb2_grpc.ClusterServiceStub(channel)
    channel.close()


def error_of(call) -> tuple[grpc.StatusCode, object]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), from_rpc_error(info.value)


def spec(name: str, image: str = "test/absent:1") -> container_pb2.ContainerSpec:
    # An image no registry has: placed (and failed by its node), never run.
    return container_pb2.ContainerSpec(image=image, name=name, command=["true"])


def test_a_retried_run_or_create_service_returns_the_first_result(cluster) -> None:
    _, stub = cluster
    first = stub.RunContainer(pb.RunContainerRequest(spec=spec("once"), request_id="req-1"))
    again = stub.RunContainer(pb.RunContainerRequest(spec=spec("once"), request_id="req-1"))
    assert again.container.id == first.container.id
    listed = stub.ListContainers(pb.ListContainersRequest(all=True, name="once")).containers
    assert [c.id for c in listed] == [first.container.id]
    # Without the request_id, the same call is a second run: its name is taken.
    code, details = error_of(lambda: stub.RunContainer(pb.RunContainerRequest(spec=spec("once"))))
    assert (code, details.reason) == (grpc.StatusCode.ALREADY_EXISTS, "NAME_IN_USE")

    service = pb.ServiceSpec(name="svc", template=spec(""), replicas=0)
    created = stub.CreateService(pb.CreateServiceRequest(spec=service, request_id="req-2"))
    retried = stub.CreateService(pb.CreateServiceRequest(spec=service, request_id="req-2"))
    assert retried.service.id == created.service.id
    assert len(stub.ListServices(pb.ListServicesRequest()).services) == 1
    code, details = error_of(lambda: stub.CreateService(pb.CreateServiceRequest(spec=service)))
    assert (code, details.reason) == (grpc.StatusCode.ALREADY_EXISTS, "NAME_IN_USE")


def test_lists_come_a_page_at_a_time(cluster) -> None:
    address, stub = cluster
    for n in range(5):
        stub.RunContainer(pb.RunContainerRequest(spec=spec(f"paged-{n}")))
    request = pb.ListContainersRequest(all=True, name="paged", page_size=2)
    names, pages = [], 0
    while True:
        reply = stub.ListContainers(request)
        names += [c.name for c in reply.containers]
        pages += 1
        if not reply.next_page_token:
            break
        request.page_token = reply.next_page_token
    assert (sorted(names), pages) == ([f"paged-{n}" for n in range(5)], 3)
    # A token belongs to its listing: with other filters, or made up, it is refused.
    first = stub.ListContainers(pb.ListContainersRequest(all=True, name="paged", page_size=2))
    for bad in (
        pb.ListContainersRequest(all=True, name="other", page_token=first.next_page_token),
        pb.ListContainersRequest(all=True, name="paged", page_token="not-a-token"),
        pb.ListNodesRequest(page_token=first.next_page_token),
    ):
        method = stub.ListNodes if isinstance(bad, pb.ListNodesRequest) else stub.ListContainers
        code, details = error_of(lambda b=bad, m=method: m(b))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.reason == "INVALID_PAGE_TOKEN"
        assert [name for name, _ in details.field_violations] == ["page_token"]
    # The client reads every page.
    with ClusterClient(address) as client:
        assert len(client.list(all=True, name="paged")) == 5


def test_unknown_things_and_refusals_carry_their_reason(cluster) -> None:
    _, stub = cluster
    code, details = error_of(lambda: stub.GetContainer(pb.GetContainerRequest(container="nope")))
    assert (code, details.reason) == (grpc.StatusCode.NOT_FOUND, "CONTAINER_NOT_FOUND")
    assert (details.resource_type, details.resource_name) == ("container", "nope")
    code, details = error_of(lambda: stub.GetNode(pb.GetNodeRequest(node_id="nope")))
    assert (code, details.reason, details.resource_type) == (
        grpc.StatusCode.NOT_FOUND,
        "NODE_NOT_FOUND",
        "node",
    )
    code, details = error_of(lambda: stub.GetService(pb.GetServiceRequest(service="nope")))
    assert (code, details.reason) == (grpc.StatusCode.NOT_FOUND, "SERVICE_NOT_FOUND")
    placement = pb.Placement(constraints=["zone==nowhere"])
    code, details = error_of(
        lambda: stub.RunContainer(pb.RunContainerRequest(spec=spec("nowhere"), placement=placement))
    )
    assert (code, details.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_SUITABLE_NODE")
    (violation,) = details.violations
    assert violation.type == "NODE_UNSUITABLE" and violation.subject.startswith("node/")
    assert violation.description == "does not match constraint zone==nowhere"
    bad = container_pb2.ContainerSpec(image="test/absent:1", env=["NOEQUALS"])
    code, details = error_of(lambda: stub.RunContainer(pb.RunContainerRequest(spec=bad)))
    assert (code, details.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_SPEC")
    assert [name for name, _ in details.field_violations] == ["spec.env"]


def refusal(call) -> tuple[str, str, list[str], str]:
    """(code, reason, fields at fault, message) of a call that must fail."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    details = from_rpc_error(info.value)
    fields = [name for name, _ in details.field_violations]
    return info.value.code().name, details.reason, fields, info.value.details()


def test_what_a_node_would_refuse_is_refused_at_the_front_door(cluster, node_agent) -> None:
    """Unknown enum values and specs no node can run are INVALID_ARGUMENT naming the field,
    from the cluster before anything is recorded, and from the node; never INTERNAL, never a
    container Pending with an error."""
    _, stub = cluster
    good = spec("")
    specs = {
        "network_mode": container_pb2.ContainerSpec(
            image="test/absent:1", command=["true"], network_mode=99
        ),
        "restart_policy.name": container_pb2.ContainerSpec(
            image="test/absent:1",
            command=["true"],
            restart_policy=container_pb2.RestartPolicy(name=7),
        ),
        "image": container_pb2.ContainerSpec(image="::::", command=["true"]),
    }
    for field, bad in specs.items():
        code, reason, fields, message = refusal(
            lambda b=bad: stub.RunContainer(pb.RunContainerRequest(spec=b))
        )
        assert (code, reason, fields) == ("INVALID_ARGUMENT", "INVALID_SPEC", [f"spec.{field}"])
        assert "internal error" not in message
        service = pb.ServiceSpec(name="front", template=bad, replicas=1)
        code, reason, fields, _ = refusal(
            lambda s=service: stub.CreateService(pb.CreateServiceRequest(spec=s))
        )
        assert (code, reason, fields) == (
            "INVALID_ARGUMENT",
            "INVALID_SPEC",
            [f"spec.template.{field}"],
        )
    _, _, _, message = refusal(
        lambda: stub.RunContainer(pb.RunContainerRequest(spec=specs["image"]))
    )
    assert message.startswith('invalid image "::::": ')
    created = stub.CreateService(
        pb.CreateServiceRequest(spec=pb.ServiceSpec(name="front", template=good, replicas=0))
    ).service
    update = pb.ServiceSpec(name="front", template=specs["image"], replicas=0)
    code, reason, fields, _ = refusal(
        lambda: stub.UpdateService(
            pb.UpdateServiceRequest(service="front", spec=update, version=created.version)
        )
    )
    assert (code, reason, fields) == ("INVALID_ARGUMENT", "INVALID_SPEC", ["spec.template.image"])
    assert stub.ListContainers(pb.ListContainersRequest(all=True)).containers == []

    # Enum filters: refused, not a listing that silently matches nothing.
    for call, field in (
        (lambda: stub.ListContainers(pb.ListContainersRequest(state=99)), "state"),
        (lambda: stub.ListNodes(pb.ListNodesRequest(state=99)), "state"),
        (lambda: stub.ListNodes(pb.ListNodesRequest(availability=99)), "availability"),
        (lambda: stub.GetEndpoints(pb.GetEndpointsRequest(kinds=[99])), "kinds[0]"),
        (lambda: list(stub.Events(pb.EventsRequest(types=[1, 99]), timeout=30)), "types[1]"),
    ):
        code, reason, fields, message = refusal(call)
        assert (code, reason, fields) == ("INVALID_ARGUMENT", "UNKNOWN_ENUM_VALUE", [field])
        assert message.startswith(f"unknown {field} 99: expected one of ")

    # The node refuses the same, with the same words.
    with secure_channel(node_agent.address) as channel:
        node = node_pb2_grpc.NodeServiceStub(channel)
        for field, bad in specs.items():
            code, reason, fields, _ = refusal(
                lambda b=bad: node.CreateContainer(node_pb2.CreateContainerRequest(spec=b))
            )
            assert (code, reason, fields) == ("INVALID_ARGUMENT", "INVALID_SPEC", [f"spec.{field}"])
        code, reason, fields, _ = refusal(
            lambda: node.ListContainers(node_pb2.ListContainersRequest(state=99))
        )
        assert (code, reason, fields) == ("INVALID_ARGUMENT", "UNKNOWN_ENUM_VALUE", ["state"])


def test_a_container_that_exits_on_its_own_stays_desired_running(cluster, busybox) -> None:
    """DesiredState STOPPED is set by StopContainer only: a container that exits keeps desired
    state RUNNING (with status EXITED), and its node does not start it again; StartContainer
    does."""
    _, stub = cluster
    run = stub.RunContainer(pb.RunContainerRequest(spec=spec("done", image=busybox))).container
    (exited,) = stub.WaitContainer(pb.WaitContainerRequest(container="done"), timeout=60)
    assert exited.exit_code == 0
    seen = stub.GetContainer(pb.GetContainerRequest(container=run.id)).container
    assert seen.desired_state == pb.DESIRED_STATE_RUNNING
    assert seen.status.state == container_pb2.CONTAINER_STATE_EXITED
    first_start = seen.status.started_at.ToNanoseconds()
    started = stub.StartContainer(pb.StartContainerRequest(container="done"), timeout=60).container
    assert started.status.started_at.ToNanoseconds() > first_start
    stopped = stub.StopContainer(
        pb.StopContainerRequest(container="done", timeout=Duration(seconds=0)), timeout=60
    ).container
    assert stopped.desired_state == pb.DESIRED_STATE_STOPPED
    stub.RemoveContainer(pb.RemoveContainerRequest(container="done", force=True), timeout=60)
