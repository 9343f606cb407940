"""Apply a StackPlan to the cluster, and find and remove a stack's objects.

A stack is client-side, as in Docker: nothing records it but the label
com.docker.stack.namespace=NAME on its services, networks and secrets. A second deploy compares
each desired ServiceSpec with the service's current one and updates only those that differ,
so an unchanged service keeps its version and its replicas.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from berth.client.cluster import ClusterClient
from berth.client.networks import NetworkClient
from berth.client.secrets import SecretClient
from berth.cluster.v1 import cluster_pb2 as pb
from berth.containers import from_spec, to_spec
from berth.errors import BerthClientError
from berth.stack.plan import NAMESPACE_LABEL, StackPlan
from berth.types.v1 import container_pb2 as types_pb

DEFAULT_MONITOR_SECONDS = 5
RESTART_NO = types_pb.RESTART_POLICY_NAME_NO
RESTART_ALWAYS = types_pb.RESTART_POLICY_NAME_ALWAYS
# How long `stack rm` waits for a network's last replica to go before giving up on it.
NETWORK_RM_TIMEOUT = 30.0


def _normal(spec: pb.ServiceSpec) -> pb.ServiceSpec:
    """`spec` as the cluster stores it: the template through berth's own container model
    (defaults filled the same way on both sides), ports in a stable order."""
    out = pb.ServiceSpec()
    out.CopyFrom(spec)
    out.template.CopyFrom(to_spec(from_spec(spec.template)))
    ports = sorted(out.endpoint_spec.ports, key=lambda p: (p.target_port, p.protocol))
    del out.endpoint_spec.ports[:]
    out.endpoint_spec.ports.extend(ports)
    # The cluster stores the defaults the proto documents: parallelism 0 is 1, no delay,
    # a 5 s monitor, and a replica's restart policy "no" is "always" (Swarm's "any").
    for update in (out.update_config, out.rollback_config):
        _normal_rollout(update)
    if out.template.restart_policy.name == RESTART_NO:
        out.template.restart_policy.name = RESTART_ALWAYS
    return out


def _normal_rollout(update: pb.UpdateConfig) -> None:
    """An update or rollback config with the defaults the cluster fills in (stop-first, pause)."""
    update.parallelism = update.parallelism or 1
    if not update.HasField("delay"):
        update.delay.FromSeconds(0)
    if not update.HasField("monitor"):
        update.monitor.FromSeconds(DEFAULT_MONITOR_SECONDS)
    update.order = update.order or pb.UPDATE_ORDER_STOP_FIRST
    update.failure_action = update.failure_action or pb.UPDATE_FAILURE_ACTION_PAUSE


def desired_for(desired: pb.ServiceSpec, current: pb.ServiceSpec) -> pb.ServiceSpec:
    """`desired`, with the published ports the cluster chose for the ports it asks the
    cluster to choose (published 0) taken from `current`, so they stay as they are."""
    out = pb.ServiceSpec()
    out.CopyFrom(desired)
    chosen = {(p.target_port, p.protocol): p.published_port for p in current.endpoint_spec.ports}
    for port in out.endpoint_spec.ports:
        if port.published_port == 0:
            port.published_port = chosen.get((port.target_port, port.protocol), 0)
    return out


def differences(desired: pb.ServiceSpec, current: pb.ServiceSpec) -> list[str]:
    """The spec fields (template.env, replicas, ...) deploying `desired` over a service whose
    spec is `current` would change; empty when it changes nothing."""
    want, have = _normal(desired_for(desired, current)), _normal(current)
    fields = [
        f"template.{f.name}"
        for f in pb.ServiceSpec.DESCRIPTOR.fields_by_name["template"].message_type.fields
        if getattr(want.template, f.name) != getattr(have.template, f.name)
    ]
    fields += [
        f.name
        for f in pb.ServiceSpec.DESCRIPTOR.fields
        if f.name != "template" and getattr(want, f.name) != getattr(have, f.name)
    ]
    return fields


def changed(desired: pb.ServiceSpec, current: pb.ServiceSpec) -> bool:
    """Whether deploying `desired` over a service whose spec is `current` changes it."""
    return bool(differences(desired, current))


def stack_services(client: ClusterClient, stack: str) -> list[pb.Service]:
    return client.service_messages({NAMESPACE_LABEL: stack})


def deploy(
    plan: StackPlan,
    cluster: ClusterClient,
    networks: NetworkClient,
    secrets: SecretClient,
    say: Callable[[str], None],
    prune: bool = False,
) -> dict[str, str]:
    """Make what is missing, update what changed; returns {service name: what happened}
    ("created", "updated", "unchanged", "removed")."""
    existing_networks = {n.name for n in networks.list()}
    for network in plan.networks:
        if network.name in existing_networks:
            continue
        if network.external:
            raise BerthClientError(
                f"network {network.name!r} is declared as external, but could not be found: "
                f"make it with `berth network create {network.name}`",
                "NOT_FOUND",
            )
        say(f"Creating network {network.name}")
        networks.create(network.name, network.subnet, network.internal, network.labels)
    existing_secrets = {s.name for s in secrets.list()}
    for secret in plan.secrets:
        if secret.name in existing_secrets:
            continue  # a secret's value cannot change (as in Swarm): rm the stack to renew it
        if secret.external:
            raise BerthClientError(
                f"secret {secret.name!r} is declared as external, but could not be found",
                "NOT_FOUND",
            )
        say(f"Creating secret {secret.name}")
        secrets.create(secret.name, secret.data, secret.labels)
    current = {s.spec.name: s for s in stack_services(cluster, plan.name)}
    done: dict[str, str] = {}
    for spec in plan.services:
        service = current.get(spec.name)
        if service is None:
            say(f"Creating service {spec.name}")
            cluster.create_service_spec(spec)
            done[spec.name] = "created"
        elif fields := differences(spec, service.spec):
            say(f"Updating service {spec.name} (id: {service.id[:25]}; {', '.join(fields)})")
            cluster.replace_service(service.id, desired_for(spec, service.spec), service.version)
            done[spec.name] = "updated"
        else:
            done[spec.name] = "unchanged"
    if prune:
        for name, service in sorted(current.items()):
            if name not in done:
                say(f"Removing service {name}")
                cluster.remove_service(service.id)
                done[name] = "removed"
    return done


def remove(
    stack: str,
    cluster: ClusterClient,
    networks: NetworkClient,
    secrets: SecretClient,
    say: Callable[[str], None],
) -> bool:
    """Remove the stack's services, then its secrets and networks (once no replica is on them);
    False when the stack has nothing."""
    labels = {NAMESPACE_LABEL: stack}
    services = stack_services(cluster, stack)
    owned_secrets = secrets.list(labels)
    owned_networks = networks.list(labels)
    for service in sorted(services, key=lambda s: s.spec.name):
        say(f"Removing service {service.spec.name}")
        cluster.remove_service(service.id)
    for secret in owned_secrets:
        say(f"Removing secret {secret.name}")
        _until_free(lambda name=secret.name: secrets.remove(name))
    for network in owned_networks:
        say(f"Removing network {network.name}")
        _until_free(lambda name=network.name: networks.remove(name))
    return bool(services or owned_secrets or owned_networks)


def _until_free(remove: Callable[[], object]) -> None:
    """Retry a removal refused because a replica being removed still uses the object."""
    deadline = time.monotonic() + NETWORK_RM_TIMEOUT
    while True:
        try:
            remove()
            return
        except BerthClientError as err:
            if err.code != "FAILED_PRECONDITION" or time.monotonic() > deadline:
                raise
        time.sleep(0.2)
