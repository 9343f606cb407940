"""The cluster service on three hosts (tests/integration/hosts.py): etcd, registry and cluster in
the control namespace, a node agent per host namespace. Clients run inside the control namespace
(`python_in`): the test process has no route to the test subnet."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .hosts import HostService, TestNetwork
from .test_hosts import PUSH, _cleanup_agents

pytestmark = pytest.mark.integration

IMAGE = "test/busybox:1"
LEASE_TTL = 3
# Ends at once on SIGTERM (PID 1 ignores it without a handler) and says hello first.
SERVE = "echo hello from $(hostname); trap 'exit 0' TERM; while true; do sleep 0.1; done"

# Helpers every snippet starts with; the cluster address is argv[1], the rest is per test.
CLIENT = """
import json, sys, time
from berth.tls import secure_channel
from concurrent.futures import ThreadPoolExecutor
import grpc
from berth.cluster.v1 import cluster_pb2 as pb, cluster_pb2_grpc
from berth.error_details import from_rpc_error
from berth.node.v1 import node_pb2
from berth.types.v1 import container_pb2
from google.protobuf.duration_pb2 import Duration

cluster = cluster_pb2_grpc.ClusterServiceStub(secure_channel(sys.argv[1]))
SERVE = sys.argv[2]

def run(image, name="", constraints=(), memory=0, command=("sh", "-c", SERVE)):
    spec = container_pb2.ContainerSpec(image=image, name=name, command=list(command))
    placement = pb.Placement(
        request=pb.ResourceAmounts(memory_bytes=memory), constraints=list(constraints)
    )
    try:
        request = pb.RunContainerRequest(spec=spec, placement=placement)
        c = cluster.RunContainer(request, timeout=30).container
        return {"id": c.id, "name": c.name, "node": c.node_id}
    except grpc.RpcError as e:
        return failure(e)

def failure(e):
    # A failed call: its code and message, and the details programs use.
    d = from_rpc_error(e)
    return {"code": e.code().name, "error": e.details(), "reason": d.reason,
            "metadata": d.metadata, "resource": [d.resource_type, d.resource_name],
            "violations": [[v.type, v.subject, v.description] for v in d.violations]}

def call(method, request, timeout=60):
    try:
        return getattr(cluster, method)(request, timeout=timeout)
    except grpc.RpcError as e:
        return failure(e)

def state(ref):
    c = cluster.GetContainer(pb.GetContainerRequest(container=ref)).container
    return container_pb2.ContainerState.Name(c.status.state)

def until_state(ref, want, timeout=45):
    deadline = time.monotonic() + timeout
    while (got := state(ref)) != want:
        assert time.monotonic() < deadline, f"{ref} is {got}, not {want}, after {timeout}s"
        time.sleep(0.1)

def remove_all():
    listed = cluster.ListContainers(pb.ListContainersRequest(all=True)).containers
    for c in listed:
        cluster.RemoveContainer(pb.RemoveContainerRequest(container=c.id, force=True), timeout=60)
    return len(listed)

def out(value):
    print(json.dumps(value))
"""


@dataclass
class Cluster:
    net: TestNetwork
    prefix: str
    cluster: HostService

    def client(self, body: str, *args: str, timeout: float = 90) -> object:
        net = self.net
        code = CLIENT + body
        return net.python_json(net.ctl, code, self.cluster.address, SERVE, *args, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    run_dir = tmp_path_factory.mktemp("cluster")
    net = TestNetwork(run_dir)
    prefix = f"/berth-cluster-{uuid.uuid4().hex[:8]}/"
    agents: dict[str, HostService] = {}
    try:
        registry = net.start_control(3, prefix)
        service = net.start_service(net.ctl, "cluster", prefix=prefix)
        registry.wait_ready()
        agents.update(net.start_agents(registry.address, prefix, LEASE_TTL))
        service.wait_ready()
        for agent in agents.values():
            agent.wait_ready()
        net.python_json(net.ctl, PUSH, registry.address, IMAGE, timeout=60)
        yield Cluster(net, prefix, service)
    finally:
        _cleanup_agents(net, agents, Path(run_dir))
        net.close()


def test_spread_over_three_hosts_then_remove_through_the_cluster(cluster: Cluster) -> None:
    result = cluster.client(
        """
