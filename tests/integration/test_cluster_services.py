"""Replicated services on three hosts (tests/integration/hosts.py), with two cluster instances:
spread, surviving a host's death, scaling, rolling updates, events and controller failover.
Clients run inside the control namespace, like test_cluster.py. Each test stands alone, and none
asserts on elapsed time: they wait for the event itself (timeouts only guard against a hang) and
check order and spacing from what the cluster recorded."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .hosts import REPO, HostService, TestNetwork
from .test_cluster import CLIENT, IMAGE, LEASE_TTL, SERVE
from .test_hosts import PUSH, _cleanup_agents

pytestmark = pytest.mark.integration

# Service helpers on top of test_cluster's CLIENT; argv[3] is the image.
SERVICES = """
from berth.node.v1 import node_pb2_grpc
from berth.tls import secure_channel
from google.protobuf.duration_pb2 import Duration

RUNNING = container_pb2.CONTAINER_STATE_RUNNING

def spec(name, replicas, env=(), parallelism=1, monitor=1.0):
    return pb.ServiceSpec(
        name=name, replicas=replicas,
        template=container_pb2.ContainerSpec(image=sys.argv[3], command=["sh", "-c", SERVE],
                                             env=list(env)),
        update_config=pb.UpdateConfig(parallelism=parallelism,
                                       monitor=Duration(nanos=int(monitor * 1e9))),
    )

def ps(name):
    return cluster.ListServiceReplicas(pb.ListServiceReplicasRequest(service=name)).containers

def running(name):
    return [c for c in ps(name) if c.status.state == RUNNING]

def until_running(name, count, timeout=60, avoid=()):
    deadline = time.monotonic() + timeout
    while True:
        found = [c for c in running(name) if c.node_id not in avoid]
        if len(found) == count and len(ps(name)) == count:
            return found
        assert time.monotonic() < deadline, [(c.name, c.node_id, c.status.state) for c in ps(name)]
        time.sleep(0.05)

def watch(request, timeout=90):
    # An Events stream that already watches (its headers came): it sees every later change.
    stream = cluster.Events(request, timeout=timeout)
    stream.initial_metadata()
    return stream

def managed_on(address):
    node = node_pb2_grpc.NodeServiceStub(secure_channel(address))
    listed = node.ListContainers(node_pb2.ListContainersRequest(all=True), timeout=10).containers
    return sorted(c.name for c in listed)
"""

REMOVE_SERVICE = """
cluster.RemoveService(pb.RemoveServiceRequest(service=sys.argv[4]), timeout=30)
deadline = time.monotonic() + 30
while cluster.ListContainers(pb.ListContainersRequest(all=True)).containers:
    assert time.monotonic() < deadline
    time.sleep(0.1)
