"""A checked compose file as what berth makes of it: a StackPlan of networks, secrets and
ServiceSpecs, named and labelled as `docker stack deploy` names them (NAME_web, NAME_default,
label com.docker.stack.namespace=NAME).

Every key of a service is mapped or refused with its path and the reason: a file is deployed
as written or not at all.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import duration_pb2

from berth.cluster.v1 import cluster_pb2 as pb
from berth.containers import (
    ContainerConfig,
    InvalidContainerConfig,
    MountSpec,
    SecretReference,
    to_spec,
)
from berth.enums.cluster import UPDATE_ORDERS
from berth.health import CMD_SHELL, HealthConfig, InvalidHealthCheck
from berth.health import NONE as HEALTH_NONE
from berth.ports import InvalidPort, PublishedPort, parse_service_publish
from berth.stack.compose import ComposeError, key_path, read_env_file

NAMESPACE_LABEL = "com.docker.stack.namespace"
DEFAULT_NETWORK = "default"

# Service keys mapped below; any other key the schema allows is refused (see _refuse_unknown).
_SERVICE_KEYS = {
    "image",
    "build",
    "command",
    "entrypoint",
    "environment",
    "env_file",
    "ports",
    "volumes",
    "networks",
    "network_mode",
    "secrets",
    "healthcheck",
    "depends_on",
    "deploy",
    "labels",
    "hostname",
    "user",
    "working_dir",
    "read_only",
    "cap_add",
    "cap_drop",
    "tty",
    "stdin_open",
}
_DEPLOY_KEYS = {
    "mode",
    "replicas",
    "labels",
    "resources",
    "placement",
    "update_config",
    "rollback_config",
    "restart_policy",
    "endpoint_mode",
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_DURATION_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1,
    "m": 60,
    "h": 3600,
}
_CONSTRAINT = re.compile(r"\s*([A-Za-z0-9_.\-/]+)\s*(==|!=)\s*(\S.*?)\s*")
# A service's replica is always restarted when it exits (the cluster makes "no" "always"),
# so Compose's condition none has no equivalent.
_RESTART_CONDITIONS = {"on-failure": "on-failure", "any": "always"}


@dataclass
class NetworkPlan:
    """A network of the stack: made as `name` unless external (then it must exist)."""

    name: str
    external: bool = False
    internal: bool = False
    subnet: str = ""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class SecretPlan:
    """A secret of the stack: made as `name` from `data` unless external."""

    name: str
    external: bool = False
    data: bytes = b""
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class StackPlan:
    name: str
    networks: list[NetworkPlan]
    secrets: list[SecretPlan]
    # Services in creation order (depends_on first), by their full name.
    services: list[pb.ServiceSpec]
    # Things accepted but not applied, one line each ("rollback_config ... not applied yet").
    warnings: list[str] = field(default_factory=list)


def _fail(path: tuple[Any, ...], message: str) -> ComposeError:
    return ComposeError(f"{key_path(path)}: {message}")


def _int(value: Any, path: tuple[Any, ...]) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise _fail(path, f"expected a whole number, got {value!r}") from None
    if number < 0:
        raise _fail(path, f"must not be negative, got {number}")
    return number


def parse_size(value: Any, path: tuple[Any, ...]) -> int:
    """Bytes from 512, "512b", "64m", "1.5gb" (Compose's byte values)."""
    match = _SIZE.fullmatch(str(value).strip())
    if not match:
        raise _fail(path, f"invalid size {value!r}: use a number with a unit b, k, m or g")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[unit.lower()])


def parse_duration(value: Any, path: tuple[Any, ...]) -> duration_pb2.Duration:
    """Compose's durations ("10s", "1m30s", "500ms") as a protobuf Duration."""
    text = str(value).strip()
    if not text or not re.fullmatch(rf"(?:{_DURATION.pattern})+", text):
        raise _fail(path, f"invalid duration {value!r}: use units ms, s, m, h (e.g. 10s, 1m30s)")
    seconds = sum(float(n) * _DURATION_SECONDS[u] for n, u in _DURATION.findall(text))
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(seconds * 1e9))
    return duration