placed = [run(sys.argv[3]) for _ in range(3)]
for p in placed:
    until_state(p["id"], "CONTAINER_STATE_RUNNING")
nodes = cluster.ListNodes(pb.ListNodesRequest()).nodes
refused = call("RemoveContainer", pb.RemoveContainerRequest(container=placed[0]["name"]))
endpoints = cluster.GetEndpoints(pb.GetEndpointsRequest()).endpoints
removed = remove_all()
left = cluster.ListContainers(pb.ListContainersRequest(all=True)).containers
after = cluster.ListNodes(pb.ListNodesRequest()).nodes
out({
    "nodes": [p["node"] for p in placed],
    "counts": {n.description.id: n.container_count for n in nodes},
    "ready": [pb.NodeState.Name(n.state) for n in nodes],
    "refused": refused,
    "endpoints": [pb.EndpointKind.Name(e.kind).removeprefix("ENDPOINT_KIND_") for e in endpoints],
    "removed": removed,
    "left": len(left),
    "after": [[n.container_count, n.allocated.memory_bytes] for n in after],
})
""",
        IMAGE,
    )
    assert isinstance(result, dict)
    assert sorted(result["nodes"]) == ["host1", "host2", "host3"]
    assert result["counts"] == {"host1": 1, "host2": 1, "host3": 1}
    assert result["ready"] == ["NODE_STATE_READY"] * 3
    assert result["refused"]["code"] == "FAILED_PRECONDITION"
    assert "running" in result["refused"]["error"]
    # By kind (registry, node, cluster), as the proto says.
    assert result["endpoints"] == ["REGISTRY", "NODE", "NODE", "NODE", "CLUSTER"]
    assert (result["removed"], result["left"]) == (3, 0)
    assert result["after"] == [[0, 0]] * 3


def test_constraints_cordon_and_resource_fit(cluster: Cluster) -> None:
    result = cluster.client(
        """
on_h2 = run(sys.argv[3], constraints=["host==h2"])
nowhere = run(sys.argv[3], constraints=["host==h9"])
bad = run(sys.argv[3], constraints=["host=h2"])
huge = run(sys.argv[3], memory=1 << 50)
cluster.CordonNode(pb.CordonNodeRequest(node_id="host1"))
cordoned = run(sys.argv[3], constraints=["node.id==host1"])
node = cluster.GetNode(pb.GetNodeRequest(node_id="host1")).node
cluster.ActivateNode(pb.ActivateNodeRequest(node_id="host1"))
active = run(sys.argv[3], constraints=["node.id==host1"])
unknown = call("GetNode", pb.GetNodeRequest(node_id="nope"))
remove_all()
out({"on_h2": on_h2, "nowhere": nowhere, "bad": bad, "huge": huge, "cordoned": cordoned,
     "availability": pb.NodeAvailability.Name(node.availability), "active": active,
     "unknown": unknown})
""",
        IMAGE,
    )
    assert isinstance(result, dict)
    assert result["on_h2"]["node"] == "host2"
    nowhere = result["nowhere"]
    assert (nowhere["code"], nowhere["error"]) == (
        "FAILED_PRECONDITION",
        "0/3 nodes are available: 3 does not match constraint host==h9",
    )
    # For programs: the scheduler's reason, and why each node refused.
    assert nowhere["reason"] == "NO_SUITABLE_NODE"
    assert nowhere["violations"] == [
        ["NODE_UNSUITABLE", f"node/host{n}", "does not match constraint host==h9"]
        for n in (1, 2, 3)
    ]
    assert result["bad"]["reason"] == "INVALID_SPEC"
    assert result["bad"]["code"] == "INVALID_ARGUMENT"
    assert result["huge"]["code"] == "FAILED_PRECONDITION"
    assert result["huge"]["error"].startswith("0/3 nodes are available: 3 insufficient memory")
    assert result["cordoned"]["code"] == "FAILED_PRECONDITION"
    assert "1 cordoned" in result["cordoned"]["error"]
    assert result["availability"] == "NODE_AVAILABILITY_CORDONED"
    assert result["active"]["node"] == "host1"
    assert result["unknown"]["code"] == "NOT_FOUND"
    assert result["unknown"]["reason"] == "NODE_NOT_FOUND"
    assert result["unknown"]["resource"] == ["node", "nope"]


def test_concurrent_runs_never_overbook(cluster: Cluster) -> None:
    result = cluster.client(
        """