out(True)
"""

LEADER = """
import json, sys, urllib.request
def leader(url):
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return [l for l in text.splitlines() if l.startswith("berth_cluster_leader ")][0].split()[1]
print(json.dumps([leader(u) for u in sys.argv[1:]]))
"""


@dataclass
class Swarm:
    net: TestNetwork
    instances: list[HostService]
    agents: dict[str, HostService]

    def client(self, body: str, *args: str, via: HostService | None = None) -> object:
        address = (via or self.live()[0]).address
        code = CLIENT + SERVICES + body
        return self.net.python_json(self.net.ctl, code, address, SERVE, IMAGE, *args, timeout=120)

    def client_process(self, body: str, *args: str) -> subprocess.Popen:
        """The same snippet as `client`, started in the background with stdin and stdout
        piped, for a test that acts while it runs."""
        code = CLIENT + SERVICES + body
        argv = [sys.executable, "-c", code, self.live()[0].address, SERVE, IMAGE, *args]
        return subprocess.Popen(
            [*self.net.exec_argv(self.net.ctl), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )

    def live(self) -> list[HostService]:
        return [i for i in self.instances if i.proc.poll() is None]

    def leaders(self) -> list[str]:
        """Names of the live instances whose leader gauge is 1."""
        live = self.live()
        found = self.net.python_json(self.net.ctl, LEADER, *[i.metrics for i in live])
        return [i.name for i, flag in zip(live, found, strict=True) if flag == "1.0"]

    def remove_service(self, name: str) -> None:
        assert self.client(REMOVE_SERVICE, name) is True


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    run_dir = tmp_path_factory.mktemp("services")
    net = TestNetwork(run_dir)
    prefix = f"/berth-services-{uuid.uuid4().hex[:8]}/"
    agents: dict[str, HostService] = {}
    try:
        registry = net.start_control(3, prefix)
        first = net.start_service(
            net.ctl, "cluster", prefix=prefix, lease_ttl=LEASE_TTL, name="cluster-1"
        )
        registry.wait_ready()
        agents.update(net.start_agents(registry.address, prefix, LEASE_TTL))
        first.wait_ready()
        # The second instance starts after the first has surely campaigned: first leads.
        second = net.start_service(
            net.ctl, "cluster", prefix=prefix, lease_ttl=LEASE_TTL, name="cluster-2"
        ).wait_ready()
        for agent in agents.values():
            agent.wait_ready()
        net.python_json(net.ctl, PUSH, registry.address, IMAGE, timeout=60)
        yield Swarm(net, [first, second], agents)
    finally:
        for host in net.hosts:
            net.restore(host)
        _cleanup_agents(net, agents, Path(run_dir))
        net.close()


def test_service_spreads_over_three_hosts_with_events(swarm: Swarm) -> None:
    result = swarm.client(
        """
seen = []
stream = watch(pb.EventsRequest(service="web"))
def follow():
    for e in stream:
        seen.append((pb.EventType.Name(e.type), e.container.name, e.container.node_id))
        if len([s for s in seen if s[0] == "EVENT_TYPE_CONTAINER_STARTED"]) == 3:
            return
with ThreadPoolExecutor(1) as pool:
    events = pool.submit(follow)
    created = cluster.CreateService(pb.CreateServiceRequest(spec=spec("web", 3))).service
    replicas = until_running("web", 3)
    dup = call("CreateService", pb.CreateServiceRequest(spec=spec("web", 1)))
    events.result(timeout=90)
stream.cancel()
listed = cluster.ListServices(pb.ListServicesRequest()).services
out({
    "nodes": sorted(c.node_id for c in replicas),
    "names": sorted(c.name for c in replicas),
    "slots": sorted(c.slot for c in replicas),
    "service": [c.service_id == created.id for c in replicas],
    "dup": dup["code"],
    "listed": [(s.spec.name, s.spec.replicas, s.running_replicas, s.version) for s in listed],
    "events": sorted(set(s[0] for s in seen)),
    "created": [s[0] for s in seen].count("EVENT_TYPE_SERVICE_CREATED"),
    "started_on": sorted(s[2] for s in seen if s[0] == "EVENT_TYPE_CONTAINER_STARTED"),
})
"""
    )
    assert isinstance(result, dict)
    assert result["nodes"] == ["host1", "host2", "host3"]
    assert result["names"] == ["web.1", "web.2", "web.3"]
    assert result["slots"] == [1, 2, 3] and all(result["service"])
    assert result["dup"] == "ALREADY_EXISTS"
    assert result["listed"] == [["web", 3, 3, 1]]
    assert result["events"] == [
        "EVENT_TYPE_CONTAINER_SCHEDULED",
        "EVENT_TYPE_CONTAINER_STARTED",
        "EVENT_TYPE_SERVICE_CREATED",
    ]
    assert result["created"] == 1
    assert result["started_on"] == ["host1", "host2", "host3"]
    swarm.remove_service("web")


def test_replicas_survive_the_death_of_a_host(swarm: Swarm) -> None:
    """A 3-replica service loses host1: the cluster sees the node lost (its lease expired),
    then moves that replica elsewhere, in that order; when host1 returns its agent removes
    the stale copy."""
    host1 = swarm.net.hosts[0]
    agent1 = swarm.agents["host1"].address
    placed = swarm.client(
        'cluster.CreateService(pb.CreateServiceRequest(spec=spec("moving", 3)))\n'
        'out({c.node_id: c.name for c in until_running("moving", 3)})'
    )
    assert isinstance(placed, dict) and sorted(placed) == ["host1", "host2", "host3"]
    cut_at = time.time()  # only printed: how long the move took is measured in bench/
    script = """