def _cpus(value: Any, path: tuple[Any, ...]) -> int:
    try:
        cpus = float(str(value))
    except ValueError:
        cpus = math.nan
    if not math.isfinite(cpus) or cpus < 0:
        raise _fail(path, f"invalid number of CPUs {value!r}: e.g. 0.5 or 2")
    return round(cpus * 1000)


def _args(value: Any) -> list[str]:
    """command/entrypoint: a list as is, a string split as a shell would."""
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value) if value else [""]
    return [str(v) for v in value]


def _mapping(value: Any, path: tuple[Any, ...]) -> dict[str, str | None]:
    """A list_or_dict (environment, labels) as a dict; a value-less entry is None."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {k: None if v is None else _scalar(v) for k, v in value.items()}
    entries: dict[str, str | None] = {}
    for entry in value:
        key, sep, rest = str(entry).partition("=")
        if not key:
            raise _fail(path, f"invalid entry {entry!r}: use KEY=VALUE")
        entries[key] = rest if sep else None
    return entries


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _names(value: Any) -> list[str]:
    """A list of names, or a mapping whose keys are the names (networks, depends_on)."""
    if value is None:
        return []
    return list(value) if isinstance(value, dict) else [str(v) for v in value]


# --- the whole file ---------------------------------------------------------------------------


def make_plan(
    stack: str, data: dict[str, Any], base: Path, env: dict[str, str] | None = None
) -> StackPlan:
    """What deploying `data` (a checked compose file in directory `base`) as `stack` makes."""
    import os

    env = dict(os.environ) if env is None else env
    labels = {NAMESPACE_LABEL: stack}
    plan = StackPlan(stack, [], [], [])
    services: dict[str, Any] = data["services"]
    networks = _network_plans(stack, data.get("networks") or {}, labels)
    used_networks: set[str] = set()
    specs: dict[str, pb.ServiceSpec] = {}
    for name, service in services.items():
        builder = _ServiceBuilder(stack, name, service or {}, data, base, env, plan)
        specs[name] = builder.spec()
        used_networks.update(builder.networks)
    for key in sorted(used_networks):
        if key == DEFAULT_NETWORK and key not in networks:
            networks[key] = NetworkPlan(f"{stack}_{DEFAULT_NETWORK}", labels=dict(labels))
        plan.networks.append(networks[key])
    plan.secrets = _secret_plans(stack, data.get("secrets") or {}, specs, base, env, labels)
    plan.services = [specs[name] for name in creation_order(services)]
    return plan


def creation_order(services: dict[str, Any]) -> list[str]:
    """Service names with every service after those it depends_on (file order otherwise)."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, chain: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join([*chain[chain.index(name) :], name])
            raise ComposeError(f"services: depends_on has a cycle: {cycle}")
        state[name] = "visiting"
        for dependency in _names((services[name] or {}).get("depends_on")):
            if dependency not in services:
                raise _fail(
                    ("services", name, "depends_on"),
                    f"service {dependency!r} is not defined in this file",
                )
            visit(dependency, [*chain, name])
        state[name] = "done"
        order.append(name)

    for name in services:
        visit(name, [])
    return order


def _network_plans(
    stack: str, networks: dict[str, Any], labels: dict[str, str]
) -> dict[str, NetworkPlan]:
    plans = {}
    for key, network in networks.items():
        network = network or {}
        path = ("networks", key)
        driver = network.get("driver", "overlay")
        if driver not in ("overlay", "bridge"):
            raise _fail((*path, "driver"), f"berth networks are overlay networks, not {driver!r}")
        for unsupported in ("driver_opts", "enable_ipv6", "enable_ipv4"):
            if network.get(unsupported):
                raise _fail((*path, unsupported), "not supported by berth networks")
        external = bool(network.get("external"))
        name = network.get("name") or (key if external else f"{stack}_{key}")
        configs = (network.get("ipam") or {}).get("config") or []
        if len(configs) > 1:
            raise _fail((*path, "ipam", "config"), "a berth network has one subnet")
        plans[key] = NetworkPlan(
            name=name,
            external=external,
            internal=bool(network.get("internal")),
            subnet=(configs[0].get("subnet") or "") if configs else "",
            labels={**{k: v or "" for k, v in _mapping(network.get("labels"), path).items()}}
            | labels,
        )
    return plans