nodes = cluster.ListNodes(pb.ListNodesRequest()).nodes
half = min(n.capacity.memory_bytes for n in nodes) // 2
with ThreadPoolExecutor(9) as pool:
    results = list(pool.map(lambda _: run(sys.argv[3], memory=half, command=["sleep", "60"]),
                            range(9)))
allocated = {n.description.id: n.allocated.memory_bytes
             for n in cluster.ListNodes(pb.ListNodesRequest()).nodes}
remove_all()
out({"results": results, "half": half, "allocated": allocated})
""",
        IMAGE,
    )
    assert isinstance(result, dict)
    placed = [r["node"] for r in result["results"] if "node" in r]
    refused = [r for r in result["results"] if "code" in r]
    # Every node has room for exactly two; the rest are refused, never squeezed in.
    assert sorted(placed) == ["host1", "host1", "host2", "host2", "host3", "host3"]
    assert [r["code"] for r in refused] == ["FAILED_PRECONDITION"] * 3
    assert all("insufficient memory" in r["error"] for r in refused)
    assert result["allocated"] == {f"host{n}": 2 * result["half"] for n in (1, 2, 3)}


def test_a_burst_of_runs_is_placed_whole(cluster: Cluster) -> None:
    """30 RunContainer calls at once on 3 hosts: racing placements on one cluster instance must
    not use up their retries on each other (they once ended in ABORTED)."""
    result = cluster.client(
        """
with ThreadPoolExecutor(30) as pool:
    names = [f"burst-{i}" for i in range(30)]
    results = list(pool.map(lambda n: run(sys.argv[3], name=n, command=["sleep", "60"]), names))
remove_all()
out(results)
""",
        IMAGE,
    )
    assert isinstance(result, list)
    assert [r for r in result if "code" in r] == []
    assert sorted({r["node"] for r in result}) == ["host1", "host2", "host3"]


def test_following_logs_right_after_run_gets_every_line(cluster: Cluster) -> None:
    """`ContainerLogs(follow)` called as soon as RunContainer returns (before the node created
    the container, or while it is created and not started) waits for it and returns its output
    from the first byte; it used to fail with NOT_FOUND or end with no lines."""
    result = cluster.client(
        """
lines = []
for n in range(3):
    c = run(sys.argv[3], name=f"early-{n}", command=["sh", "-c", f"echo one {n}; echo two {n}"])
    request = pb.ContainerLogsRequest(container=f"early-{n}", follow=True)
    try:
        got = b"".join(r.data for r in cluster.ContainerLogs(request, timeout=30)).decode()
    except grpc.RpcError as e:
        got = e.code().name + ": " + (e.details() or "")
    lines.append(got)
remove_all()
out(lines)
""",
        IMAGE,
    )
    assert result == [f"one {n}\ntwo {n}\n" for n in range(3)]


def test_waiting_on_a_container_its_node_cannot_create_ends_at_once(cluster: Cluster) -> None:
    """The node reports why it cannot create the container (here: no such image); WaitContainer
    answers with that reason instead of waiting for the caller's deadline (which would end it
    DEADLINE_EXCEEDED: the deadline only guards against a hang)."""
    result = cluster.client(
        """
c = run("test/no-such-image:1", name="ghost", command=["true"])
try:
    list(cluster.WaitContainer(pb.WaitContainerRequest(container="ghost"), timeout=60))
    waited = {"code": "OK"}
except grpc.RpcError as e:
    waited = failure(e)
failed = cluster.GetContainer(pb.GetContainerRequest(container="ghost")).container.status
remove_all()
out({"run": c, "waited": waited,
     "state": container_pb2.ContainerState.Name(failed.state),
     "failure": [failed.failure.reason, failed.failure.message]})
