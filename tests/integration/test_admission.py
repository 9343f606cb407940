"""Admission of host-level power and the actors of events, for real: a cluster, a node agent
(runc), etcd, a developer's token over the cluster's public port and the admin's certificate.

- A developer cannot bind-mount `/`, add a capability, drop seccomp or use the host network
  (PERMISSION_DENIED, HOST_ACCESS_DENIED, one violation per reason) through RunContainer,
  CreateService or UpdateService, and nothing is written; the admin can, and it runs.
- A desired record written straight into etcd with a host bind and no admission stamp is not
  created by its node: CREATE_FAILED, HOST_ACCESS_DENIED.
- Events name who did what: `user:dev`, `user:admin`, `node:<id>`.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from berth.client import ClusterClient, ContainerConfig, NodeClient
from berth.cluster.v1 import cluster_pb2 as pb
from berth.cluster.v1 import cluster_pb2_grpc
from berth.containers import MountSpec, to_spec
from berth.error_details import from_rpc_error
from berth.node.v1 import node_pb2, node_pb2_grpc
from berth.tls import secure_channel
from berth.types.v1 import container_pb2
from berthd.cluster.services import SERVICES, ServiceRecord
from berthd.common.security.tokens import TOKENS, new_token
from berthd.common.state.containers import (
    CONTAINERS,
    STATUSES,
    DesiredContainer,
    delete_desired,
    put_desired,
)
from berthd.common.store import Store

from .conftest import ClusterCA, NodeProcess, ServiceProcess, Services, wait_until

pytestmark = pytest.mark.integration

# What a developer may not ask for, and the violation (type, subject) each one gives, in the
# order of the spec's fields (the order of the violations).
HOST_POWER = [
    ({"mounts": [MountSpec("/", "/host", read_only=True)]}, ("HOST_BIND_MOUNT", "mount//")),
    ({"network_mode": "host"}, ("HOST_NETWORK", "network/host")),
    ({"cap_add": ["SYS_ADMIN"]}, ("CAPABILITY", "capability/CAP_SYS_ADMIN")),
    ({"security_opt": ["seccomp=unconfined"]}, ("SECCOMP_UNCONFINED", "security_opt/seccomp")),
]


@dataclass
class Setup:
    cluster: ServiceProcess
    node: NodeProcess
    image: str
    # A developer's stub on the public port (token) and the admin's (certificate).
    developer: _Authorized
    admin: ClusterClient


def bearer(secret: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {secret}"),)


@pytest.fixture
async def setup(
    services: Services,
    node_agent: NodeProcess,
    busybox: str,
    store: Store,
    cluster_ca: ClusterCA,
) -> AsyncIterator[Setup]:
    cluster = services.start("cluster")
    record, secret = new_token("dev", "developer", [], 0, "test")
    await TOKENS.put(store, record.id, record)
    channel = grpc.secure_channel(
        cluster.public_address, grpc.ssl_channel_credentials(cluster_ca.ca_cert.read_bytes())
    )
    stub = cluster_pb2_grpc.ClusterServiceStub(channel)
    developer = _Authorized(stub, bearer(secret))
    with ClusterClient(cluster.address) as admin:
        wait_until(lambda: [n for n in admin.nodes() if n.state == "ready"], 30, "the node")
        try:
            yield Setup(cluster, node_agent, busybox, developer, admin)
        finally:
            for c in admin.list(all=True):
                admin.remove(c.id, force=True)
            channel.close()


class _Authorized:
    """A stub whose every call carries the token."""

    def __init__(self, stub: object, metadata: tuple) -> None:
        self._stub = stub
        self._metadata = metadata

    def __getattr__(self, name: str):
        method = getattr(self._stub, name)
        return lambda request, **kw: method(request, metadata=self._metadata, timeout=30, **kw)


def spec(image: str, **options) -> container_pb2.ContainerSpec:
    return to_spec(ContainerConfig(image, command=["sh", "-c", "sleep 1000"], **options))


def refused(call) -> tuple[str, list[tuple[str, str]], str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
    details = from_rpc_error(error)
    return details.reason, [(v.type, v.subject) for v in details.violations], error.details()


async def test_a_developer_cannot_ask_for_host_power_and_an_admin_can(
    setup: Setup, store: Store
) -> None:
    dev = setup.developer
    # A confined container is fine for a developer.
    plain = dev.RunContainer(pb.RunContainerRequest(spec=spec(setup.image))).container
    dev.CreateService(
        pb.CreateServiceRequest(
            spec=pb.ServiceSpec(name="web", template=spec(setup.image), replicas=0)
        )
    )
    for options, violation in HOST_POWER:
        run = pb.RunContainerRequest(spec=spec(setup.image, **options))
        reason, violations, message = refused(lambda r=run: dev.RunContainer(r))
        assert (reason, violations) == ("HOST_ACCESS_DENIED", [violation]), message
        assert message.startswith("user:dev may not give a container host access"), message
        service = pb.ServiceSpec(name="hostly", template=spec(setup.image, **options), replicas=1)
        create = pb.CreateServiceRequest(spec=service)
        reason, violations, _ = refused(lambda r=create: dev.CreateService(r))
        assert (reason, violations) == ("HOST_ACCESS_DENIED", [violation])
        service.name = "web"
        update = pb.UpdateServiceRequest(service="web", spec=service)
        reason, violations, _ = refused(lambda r=update: dev.UpdateService(r))
        assert (reason, violations) == ("HOST_ACCESS_DENIED", [violation])
    # Every reason at once: one violation each.
    everything = spec(setup.image, **{k: v for o, _ in HOST_POWER for k, v in o.items()})
    _, violations, _ = refused(lambda: dev.RunContainer(pb.RunContainerRequest(spec=everything)))
    assert violations == [v for _, v in HOST_POWER]

    # Nothing was written: the developer's own container and service only, unchanged.
    assert [v.id for v in await CONTAINERS.list(store)] == [plain.id]
    (web,) = [ServiceRecord.from_json(e.value) for e in await store.list(SERVICES)]
    assert (web.name, web.version, web.host_access_by, web.changed_by) == ("web", 1, "", "user:dev")
    assert (web.template.mounts, web.template.network_mode) == ([], "none")

    # The admin can, and the container runs with the host's / under /host, in the host's
    # network namespace (this process's: the node agent runs on the host).
    host = ContainerConfig(
        setup.image,
        command=["sh", "-c", "readlink /proc/self/ns/net; test -d /host/etc/ssl"],
        mounts=[MountSpec("/", "/host", read_only=True)],
        network_mode="host",
        cap_add=["NET_ADMIN"],
        security_opt=["seccomp=unconfined"],
    )
    box = setup.admin.run(host)
    code = setup.admin.wait(box.id)
    output = b"".join(line.data for line in setup.admin.logs(box.id)).decode()
    assert (code, output.strip()) == (0, os.readlink("/proc/self/ns/net")), output
    stored = await CONTAINERS.get(store, box.id)
    assert stored is not None
    assert (stored.host_access_by, stored.changed_by) == ("user:admin", "user:admin")
    # The developer's confined container carries no stamp.
    mine = await CONTAINERS.get(store, plain.id)
    assert mine is not None and (mine.host_access_by, mine.changed_by) == ("", "user:dev")

    # A service the admin creates with host access: its replicas carry the stamp and run.
    setup.admin.create_service(
        "hostnet",
        ContainerConfig(setup.image, command=["sh", "-c", "sleep 1000"], network_mode="host"),
        replicas=1,
    )

    def running() -> bool:
        return any(c.state == "running" for c in setup.admin.service_ps("hostnet"))

    wait_until(running, 45, "the host-network replica")
    (replica,) = setup.admin.service_ps("hostnet")
    stored = await CONTAINERS.get(store, replica.id)
    assert stored is not None
    assert (stored.host_access_by, stored.changed_by) == ("user:admin", "service:cluster")
    # A developer may scale it (the spec does not change) but not update it to host power.
    dev.ScaleService(pb.ScaleServiceRequest(service="hostnet", replicas=1))
    current = dev.GetService(pb.GetServiceRequest(service="hostnet")).service
    reason, _, _ = refused(
        lambda: dev.UpdateService(pb.UpdateServiceRequest(service="hostnet", spec=current.spec))
    )
    assert reason == "HOST_ACCESS_DENIED"
    setup.admin.remove_service("hostnet")
    setup.admin.remove_service("web")


async def test_an_unstamped_host_access_record_is_not_created_by_its_node(
    setup: Setup, store: Store
) -> None:
    node_id = setup.node.node_id
    forged = DesiredContainer(
        id="f" * 64,
        name="forged",
        node=node_id,
        config=ContainerConfig(
            setup.image,
            command=["cat", "/host/etc/shadow"],
            mounts=[MountSpec("/", "/host")],
        ),
    )
    await put_desired(store, forged)  # with its node's assignment key, as the cluster writes

    async def failed() -> bool:
        status = await STATUSES.get(store, forged.id)
        return status is not None and status.create_failed

    deadline = time.monotonic() + 30
    while not await failed():
        assert time.monotonic() < deadline, "the node did not report the forged record"
        await asyncio.sleep(0.1)
    status = await STATUSES.get(store, forged.id)
    assert status is not None
    assert (status.node, status.failure_reason) == (node_id, "HOST_ACCESS_DENIED")
    assert "bind mount of host path / at /host" in status.failure_message
    # It reaches the API as the container's failure.
    seen = setup.admin.inspect(forged.id)
    assert (seen.state, seen.failure_reason) == ("create_failed", "HOST_ACCESS_DENIED")
    # Nothing was created on the node, nor its image pulled for it.
    with NodeClient(setup.node.address) as node:
        assert [c.id for c in node.list(all=True)] == []
        assert node.images() == []
    await delete_desired(store, forged)


async def test_the_node_agent_itself_admits_host_power(setup: Setup, cluster_ca: ClusterCA) -> None:
    # berth's image service may call a node agent (NODE_AGENT) but holds no host access.
    cert = cluster_ca.issue("image-service", "service:image")
    credentials = grpc.ssl_channel_credentials(
        cluster_ca.ca_cert.read_bytes(),
        cert.with_suffix(".key").read_bytes(),
        cert.read_bytes(),
    )
    with grpc.secure_channel(setup.node.address, credentials) as channel:
        stub = node_pb2_grpc.NodeServiceStub(channel)
        request = node_pb2.CreateContainerRequest(spec=spec(setup.image, network_mode="host"))
        reason, violations, message = refused(lambda: stub.CreateContainer(request, timeout=30))
        assert (reason, violations) == ("HOST_ACCESS_DENIED", [("HOST_NETWORK", "network/host")])
        assert message.startswith("service:image may not give a container host access")


async def test_events_name_who_did_what(setup: Setup) -> None:
    events: list[pb.EventsResponse] = []
    with secure_channel(setup.cluster.address) as channel:
        stream = cluster_pb2_grpc.ClusterServiceStub(channel).Events(
            pb.EventsRequest(
                types=[pb.EVENT_TYPE_CONTAINER_SCHEDULED, pb.EVENT_TYPE_CONTAINER_STARTED]
            )
        )

        def follow() -> None:
            try:
                for event in stream:
                    events.append(event)
            except grpc.RpcError:
                pass  # cancelled at the end

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        try:
            stream.initial_metadata()  # the stream watches: it sees what follows
            mine = setup.developer.RunContainer(
                pb.RunContainerRequest(spec=spec(setup.image, name="devs"))
            ).container
            admins = setup.admin.run(
                ContainerConfig(setup.image, name="admins", command=["sleep", "1000"])
            )

            def seen() -> dict[tuple[str, int], str]:
                return {(e.container.name, e.type): e.actor for e in events}

            wanted = {
                ("devs", pb.EVENT_TYPE_CONTAINER_SCHEDULED): "user:dev",
                ("admins", pb.EVENT_TYPE_CONTAINER_SCHEDULED): "user:admin",
                ("devs", pb.EVENT_TYPE_CONTAINER_STARTED): f"node:{setup.node.node_id}",
                ("admins", pb.EVENT_TYPE_CONTAINER_STARTED): f"node:{setup.node.node_id}",
            }
            wait_until(lambda: wanted.items() <= seen().items(), 45, f"the events {wanted}")
            assert mine.name == "devs" and admins.name == "admins"
        finally:
            stream.cancel()
            follower.join(5)