stream = watch(pb.EventsRequest(node_id="host1"))  # the node's events and its containers'
print("watching", flush=True)
sys.stdin.readline()  # the test cuts host1 now
seen = []
for e in stream:
    seen.append([pb.EventType.Name(e.type), e.container.name, e.container.previous_node_id])
    if e.type == pb.EVENT_TYPE_CONTAINER_RESCHEDULED:
        break
stream.cancel()
moved = until_running("moving", 3, timeout=90, avoid=("host1",))
lost = cluster.GetNode(pb.GetNodeRequest(node_id="host1")).node
out({"events": seen, "nodes": sorted(c.node_id for c in moved),
     "state": pb.NodeState.Name(lost.state)})
"""
    follower = swarm.client_process(script)
    try:
        assert follower.stdout is not None and follower.stdout.readline() == "watching\n"
        swarm.net.cut(host1)
        out, _ = follower.communicate("cut\n", timeout=150)
    finally:
        swarm.net.restore(host1)
    assert follower.returncode == 0, out
    result = json.loads(out.splitlines()[-1])
    print(json.dumps({"host_death_to_running_elsewhere_seconds": round(time.time() - cut_at, 2)}))
    events = [e for e in result["events"] if e[0] != "EVENT_TYPE_CONTAINER_DIED"]
    assert events == [
        ["EVENT_TYPE_NODE_LOST", "", ""],
        ["EVENT_TYPE_CONTAINER_RESCHEDULED", placed["host1"], "host1"],
    ]
    assert sorted(result["nodes"]) in (["host2", "host2", "host3"], ["host2", "host3", "host3"])
    assert result["state"] == "NODE_STATE_NOT_READY"
    after = swarm.client(
        """
deadline = time.monotonic() + 60
while (on1 := managed_on(sys.argv[4])) or len(ps("moving")) != 3:
    assert time.monotonic() < deadline, on1
    time.sleep(0.2)
node = cluster.GetNode(pb.GetNodeRequest(node_id="host1")).node
out({"replicas": len(running("moving")), "on_host1": on1,
     "state": pb.NodeState.Name(node.state)})
""",
        agent1,
    )
    assert after == {"replicas": 3, "on_host1": [], "state": "NODE_STATE_READY"}
    swarm.remove_service("moving")


def test_scale_three_five_two(swarm: Swarm) -> None:
    result = swarm.client(
        """
cluster.CreateService(pb.CreateServiceRequest(spec=spec("scaled", 3)))
until_running("scaled", 3)
up = cluster.ScaleService(pb.ScaleServiceRequest(service="scaled", replicas=5)).service
five = until_running("scaled", 5)
cluster.ScaleService(pb.ScaleServiceRequest(service="scaled", replicas=2))
two = until_running("scaled", 2)
deadline = time.monotonic() + 30
while len(cluster.ListContainers(pb.ListContainersRequest(all=True)).containers) != 2:
    assert time.monotonic() < deadline
    time.sleep(0.1)
out({"up": up.spec.replicas, "five": sorted(c.slot for c in five),
     "spread": sorted(c.node_id for c in five), "two": sorted(c.slot for c in two)})