""",
    )
    assert isinstance(result, dict)
    assert "node" in result["run"], result  # accepted: only its node can tell it cannot run
    assert result["waited"]["code"] == "FAILED_PRECONDITION", result
    assert "ghost cannot be created on node" in result["waited"]["error"]
    assert "test/no-such-image" in result["waited"]["error"]
    assert result["waited"]["reason"] == "CONTAINER_CREATE_FAILED"
    assert result["waited"]["metadata"]["failure_reason"] == "IMAGE_NOT_FOUND"
    assert result["waited"]["metadata"]["node_id"] == result["run"]["node"]
    assert result["state"] == "CONTAINER_STATE_CREATE_FAILED"
    assert result["failure"][0] == "IMAGE_NOT_FOUND"


def test_stop_passes_its_timeout_to_the_node(cluster: Cluster) -> None:
    """`StopContainer(timeout=0s)` kills at once: the container never sees a SIGTERM. The
    cluster used to drop the timeout, and the node's default sent SIGTERM, which the
    container's trap writes to its log, and waited 10 s before the SIGKILL."""
    result = cluster.client(
        """
stubborn = ["sh", "-c", "trap 'echo got TERM' TERM; echo trapping; while :; do sleep 0.1; done"]
c = run(sys.argv[3], name="stubborn", command=stubborn)
until_state("stubborn", "CONTAINER_STATE_RUNNING")
deadline = time.monotonic() + 30  # the trap is set before the first line is written
while b"trapping" not in (logs := b"".join(
    line.data for line in cluster.ContainerLogs(pb.ContainerLogsRequest(container="stubborn"))
)):
    assert time.monotonic() < deadline, logs
    time.sleep(0.1)
request = pb.StopContainerRequest(container="stubborn", timeout=Duration(seconds=0))
stopped = cluster.StopContainer(request, timeout=60).container
logs = b"".join(
    line.data for line in cluster.ContainerLogs(pb.ContainerLogsRequest(container="stubborn"))
)
remove_all()
out({"state": container_pb2.ContainerState.Name(stopped.status.state),
     "exit_code": stopped.status.exit_code, "logs": logs.decode()})
""",
        IMAGE,
    )
    assert isinstance(result, dict)
    assert (result["state"], result["exit_code"]) == ("CONTAINER_STATE_EXITED", 137)
    assert result["logs"] == "trapping\n", result  # SIGKILL only: no TERM reached the trap


def test_logs_exec_stats_stop_start_wait_on_host3(cluster: Cluster) -> None:
    result = cluster.client(
        """
c = run(sys.argv[3], name="web", constraints=["host==h3"])
until_state("web", "CONTAINER_STATE_RUNNING")
deadline = time.monotonic() + 10
while not (logs := b"".join(
    line.data for line in cluster.ContainerLogs(pb.ContainerLogsRequest(container="web"))
)) and time.monotonic() < deadline:
    time.sleep(0.1)
process = container_pb2.ExecProcess(
    container=c["id"][:12], command=["sh", "-c", "cat; echo done >&2"]
)
outputs = [m.output for m in cluster.Exec(iter([
    pb.ExecRequest(start=process),
    pb.ExecRequest(input=container_pb2.ProcessInput(stdin=b"piped ")),
    pb.ExecRequest(input=container_pb2.ProcessInput(stdin=b"through")),
    pb.ExecRequest(input=container_pb2.ProcessInput(close_stdin=True)),
]))]
stats = next(iter(cluster.ContainerStats(pb.ContainerStatsRequest(container="web"))))
stopped = cluster.StopContainer(pb.StopContainerRequest(container="web"), timeout=60).container
started = cluster.StartContainer(pb.StartContainerRequest(container="web"), timeout=60).container
waiting = cluster.WaitContainer(pb.WaitContainerRequest(container="web"), timeout=60)
waiting.initial_metadata()  # the wait watches: it sees the exit the stop brings
cluster.StopContainer(pb.StopContainerRequest(container="web"), timeout=60)
waited = list(waiting)
cluster.RemoveContainer(pb.RemoveContainerRequest(container="web"), timeout=60)
gone = call("GetContainer", pb.GetContainerRequest(container="web"))
out({
    "node": c["node"],
    "logs": logs.decode(),
    "stdout": b"".join(o.stdout for o in outputs).decode(),
    "stderr": b"".join(o.stderr for o in outputs).decode(),
    "exit": [o.exit.exit_code for o in outputs if o.HasField("exit")],
    "stats": [stats.container_id == c["id"], stats.node_id, stats.sample.pids],
    "stopped": container_pb2.ContainerState.Name(stopped.status.state),
    "started": container_pb2.ContainerState.Name(started.status.state),
    "waited": [w.exit_code for w in waited],
    "gone": gone,
})
""",
        IMAGE,
    )
    assert isinstance(result, dict)
    assert result["node"] == "host3"
    assert result["logs"].startswith("hello from ")
    assert (result["stdout"], result["stderr"], result["exit"]) == ("piped through", "done\n", [0])
    assert result["stats"][:2] == [True, "host3"] and result["stats"][2] >= 1
    assert result["stopped"] == "CONTAINER_STATE_EXITED"
    assert result["started"] in ("CONTAINER_STATE_RUNNING", "CONTAINER_STATE_EXITED")
    assert result["waited"] == [0]
    assert result["gone"]["code"] == "NOT_FOUND"
    assert (result["gone"]["reason"], result["gone"]["resource"]) == (
        "CONTAINER_NOT_FOUND",
        ["container", "web"],
    )
    print(json.dumps({k: result[k] for k in ("node", "stopped", "started")}))