def _secret_plans(
    stack: str,
    secrets: dict[str, Any],
    specs: dict[str, pb.ServiceSpec],
    base: Path,
    env: dict[str, str],
    labels: dict[str, str],
) -> list[SecretPlan]:
    used = {ref.name for spec in specs.values() for ref in spec.template.secrets}
    plans = []
    for key, secret in secrets.items():
        secret = secret or {}
        path = ("secrets", key)
        name = secret.get("name") or (key if secret.get("external") else f"{stack}_{key}")
        if name not in used:
            continue
        if secret.get("external"):
            plans.append(SecretPlan(name, external=True))
        elif "file" in secret:
            source = base / secret["file"]
            try:
                value = source.read_bytes()
            except OSError as err:
                raise _fail((*path, "file"), f"{source}: {err.strerror}") from None
            plans.append(SecretPlan(name, data=value, labels=dict(labels)))
        elif "environment" in secret:
            variable = secret["environment"]
            if variable not in env:
                raise _fail((*path, "environment"), f"variable {variable} is not set")
            plans.append(SecretPlan(name, data=env[variable].encode(), labels=dict(labels)))
        else:
            raise _fail(path, "give file:, environment: or external: true")
    return plans


class _ServiceBuilder:
    """One compose service as a ServiceSpec; `networks` the stack networks (keys) it uses."""

    def __init__(
        self,
        stack: str,
        name: str,
        service: dict[str, Any],
        data: dict[str, Any],
        base: Path,
        env: dict[str, str],
        plan: StackPlan,
    ) -> None:
        self.stack, self.name, self.service = stack, name, service
        self.data, self.base, self.env, self.plan = data, base, env, plan
        self.path: tuple[Any, ...] = ("services", name)
        self.deploy: dict[str, Any] = service.get("deploy") or {}
        self.networks: list[str] = []

    def spec(self) -> pb.ServiceSpec:
        self._refuse_unknown()
        config = self._container()
        try:
            config.validate()
            template = to_spec(config)
        except InvalidContainerConfig as err:
            raise _fail(self.path, err.message) from None
        labels = {k: v or "" for k, v in _mapping(self.deploy.get("labels"), self.path).items()}
        return pb.ServiceSpec(
            name=f"{self.stack}_{self.name}",
            template=template,
            replicas=_int(self.deploy.get("replicas", 1), (*self.path, "deploy", "replicas")),
            placement=self._placement(),
            update_config=self._update_config(),
            labels={**labels, NAMESPACE_LABEL: self.stack},
            endpoint_spec=pb.EndpointSpec(ports=[_published(p) for p in self._ports()]),
        )

    # --- what berth cannot do ---

    def _refuse_unknown(self) -> None:
        for key in self.service:
            if key not in _SERVICE_KEYS and not key.startswith("x-"):
                raise _fail((*self.path, key), "not supported by berth stack deploy")
        for key in self.deploy:
            if key not in _DEPLOY_KEYS and not key.startswith("x-"):
                raise _fail((*self.path, "deploy", key), "not supported by berth stack deploy")
        if "build" in self.service:
            raise _fail(
                (*self.path, "build"),
                "building is not supported by stack deploy yet: build and push the image "
                "(berth build -t NAME .) and name it in image:",
            )
        if not self.service.get("image"):
            raise _fail(self.path, "image is required")
        if self.deploy.get("mode", "replicated") != "replicated":
            raise _fail(
                (*self.path, "deploy", "mode"), "berth services are replicated (no global mode)"
            )
        if self.deploy.get("endpoint_mode", "vip") != "vip":
            raise _fail(
                (*self.path, "deploy", "endpoint_mode"),
                "berth services are reached through a virtual address (vip) only",
            )
        self._healthcheck()  # refused here, with its path, before anything is made

    def _healthcheck(self) -> HealthConfig | None:
        """Compose's `healthcheck` as Docker's HealthConfig (the string form of `test` is
        CMD-SHELL, `disable: true` is NONE); None when the file has none: the image's."""
        check = self.service.get("healthcheck")
        if check is None:
            return None
        path = (*self.path, "healthcheck")
        if check.get("disable"):
            return HealthConfig(test=[HEALTH_NONE])
        if "start_interval" in check:
            raise _fail((*path, "start_interval"), "not supported by berth")
        test = check.get("test")
        if test is None:
            raise _fail((*path, "test"), "a health check needs a test (or disable: true)")
        config = HealthConfig(
            test=[CMD_SHELL, test] if isinstance(test, str) else [str(t) for t in test],
            retries=_int(check.get("retries", 0), (*path, "retries")),
        )
        for key in ("interval", "timeout", "start_period"):
            if key in check:
                setattr(config, key, parse_duration(check[key], (*path, key)).ToNanoseconds())
        try:
            config.validate()
        except InvalidHealthCheck as exc:
            raise _fail(path, str(exc)) from None
        return config

    # --- the container ---

    def _container(self) -> ContainerConfig:
        s = self.service
        resources = (self.deploy.get("resources") or {}).get("limits") or {}
        limits_path = (*self.path, "deploy", "resources", "limits")
        for key in resources:
            if key not in ("cpus", "memory", "pids"):
                raise _fail((*limits_path, key), "not supported by berth")
        restart, retries = self._restart_policy()
        network_mode, aliases = self._network()
        return ContainerConfig(
            image=str(s["image"]),
            entrypoint=_args(s.get("entrypoint")),
            command=_args(s.get("command")),
            env=self._environment(),
            working_dir=s.get("working_dir") or "",
            user=str(s.get("user") or ""),
            hostname=s.get("hostname") or "",
            labels={
                **{k: v or "" for k, v in _mapping(s.get("labels"), self.path).items()},
                NAMESPACE_LABEL: self.stack,
            },
            mounts=self._mounts(),
            read_only_rootfs=bool(s.get("read_only")),
            memory_bytes=parse_size(resources["memory"], (*limits_path, "memory"))
            if "memory" in resources
            else 0,
            cpu_millis=_cpus(resources["cpus"], (*limits_path, "cpus"))
            if "cpus" in resources
            else 0,
            pids_limit=_int(resources.get("pids", 0), (*limits_path, "pids")),
            restart_policy=restart,
            restart_max_retries=retries,
            network_mode=network_mode,
            network_aliases=aliases,
            tty=bool(s.get("tty")),
            stdin_open=bool(s.get("stdin_open")),
            cap_add=list(s.get("cap_add") or []),
            cap_drop=list(s.get("cap_drop") or []),
            secrets=self._secrets(),
            health_check=self._healthcheck(),
        )

    def _environment(self) -> list[str]:
        """env_file entries first, environment over them (docker compose's order); a
        value-less entry takes the deploying shell's value or is dropped."""
        merged: dict[str, str | None] = {}
        files = self.service.get("env_file")
        for i, entry in enumerate([files] if isinstance(files, str) else files or []):
            path = entry if isinstance(entry, str) else entry["path"]
            required = True if isinstance(entry, str) else entry.get("required", True)
            source = self.base / path
            if not source.is_file():
                if required:
                    raise _fail((*self.path, "env_file", i), f"{source}: no such file")
                continue
            merged.update(read_env_file(source))
        merged.update(_mapping(self.service.get("environment"), (*self.path, "environment")))
        values = {k: v if v is not None else self.env.get(k) for k, v in merged.items()}
        return [f"{k}={v}" for k, v in values.items() if v is not None]

    def _restart_policy(self) -> tuple[str, int]:
        policy = self.deploy.get("restart_policy") or {}
        path = (*self.path, "deploy", "restart_policy")
        for key in ("delay", "window"):
            if key in policy:
                raise _fail((*path, key), "not supported by berth: a node restarts at once")
        condition = policy.get("condition", "any")
        if condition not in _RESTART_CONDITIONS:
            raise _fail((*path, "condition"), "use on-failure or any")
        retries = _int(policy.get("max_attempts", 0), (*path, "max_attempts"))
        if retries and condition != "on-failure":
            raise _fail((*path, "max_attempts"), "berth counts attempts with on-failure only")
        return _RESTART_CONDITIONS[condition], retries

    def _network(self) -> tuple[str, list[str]]:
        """network_mode host/none, or the one stack network the service joins (a berth
        container is on one network) with its aliases."""
        mode = self.service.get("network_mode")
        if mode is not None:
            if mode not in ("host", "none"):
                raise _fail((*self.path, "network_mode"), "use host or none, or networks:")
            if "networks" in self.service:
                raise _fail((*self.path, "network_mode"), "conflicts with networks:")
            return mode, []
        wanted = self.service.get("networks") or [DEFAULT_NETWORK]
        names = _names(wanted)
        if len(names) != 1:
            raise _fail(
                (*self.path, "networks"),
                "a berth service joins one network: name one (aliases give it more names)",
            )
        key = names[0]
        declared = self.data.get("networks") or {}
        if key != DEFAULT_NETWORK and key not in declared:
            raise _fail((*self.path, "networks", key), "network is not declared in networks:")
        options = (wanted.get(key) or {}) if isinstance(wanted, dict) else {}
        for option in options:
            if option != "aliases":
                raise _fail((*self.path, "networks", key, option), "not supported by berth")
        self.networks.append(key)
        full = declared.get(key) or {}
        name = full.get("name") or (key if full.get("external") else f"{self.stack}_{key}")
        # The service's key is a name on the network, as Docker's stack deploy makes it.
        aliases = [self.name, *(str(a) for a in options.get("aliases") or [])]
        return name, list(dict.fromkeys(aliases))

    def _ports(self) -> list[PublishedPort]:
        ports = []
        for i, entry in enumerate(self.service.get("ports") or []):
            path = (*self.path, "ports", i)
            if isinstance(entry, dict):
                if entry.get("host_ip"):
                    raise _fail(path, "a service publishes on every node: no host_ip")
                text = ",".join(
                    f"{k}={entry[k]}"
                    for k in ("target", "published", "protocol", "mode")
                    if entry.get(k) not in (None, "")
                )
            else:
                text = str(entry)
            try:
                ports.append(parse_service_publish(text))
            except InvalidPort as err:
                raise _fail(path, err.message) from None
        return ports

    def _mounts(self) -> list[MountSpec]:
        declared = self.data.get("volumes") or {}
        mounts = []
        for i, entry in enumerate(self.service.get("volumes") or []):
            path = (*self.path, "volumes", i)
            if isinstance(entry, str):
                parts = entry.split(":")
                if len(parts) == 1:
                    raise _fail(path, "anonymous volumes are not supported: give SOURCE:TARGET")
                if len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
                    raise _fail(path, f"invalid volume {entry!r}: use SOURCE:TARGET[:ro|rw]")
                kind = "bind" if parts[0].startswith((".", "/", "~")) else "volume"
                source, target, read_only = parts[0], parts[1], parts[2:] == ["ro"]
            else:
                kind = entry.get("type", "volume")
                source, target = entry.get("source") or "", entry["target"]
                read_only = bool(entry.get("read_only"))
            if kind == "bind":
                source = str((self.base / Path(source).expanduser()).resolve())
            elif kind == "volume":
                if source not in declared:
                    raise _fail(path, f"volume {source!r} is not declared in volumes:")
                volume = declared[source] or {}
                if volume.get("driver", "local") != "local" or volume.get("driver_opts"):
                    raise _fail(("volumes", source), "berth volumes are local, without options")
                external = volume.get("external")
                source = volume.get("name") or (source if external else f"{self.stack}_{source}")
            else:
                raise _fail(path, f"type {kind} is not supported: use bind or volume")
            mounts.append(MountSpec(source, target, read_only))
        return mounts

    def _secrets(self) -> list[SecretReference]:
        declared = self.data.get("secrets") or {}
        refs = []
        for i, entry in enumerate(self.service.get("secrets") or []):
            path = (*self.path, "secrets", i)
            long = entry if isinstance(entry, dict) else {"source": entry}
            key = long["source"]
            if key not in declared:
                raise _fail(path, f"secret {key!r} is not declared in secrets:")
            secret = declared[key] or {}
            name = secret.get("name") or (key if secret.get("external") else f"{self.stack}_{key}")
            mode = long.get("mode", 0)
            refs.append(
                SecretReference(
                    name=name,
                    # Docker mounts a stack secret under its key, not its stack name.
                    target=str(long.get("target") or key),
                    mode=int(str(mode), 8) if isinstance(mode, str) else int(mode),
                    uid=_int(long.get("uid", 0), (*path, "uid")),
                    gid=_int(long.get("gid", 0), (*path, "gid")),
                )
            )
        return refs

    # --- the service ---

    def _placement(self) -> pb.Placement:
        placement = self.deploy.get("placement") or {}
        path = (*self.path, "deploy", "placement")
        for key in placement:
            if key != "constraints":
                raise _fail((*path, key), "not supported by berth: only constraints")
        constraints = []
        for i, text in enumerate(placement.get("constraints") or []):
            match = _CONSTRAINT.fullmatch(str(text))
            if not match:
                raise _fail((*path, "constraints", i), "use KEY==VALUE or KEY!=VALUE")
            constraints.append("".join(match.groups()))
        reservations = (self.deploy.get("resources") or {}).get("reservations") or {}
        res_path = (*self.path, "deploy", "resources", "reservations")
        for key in reservations:
            if key not in ("cpus", "memory"):
                raise _fail((*res_path, key), "not supported by berth: only cpus and memory")
        request = pb.ResourceAmounts(
            cpu_millis=_cpus(reservations.get("cpus", 0), (*res_path, "cpus")),
            memory_bytes=parse_size(reservations.get("memory", 0), (*res_path, "memory")),
        )
        return pb.Placement(request=request, constraints=constraints)

    def _update_config(self) -> pb.UpdateConfig:
        """update_config as berth's rolling update runs today: either order, pause on failure.
        rollback_config is checked the same way and reported as not applied."""
        config = self._rollout("update_config", ("pause",))
        if self.deploy.get("rollback_config") is not None:
            self._rollout("rollback_config", ("pause", "continue"))
            self.plan.warnings.append(
                f"{key_path((*self.path, 'deploy', 'rollback_config'))}: not applied yet "
                "(berth has no service rollback)"
            )
        return config

    def _rollout(self, key: str, actions: tuple[str, ...]) -> pb.UpdateConfig:
        given = self.deploy.get(key) or {}
        path = (*self.path, "deploy", key)
        if given.get("failure_action", "pause") not in actions:
            raise _fail((*path, "failure_action"), f"berth supports {' and '.join(actions)} only")
        if float(str(given.get("max_failure_ratio", 0))) != 0:
            raise _fail((*path, "max_failure_ratio"), "berth stops at the first failure (0)")
        config = pb.UpdateConfig(parallelism=_int(given.get("parallelism", 1), path))
        if "order" in given:  # stop-first or start-first: the schema allows no other
            config.order = UPDATE_ORDERS.value(given["order"])
        for name in ("delay", "monitor"):
            if name in given:
                getattr(config, name).CopyFrom(parse_duration(given[name], (*path, name)))
        return config


def _published(port: PublishedPort) -> pb.PublishedPort:
    from berth.enums.containers import PORT_PROTOCOLS

    return pb.PublishedPort(
        published_port=port.published_port,
        target_port=port.target_port,
        protocol=PORT_PROTOCOLS.value(port.protocol),
    )