"""
    )
    assert isinstance(result, dict)
    assert result["up"] == 5 and result["five"] == [1, 2, 3, 4, 5]
    # 5 over 3 hosts: no host holds more than 2.
    assert max(result["spread"].count(h) for h in ("host1", "host2", "host3")) == 2
    assert result["two"] == [1, 2]
    swarm.remove_service("scaled")


def test_drain_moves_replicas_off_the_node(swarm: Swarm) -> None:
    result = swarm.client(
        """
cluster.CreateService(pb.CreateServiceRequest(spec=spec("drained", 3)))
until_running("drained", 3)
seen = []
stream = watch(pb.EventsRequest(node_id="host3"))
def follow():  # DrainNode's handle: the node's events, until the drain completes
    for e in stream:
        seen.append(pb.EventType.Name(e.type))
        if e.type == pb.EVENT_TYPE_NODE_DRAIN_COMPLETED:
            return
with ThreadPoolExecutor(1) as pool:
    events = pool.submit(follow)
    node = cluster.DrainNode(pb.DrainNodeRequest(node_id="host3")).node
    moved = until_running("drained", 3, avoid=("host3",))
    events.result(timeout=90)
stream.cancel()
cluster.ActivateNode(pb.ActivateNodeRequest(node_id="host3"))
out({"availability": pb.NodeAvailability.Name(node.availability),
     "nodes": sorted(c.node_id for c in moved), "events": seen})
"""
    )
    assert isinstance(result, dict)
    assert result["availability"] == "NODE_AVAILABILITY_DRAINED"
    assert "host3" not in result["nodes"] and len(result["nodes"]) == 3
    assert result["events"][0] == "EVENT_TYPE_NODE_AVAILABILITY_CHANGED"
    assert "EVENT_TYPE_CONTAINER_RESCHEDULED" in result["events"]
    assert result["events"][-1] == "EVENT_TYPE_NODE_DRAIN_COMPLETED"
    swarm.remove_service("drained")


def test_rolling_update_replaces_replicas_one_by_one(swarm: Swarm) -> None:
    result = swarm.client(
        """
cluster.CreateService(pb.CreateServiceRequest(spec=spec("roll", 3)))
old = {c.id for c in until_running("roll", 3)}
updates = []
stream = watch(pb.EventsRequest(service="roll"))
def follow():  # UpdateService's handle: the version it returns, and the service's events
    for e in stream:
        if e.type in (pb.EVENT_TYPE_SERVICE_UPDATE_STARTED, pb.EVENT_TYPE_SERVICE_UPDATE_COMPLETED):
            updates.append([pb.EventType.Name(e.type), e.service.version])
        if e.type == pb.EVENT_TYPE_SERVICE_UPDATE_COMPLETED:
            return
pool = ThreadPoolExecutor(1)
events = pool.submit(follow)
updated = cluster.UpdateService(pb.UpdateServiceRequest(
    service="roll", spec=spec("roll", 3, env=["V=2"], monitor=1.0), version=1)).service
stale = call("UpdateService", pb.UpdateServiceRequest(service="roll", spec=spec("roll", 3),
                                                       version=1))
samples = []
deadline = time.monotonic() + 90
while True:
    containers = ps("roll")
    samples.append(sum(1 for c in containers if c.status.state == RUNNING))
    fresh = [c for c in containers if c.id not in old and c.status.state == RUNNING]
    service = cluster.GetService(pb.GetServiceRequest(service="roll")).service
    if len(fresh) == 3 and service.update_state == pb.UPDATE_STATE_COMPLETED:
        break
    assert time.monotonic() < deadline, [(c.name, c.status.state) for c in containers]
    time.sleep(0.05)