def test_stats_of_many_containers_in_one_call_with_a_cpu_percent(cluster: Cluster) -> None:
    # One sample used to show 0.00 % CPU for every container; and `berth stats` made a round
    # trip through the cluster per container. Now: one call, each node asked once.
    result = cluster.client(
        """
loop = ["sh", "-c", "yes > /dev/null"]
busy = run(sys.argv[3], name="busy", constraints=["host==h1"], command=loop)
idle = run(sys.argv[3], name="idle", constraints=["host==h2"], command=["sleep", "1000"])
until_state("busy", "CONTAINER_STATE_RUNNING")
until_state("idle", "CONTAINER_STATE_RUNNING")
named = cluster.BatchContainerStats(pb.BatchContainerStatsRequest(containers=["idle", "busy"]))
everything = cluster.BatchContainerStats(pb.BatchContainerStatsRequest())
missing = call("BatchContainerStats", pb.BatchContainerStatsRequest(containers=["busy", "nosuch"]))
remove_all()
out({
    "named": [[e.name, e.node_id, e.sample.cpu_percent, e.sample.pids, e.error]
              for e in named.stats],
    "everything": sorted(e.name for e in everything.stats),
    "missing": missing,
})
""",
        IMAGE,
    )
    assert isinstance(result, dict)
    (idle, host2, idle_cpu, idle_pids, idle_error), (busy, host1, busy_cpu, _, busy_error) = result[
        "named"
    ]
    assert (idle, host2, busy, host1) == ("idle", "host2", "busy", "host1")
    assert idle_error == busy_error == ""
    # The host is shared with other work: "clearly busy" is a few percent of a CPU.
    assert busy_cpu > 2.0 and idle_cpu < 1.0 and idle_pids == 1, result
    assert {"busy", "idle"} <= set(result["everything"])
    assert result["missing"]["code"] == "NOT_FOUND"
    assert result["missing"]["reason"] == "CONTAINER_NOT_FOUND"


def test_image_locality_wins_when_loads_are_equal(cluster: Cluster) -> None:
    result = cluster.client(
        """
import os, pathlib, tempfile
from berth.client import NodeClient, RegistryClient
from tests.integration.images import busybox_layer, push_image, tar_of

remove_all()
nodes = {n.description.id: n.description for n in cluster.ListNodes(pb.ListNodesRequest()).nodes}
registry = [e for e in cluster.GetEndpoints(pb.GetEndpointsRequest()).endpoints
            if e.kind == pb.ENDPOINT_KIND_REGISTRY][0].address
with RegistryClient(registry) as client, tempfile.TemporaryDirectory() as tmp:
    extra = tar_of({"data.bin": os.urandom(8 * 1024 * 1024)})
    push_image(client, "test/local", "1", [busybox_layer(), extra], pathlib.Path(tmp))
# Only host2 holds the image's big layer; every host holds the busybox base layer.
with NodeClient(nodes["host2"].address) as node:
    node.pull("test/local:1")
# The pull's result comes after the agent published its layers in etcd, where placement reads.
placed = [run("test/local:1", name="local")]
remove_all()
out(placed)
"""
    )
    assert [p["node"] for p in result] == ["host2"], result