events.result(timeout=90)
stream.cancel()
pool.shutdown()
# What the cluster recorded: when it placed each new replica, when its node started it.
fresh.sort(key=lambda c: c.scheduled_at.ToNanoseconds())
placed = [c.scheduled_at.ToNanoseconds() / 1e9 for c in fresh]
started = [c.status.started_at.ToNanoseconds() / 1e9 for c in fresh]
out({"version": updated.version, "stale": [stale["code"], stale["reason"]],
     "updating": pb.UpdateState.Name(updated.update_state), "updates": updates,
     "min_running": min(samples),
     "ran_before_next": [b - a for a, b in zip(started, placed[1:])],
     "env": sorted({e for c in fresh for e in c.spec.env}),
     "state": pb.UpdateState.Name(service.update_state)})
"""
    )
    assert isinstance(result, dict)
    assert (result["version"], result["stale"]) == (2, ["FAILED_PRECONDITION", "VERSION_MISMATCH"])
    # The returned version and Events(service=...) follow the rollout to its end.
    assert result["updating"] == "UPDATE_STATE_UPDATING"
    assert result["updates"] == [
        ["EVENT_TYPE_SERVICE_UPDATE_STARTED", 2],
        ["EVENT_TYPE_SERVICE_UPDATE_COMPLETED", 2],
    ]
    assert result["min_running"] >= 2  # never fewer than replicas - 1
    assert "V=2" in result["env"]
    # One at a time: the cluster placed each new replica only after the one before had run
    # for the monitor time (1 s), by its node's start time and the cluster's placement time.
    assert len(result["ran_before_next"]) == 2
    assert all(ran >= 1.0 for ran in result["ran_before_next"]), result["ran_before_next"]
    assert result["state"] == "UPDATE_STATE_COMPLETED"
    swarm.remove_service("roll")


def test_controller_fails_over_to_the_second_instance(swarm: Swarm) -> None:
    assert swarm.leaders() == ["cluster-1"]
    leader, follower = swarm.instances
    created = swarm.client(
        'cluster.CreateService(pb.CreateServiceRequest(spec=spec("fo", 3)))\n'
        'out(len(until_running("fo", 3)))',
        via=follower,  # any instance serves requests; the leader's controller places
    )
    assert created == 3
    leader.proc.send_signal(signal.SIGKILL)  # no resignation: the follower waits for the TTL
    leader.proc.wait()
    started = time.monotonic()  # only printed: failover time is a figure, not a promise
    while swarm.leaders() != ["cluster-2"]:
        assert time.monotonic() - started < 60, "no failover within a minute"
        time.sleep(0.2)
    failover = time.monotonic() - started
    host2 = swarm.net.hosts[1]
    swarm.net.cut(host2)
    try:
        moved = swarm.client(
            'out(sorted(c.node_id for c in until_running("fo", 3, timeout=90, avoid=("host2",))))'
        )
    finally:
        swarm.net.restore(host2)
    print(json.dumps({"failover_seconds": round(failover, 2)}))
    assert isinstance(moved, list) and "host2" not in moved and len(moved) == 3
    cleared = swarm.client(
        """
deadline = time.monotonic() + 30
while managed_on(sys.argv[4]) or len(ps("fo")) != 3:
    assert time.monotonic() < deadline
    time.sleep(0.2)
out(len(running("fo")))
""",
        swarm.agents["host2"].address,
    )
    assert cleared == 3
    swarm.remove_service("fo")


def test_a_failing_update_rolls_back_by_itself_and_by_hand(swarm: Swarm) -> None:
    """An update whose replicas turn unhealthy rolls back by itself (failure_action ROLLBACK):
    never more than `parallelism` replicas out of service, the spec is the previous one, the
    events say rollback. Then `service rollback` by hand returns from a good update."""
    result = swarm.client(
        """
from berth.types.v1 import container_pb2 as c2
def healthy_spec(env, probe="true", action=pb.UPDATE_FAILURE_ACTION_ROLLBACK):
    s = spec("back", 3, env=env, monitor=2.0)
    s.template.health_check.CopyFrom(c2.HealthCheck(
        test=["CMD-SHELL", probe], interval=Duration(nanos=300_000_000), retries=1))
    s.update_config.failure_action = action
    return s
def serving():  # running and healthy: in service
    return sum(1 for c in ps("back") if c.status.state == RUNNING
               and c.status.health.status == c2.HEALTH_STATUS_HEALTHY)
def until_state(state, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        samples.append(serving())
        service = cluster.GetService(pb.GetServiceRequest(service="back")).service
        if service.update_state == state and serving() == 3:
            return service
        assert time.monotonic() < deadline, (pb.UpdateState.Name(service.update_state),
                                             service.update_message)
        time.sleep(0.05)
cluster.CreateService(pb.CreateServiceRequest(spec=healthy_spec(["V=1"])))
samples = []
deadline = time.monotonic() + 90
while serving() < 3:
    assert time.monotonic() < deadline
    time.sleep(0.05)
never = call("UpdateService", pb.UpdateServiceRequest(service="back", rollback=True))
kinds = []
stream = watch(pb.EventsRequest(service="back"))
def follow():
    for e in stream:
        if e.type in (pb.EVENT_TYPE_SERVICE_UPDATE_STARTED, pb.EVENT_TYPE_SERVICE_UPDATE_PAUSED,
                      pb.EVENT_TYPE_SERVICE_ROLLBACK_STARTED,
                      pb.EVENT_TYPE_SERVICE_ROLLBACK_COMPLETED):
            kinds.append([pb.EventType.Name(e.type), e.message])
        if e.type == pb.EVENT_TYPE_SERVICE_ROLLBACK_COMPLETED:
            return
pool = ThreadPoolExecutor(1)
events = pool.submit(follow)
samples.clear()
cluster.UpdateService(pb.UpdateServiceRequest(service="back",
                                              spec=healthy_spec(["V=2"], probe="false")))
auto = until_state(pb.UPDATE_STATE_ROLLBACK_COMPLETED)
events.result(timeout=120)
stream.cancel()
pool.shutdown()
auto_min = min(samples)
auto_env = sorted({e for c in ps("back") for e in c.spec.env})
# A good update, then a rollback by hand.
cluster.UpdateService(pb.UpdateServiceRequest(service="back", spec=healthy_spec(["V=3"])))
until_state(pb.UPDATE_STATE_COMPLETED)
samples.clear()
manual = cluster.UpdateService(pb.UpdateServiceRequest(service="back", rollback=True)).service
done = until_state(pb.UPDATE_STATE_ROLLBACK_COMPLETED)
out({"never": [never["code"], never["reason"]], "kinds": kinds, "auto_min": auto_min,
     "auto_env": auto_env, "auto_spec_env": list(auto.spec.template.env),
     "auto_message": auto.update_message,
     "manual_state": pb.UpdateState.Name(manual.update_state),
     "manual_env": sorted({e for c in ps("back") for e in c.spec.env}),
     "manual_previous_env": list(done.previous_spec.template.env), "manual_min": min(samples)})
"""
    )
    assert isinstance(result, dict)
    assert result["never"] == ["FAILED_PRECONDITION", "NO_PREVIOUS_SPEC"]
    kinds = [k for k, _ in result["kinds"]]
    assert kinds == [
        "EVENT_TYPE_SERVICE_UPDATE_STARTED",
        "EVENT_TYPE_SERVICE_ROLLBACK_STARTED",
        "EVENT_TYPE_SERVICE_ROLLBACK_COMPLETED",
    ], result["kinds"]
    assert "unhealthy" in result["kinds"][1][1]
    # parallelism 1: at most one of the 3 replicas out of service at any sample.
    assert result["auto_min"] >= 2, result
    assert result["auto_spec_env"] == ["V=1"] and result["auto_env"] == ["V=1"]
    assert result["manual_state"] == "UPDATE_STATE_ROLLBACK_STARTED"
    assert result["manual_env"] == ["V=1"] and result["manual_previous_env"] == ["V=3"]
    assert result["manual_min"] >= 2, result
    swarm.remove_service("back")
