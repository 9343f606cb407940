"""The container model: ContainerConfig and MountSpec, written once for client and server.

Plain data with Docker's validation rules, and the one conversion to and from the proto
`berth.types.v1.ContainerSpec`. The CLI and the clients build a ContainerConfig and can check it
before any call; the cluster stores it as the desired spec of a container, the node as its
on-disk record (`to_json`/`from_json`) and builds runtime bundles from it. Every check raises
InvalidContainerConfig (code INVALID_ARGUMENT) with a one-line message a person can act on;
berthd (`berthd.common.containers`) re-raises the same message as its own InvalidArgument.
"""

from __future__ import annotations

import functools
import json
import posixpath
import re
from dataclasses import asdict, dataclass, field, fields

from berth.enums import EnumTable
from berth.enums import containers as tables
from berth.errors import InvalidArgumentError
from berth.health import HealthConfig, InvalidHealthCheck
from berth.health import from_dict as health_from_dict
from berth.health import from_proto as health_from_proto
from berth.health import to_proto as health_to_proto
from berth.ports import InvalidPort, PortBinding, check_bindings
from berth.reference import parse_container_image, quoted
from berth.types.v1 import container_pb2 as pb

__all__ = [
    "ALL_CAPABILITIES",
    "DEFAULT_CAPABILITIES",
    "MAX_CPU_SHARES",
    "MIN_CPU_MILLIS",
    "MIN_MEMORY_BYTES",
    "NETWORK_MODES",
    "RESTART_POLICIES",
    "SECRETS_DIR",
    "USERNS_MODES",
    "USERNS_REMAP",
    "ContainerConfig",
    "InvalidContainerConfig",
    "MountSpec",
    "SecretReference",
    "SecurityOptions",
    "capabilities",
    "check_hostname",
    "check_secret_name",
    "check_user",
    "from_spec",
    "normalize_capability",
    "port_binding",
    "security_options",
    "to_spec",
]

RESTART_POLICIES = tables.RESTART_POLICIES.names
# The modes that name no network; any other network_mode is a berth network's name (Docker's
# HostConfig.NetworkMode), NETWORK_MODE_NETWORK plus ContainerSpec.network in the proto.
NETWORK_MODES = ("none", "host")
# A network's name (berthd.common.state.networks checks the rest when it is made).
_NETWORK_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}")
MIN_MEMORY_BYTES = 6 * 1024 * 1024  # Docker's "Minimum memory limit allowed is 6MB"
MIN_CPU_MILLIS = 10  # 0.01 CPU: the kernel rejects CFS quotas under 1 ms
MAX_CPU_SHARES = 262144

_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_MAX_HOSTNAME = 64  # the kernel's HOST_NAME_MAX
_ENV_KEY_RE = re.compile(r"[^=\x00]+")

# Docker's default capability set (moby oci/caps/defaults.go), in its order.
DEFAULT_CAPABILITIES = tuple(
    f"CAP_{name}"
    for name in (
        "CHOWN",
        "DAC_OVERRIDE",
        "FSETID",
        "FOWNER",
        "MKNOD",
        "NET_RAW",
        "SETGID",
        "SETUID",
        "SETFCAP",
        "SETPCAP",
        "NET_BIND_SERVICE",
        "SYS_CHROOT",
        "KILL",
        "AUDIT_WRITE",
    )
)
# Every capability, by number (linux/capability.h, 0 to 40): what --cap-add ALL gives.
ALL_CAPABILITIES = tuple(
    f"CAP_{name}"
    for name in (
        "CHOWN",
        "DAC_OVERRIDE",
        "DAC_READ_SEARCH",
        "FOWNER",
        "FSETID",
        "KILL",
        "SETGID",
        "SETUID",
        "SETPCAP",
        "LINUX_IMMUTABLE",
        "NET_BIND_SERVICE",
        "NET_BROADCAST",
        "NET_ADMIN",
        "NET_RAW",
        "IPC_LOCK",
        "IPC_OWNER",
        "SYS_MODULE",
        "SYS_RAWIO",
        "SYS_CHROOT",
        "SYS_PTRACE",
        "SYS_PACCT",
        "SYS_ADMIN",
        "SYS_BOOT",
        "SYS_NICE",
        "SYS_RESOURCE",
        "SYS_TIME",
        "SYS_TTY_CONFIG",
        "MKNOD",
        "LEASE",
        "AUDIT_WRITE",
        "AUDIT_CONTROL",
        "SETFCAP",
        "MAC_OVERRIDE",
        "MAC_ADMIN",
        "SYSLOG",
        "WAKE_ALARM",
        "BLOCK_SUSPEND",
        "AUDIT_READ",
        "PERFMON",
        "BPF",
        "CHECKPOINT_RESTORE",
    )
)
# --userns values a node supports: the host's user namespace ("" is the default, the same),
# or "remap": a user namespace whose root is an unprivileged host uid (the node's range).
USERNS_MODES = ("", "host", "remap")
USERNS_REMAP = "remap"
# Where a container's secrets are, one file each (Docker's place).
SECRETS_DIR = "/run/secrets"
DEFAULT_SECRET_MODE = 0o444
# Docker's (swarmkit's) rule for secret names.
_SECRET_NAME_RE = re.compile(r"[a-zA-Z0-9]+(?:[a-zA-Z0-9_.-]*[a-zA-Z0-9])?")
MAX_SECRET_NAME = 64
_MAX_UINT32 = 2**32 - 1


class InvalidContainerConfig(InvalidArgumentError):
    """A container config (or one of its fields) that no node could run. `field` is the
    ContainerSpec field at fault as a path ("network_mode", "restart_policy.name"), "" when
    no one field is."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class _field:
    """Name the spec field a check inside is about, unless the check named one itself. A
    class, not a generator context manager: every record read from etcd is validated, field by
    field, and the generator's set-up cost was most of that."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, exc: BaseException | None, trace: object) -> bool:
        if isinstance(exc, InvalidContainerConfig):
            exc.field = exc.field or self.name
        return False


@dataclass
class MountSpec:
    """A bind mount (absolute host path) or named volume (a name) at `target`."""

    source: str
    target: str
    read_only: bool = False


@dataclass
class SecretReference:
    """A cluster secret the container reads at /run/secrets/<target>: only its name, never
    its value. Empty `target` means the name, `mode` 0 means 0444 (`file_name`, `file_mode`)."""

    name: str
    target: str = ""
    mode: int = 0
    uid: int = 0
    gid: int = 0

    @property
    def file_name(self) -> str:
        return self.target or self.name

    @property
    def file_mode(self) -> int:
        return self.mode or DEFAULT_SECRET_MODE


@dataclass
class ContainerConfig:
    """What `docker create IMAGE` takes: the proto ContainerSpec as plain data, also the node's
    on-disk record of a container. See ContainerSpec in berth/types/v1/container.proto for each
    field.

    Empty `entrypoint` keeps the image's ENTRYPOINT (protobuf cannot tell empty from unset);
    `[""]` clears it, as Docker's `--entrypoint ""` does. Empty `command` keeps the image's
    CMD, unless an entrypoint is given.
    """

    image: str
    name: str = ""
    entrypoint: list[str] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    working_dir: str = ""
    user: str = ""
    hostname: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    mounts: list[MountSpec] = field(default_factory=list)
    read_only_rootfs: bool = False
    memory_bytes: int = 0
    cpu_millis: int = 0
    cpu_shares: int = 0
    pids_limit: int = 0
    restart_policy: str = "no"
    restart_max_retries: int = 0
    network_mode: str = "none"
    tty: bool = False
    stdin_open: bool = False
    cap_add: list[str] = field(default_factory=list)
    cap_drop: list[str] = field(default_factory=list)
    security_opt: list[str] = field(default_factory=list)
    userns: str = ""
    secrets: list[SecretReference] = field(default_factory=list)
    network_aliases: list[str] = field(default_factory=list)
    # Published ports (`-p`), berth.ports.PortBinding.
    ports: list[PortBinding] = field(default_factory=list)
    # `--health-cmd ...`/`--no-healthcheck` (berth.health); None: the image's health check.
    health_check: HealthConfig | None = None

    def to_json(self) -> str:
        """The record etcd and the node's container.json hold: the fields in order, compact.
        Older agents wrote exactly this; keep it loadable (from_json) when fields are added.
        A config without a health check has no `health_check` key: its record is the one
        older agents wrote."""
        data = asdict(self)
        if data["health_check"] is None:
            del data["health_check"]
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ContainerConfig:
        """Load and validate a record; unknown keys are ignored so newer agents' records load."""
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InvalidContainerConfig(f"container config is not valid JSON: {e}") from e
        return cls.from_dict(obj)

    @classmethod
    def from_dict(cls, obj: object) -> ContainerConfig:
        """A validated config from a record already parsed from JSON (inside a larger one)."""
        if not isinstance(obj, dict):
            raise InvalidContainerConfig(
                f"container config must be a JSON object, got {quoted(obj)}"
            )
        known = _field_names(cls)
        values = {k: v for k, v in obj.items() if k in known}
        if "image" not in values:
            raise InvalidContainerConfig('container config has no "image"')
        mounts = values.get("mounts", [])
        if isinstance(mounts, list):
            values["mounts"] = [_mount_from_json(m, i) for i, m in enumerate(mounts)]
        secrets = values.get("secrets", [])
        if isinstance(secrets, list):
            values["secrets"] = [_secret_from_json(r, i) for i, r in enumerate(secrets)]
        ports = values.get("ports", [])
        if isinstance(ports, list):
            values["ports"] = [_port_from_json(p, i) for i, p in enumerate(ports)]
        try:
            values["health_check"] = health_from_dict(values.get("health_check"))
        except InvalidHealthCheck as exc:
            raise InvalidContainerConfig(exc.message, exc.field) from None
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise InvalidContainerConfig naming the first bad field (its `field`, as the
        ContainerSpec names it); types are checked too, since records come from JSON."""
        with _field("image"):
            check_image(self.image)
        with _field("name"):
            _check_str("name", self.name)
            if self.name and not _NAME_RE.fullmatch(self.name):
                raise InvalidContainerConfig(
                    f"invalid container name {quoted(self.name)}: "
                    "only [a-zA-Z0-9][a-zA-Z0-9_.-]+ is allowed"
                )
        with _field("entrypoint"):
            _check_args("entrypoint", self.entrypoint)
        with _field("command"):
            _check_args("command", self.command)
        with _field("env"):
            _check_str_list("env", self.env)
            for entry in self.env:
                key, sep, _ = entry.partition("=")
                if not sep or not _ENV_KEY_RE.fullmatch(key) or "\x00" in entry:
                    raise InvalidContainerConfig(
                        f"invalid environment variable {quoted(entry)}: expected KEY=VALUE"
                    )
        with _field("working_dir"):
            _check_str("working_dir", self.working_dir)
            if self.working_dir and not self.working_dir.startswith("/"):
                raise InvalidContainerConfig(
                    f"working directory {quoted(self.working_dir)} is invalid: "
                    "it needs to be an absolute path"
                )
        with _field("user"):
            check_user(self.user)
        with _field("hostname"):
            _check_str("hostname", self.hostname)
            if self.hostname:
                check_hostname(self.hostname)
        with _field("labels"):
            if not isinstance(self.labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.labels.items()
            ):
                raise InvalidContainerConfig("labels must map strings to strings")
        with _field("mounts"):
            self._validate_mounts()
        with _field("read_only_rootfs"):
            _check_bool("read_only_rootfs", self.read_only_rootfs)
        with _field("resources"):
            self._validate_resources()
        with _field("restart_policy"):
            self._validate_restart()
        with _field("network_mode"):
            _check_network_mode(self.network_mode)
        with _field("network_aliases"):
            self._validate_network_aliases()
        if self.health_check is not None:
            try:
                self.health_check.validate()
            except InvalidHealthCheck as exc:
                raise InvalidContainerConfig(exc.message, exc.field) from None
        with _field("tty"):
            _check_bool("tty", self.tty)
        with _field("stdin_open"):
            _check_bool("stdin_open", self.stdin_open)
        for caps in ("cap_add", "cap_drop"):
            with _field(caps):
                for cap in _check_str_list(caps, getattr(self, caps)):
                    normalize_capability(cap)
        with _field("security_opt"):
            security_options(self)
        with _field("userns"):
            _check_str("userns", self.userns)
            if self.userns not in USERNS_MODES:
                raise InvalidContainerConfig(
                    f"unsupported user namespace mode {quoted(self.userns)}: host (the default) "
                    "or remap"
                )
            if self.userns == USERNS_REMAP and self.network_mode == "host":
                # As Docker: sysfs cannot be mounted by a user namespace that does not own the
                # network namespace, so runc would fail later with a mount error.
                raise InvalidContainerConfig(
                    "user namespace mode remap cannot share the host's network namespace "
                    "(--network host): use --userns host with it"
                )
        with _field("secrets"):
            self._validate_secrets()
        try:
            check_bindings(self.ports, self.network_mode)
        except InvalidPort as exc:
            raise InvalidContainerConfig(exc.message, "ports") from None

    def _validate_network_aliases(self) -> None:
        for alias in _check_str_list("network_aliases", self.network_aliases):
            if not _NETWORK_NAME_RE.fullmatch(alias):
                raise InvalidContainerConfig(
                    f"invalid network alias {quoted(alias)}: letters, digits, '_', '.' and '-', "
                    "starting with a letter or digit, at most 63 characters"
                )
        if self.network_aliases and self.network_mode in NETWORK_MODES:
            # Docker's rule: aliases are names on a network, and none and host are none.
            raise InvalidContainerConfig(
                "network-scoped aliases are supported only for containers on a berth network "
                "(--network NAME)"
            )

    def _validate_secrets(self) -> None:
        if not isinstance(self.secrets, list) or not all(
            isinstance(r, SecretReference) for r in self.secrets
        ):
            raise InvalidContainerConfig("secrets must be a list of secret references")
        files: set[str] = set()
        for ref in self.secrets:
            check_secret_name(ref.name)
            _check_str("secret target", ref.target)
            where = f"secret {quoted(ref.name)}"
            target = ref.file_name
            if "/" in target or target in (".", "..") or "\x00" in target or len(target) > 255:
                raise InvalidContainerConfig(
                    f"{where}: invalid target {quoted(target)}: expected a file name under "
                    f"{SECRETS_DIR}/ (no '/')"
                )
            if target in files:
                raise InvalidContainerConfig(
                    f"duplicate secret target {quoted(f'{SECRETS_DIR}/{target}')}"
                )
            files.add(target)
            for what in ("mode", "uid", "gid"):
                value = getattr(ref, what)
                _check_int(f"{where} {what}", value)
                if value > _MAX_UINT32:
                    raise InvalidContainerConfig(f"{where}: {what} {value} is out of range")
            if ref.mode > 0o777:
                raise InvalidContainerConfig(
                    f"{where}: mode {ref.mode:#o} is invalid: expected permission bits up to 0777"
                )
        if self.secrets:
            for m in self.mounts:
                target = posixpath.normpath(m.target)
                if target == SECRETS_DIR or target.startswith(SECRETS_DIR + "/"):
                    raise InvalidContainerConfig(
                        f"mount target {quoted(m.target)} conflicts with the container's "
                        f"secrets at {SECRETS_DIR}"
                    )

    def _validate_mounts(self) -> None:
        if not isinstance(self.mounts, list) or not all(
            isinstance(m, MountSpec) for m in self.mounts
        ):
            raise InvalidContainerConfig("mounts must be a list of mounts")
        seen: set[str] = set()
        for m in self.mounts:
            _check_str("mount source", m.source)
            _check_str("mount target", m.target)
            _check_bool("mount read_only", m.read_only)
            where = f"mount {quoted(m.source)} -> {quoted(m.target)}"
            if not m.source:
                raise InvalidContainerConfig(f"{where}: source is required")
            if not m.source.startswith("/") and not _NAME_RE.fullmatch(m.source):
                raise InvalidContainerConfig(
                    f"{where}: source must be an absolute host path or a volume name "
                    "matching [a-zA-Z0-9][a-zA-Z0-9_.-]+"
                )
            if not m.target.startswith("/"):
                raise InvalidContainerConfig(f"{where}: target must be an absolute path")
            if ".." in m.target.split("/") or "\x00" in m.target:
                raise InvalidContainerConfig(f"{where}: target must not contain '..'")
            target = posixpath.normpath(m.target)
            if target == "/":
                raise InvalidContainerConfig(f"{where}: target cannot be '/'")
            if target in seen:
                raise InvalidContainerConfig(f"duplicate mount point {quoted(target)}")
            seen.add(target)

    def _validate_resources(self) -> None:
        for name in ("memory_bytes", "cpu_millis", "cpu_shares", "pids_limit"):
            with _field(f"resources.{name}"):
                _check_int(name, getattr(self, name))
        if self.memory_bytes != 0 and self.memory_bytes < MIN_MEMORY_BYTES:
            raise InvalidContainerConfig(
                f"memory limit {self.memory_bytes} bytes is too small: "
                f"the minimum is 6 MiB ({MIN_MEMORY_BYTES}), or 0 for no limit",
                "resources.memory_bytes",
            )
        if self.cpu_millis != 0 and self.cpu_millis < MIN_CPU_MILLIS:
            raise InvalidContainerConfig(
                f"cpu_millis {self.cpu_millis} is out of range: "
                f"use 0 for no limit or at least {MIN_CPU_MILLIS} (0.01 CPU)",
                "resources.cpu_millis",
            )
        if self.cpu_shares != 0 and not 2 <= self.cpu_shares <= MAX_CPU_SHARES:
            raise InvalidContainerConfig(
                f"cpu_shares {self.cpu_shares} is out of range: "
                f"use 0 for the default or 2 to {MAX_CPU_SHARES}",
                "resources.cpu_shares",
            )
        if self.pids_limit < 0:
            raise InvalidContainerConfig(
                f"pids_limit {self.pids_limit} is negative: use 0 for no limit",
                "resources.pids_limit",
            )

    def _validate_restart(self) -> None:
        with _field("restart_policy.name"):
            _check_restart_policy(self.restart_policy)
        with _field("restart_policy.max_retries"):
            _check_int("restart_max_retries", self.restart_max_retries)
            if self.restart_max_retries and self.restart_policy != "on-failure":
                raise InvalidContainerConfig(
                    "maximum retry count cannot be used with restart policy "
                    f"{self.restart_policy!r}"
                )


# --- the proto --------------------------------------------------------------------------------


def to_spec(config: ContainerConfig) -> pb.ContainerSpec:
    """The ContainerSpec of `config`. Only the policy names are checked (they have to become
    enum values); `config.validate()` checks the rest."""
    _check_restart_policy(config.restart_policy)
    _check_network_mode(config.network_mode)
    return pb.ContainerSpec(
        image=config.image,
        name=config.name,
        entrypoint=config.entrypoint,
        command=config.command,
        env=config.env,
        working_dir=config.working_dir,
        user=config.user,
        hostname=config.hostname,
        labels=config.labels,
        mounts=[
            pb.Mount(source=m.source, target=m.target, read_only=m.read_only) for m in config.mounts
        ],
        read_only_rootfs=config.read_only_rootfs,
        resources=pb.Resources(
            memory_bytes=config.memory_bytes,
            cpu_millis=config.cpu_millis,
            cpu_shares=config.cpu_shares,
            pids_limit=config.pids_limit,
        ),
        restart_policy=pb.RestartPolicy(
            name=tables.RESTART_POLICIES.value(config.restart_policy),
            max_retries=config.restart_max_retries,
        ),
        network_mode=tables.NETWORK_MODES.value(
            config.network_mode if config.network_mode in NETWORK_MODES else "network"
        ),
        network="" if config.network_mode in NETWORK_MODES else config.network_mode,
        tty=config.tty,
        stdin_open=config.stdin_open,
        cap_add=config.cap_add,
        cap_drop=config.cap_drop,
        security_opt=config.security_opt,
        userns=config.userns,
        secrets=[
            pb.SecretReference(name=r.name, target=r.target, mode=r.mode, uid=r.uid, gid=r.gid)
            for r in config.secrets
        ],
        network_aliases=config.network_aliases,
        ports=[
            pb.PortBinding(
                host_ip=p.host_ip,
                host_port=p.host_port,
                container_port=p.container_port,
                protocol=tables.PORT_PROTOCOLS.value(p.protocol),
            )
            for p in config.ports
        ],
        health_check=health_to_proto(config.health_check) if config.health_check else None,
    )


def set_network(spec: pb.ContainerSpec, network_mode: str) -> None:
    """Put the model's network_mode (none, host or a network's name) into `spec`, as to_spec
    does: for an edit of a spec that keeps its other fields (`service update --network`)."""
    _check_network_mode(network_mode)
    named = network_mode not in NETWORK_MODES
    spec.network_mode = tables.NETWORK_MODES.value("network" if named else network_mode)
    spec.network = network_mode if named else ""


def from_spec(spec: pb.ContainerSpec) -> ContainerConfig:
    """The spec as plain data, not yet validated (ContainerConfig.validate does that). Unset
    policies read as Docker's defaults (no restart, no network); a value this package has no
    name for is refused."""
    res = spec.resources
    return ContainerConfig(
        image=spec.image,
        name=spec.name,
        entrypoint=list(spec.entrypoint),
        command=list(spec.command),
        env=list(spec.env),
        working_dir=spec.working_dir,
        user=spec.user,
        hostname=spec.hostname,
        labels=dict(spec.labels),
        mounts=[MountSpec(m.source, m.target, m.read_only) for m in spec.mounts],
        read_only_rootfs=spec.read_only_rootfs,
        memory_bytes=res.memory_bytes,
        cpu_millis=res.cpu_millis,
        cpu_shares=res.cpu_shares,
        pids_limit=res.pids_limit,
        restart_policy=_name(
            tables.RESTART_POLICIES,
            spec.restart_policy.name,
            "restart policy",
            "restart_policy.name",
        ),
        restart_max_retries=spec.restart_policy.max_retries,
        network_mode=_network_mode(spec),
        tty=spec.tty,
        stdin_open=spec.stdin_open,
        cap_add=list(spec.cap_add),
        cap_drop=list(spec.cap_drop),
        security_opt=list(spec.security_opt),
        userns=spec.userns,
        secrets=[SecretReference(r.name, r.target, r.mode, r.uid, r.gid) for r in spec.secrets],
        network_aliases=list(spec.network_aliases),
        ports=[port_binding(p) for p in spec.ports],
        health_check=health_from_proto(spec.health_check)
        if spec.HasField("health_check")
        else None,
    )


def port_binding(message: pb.PortBinding) -> PortBinding:
    """A PortBinding message as the model's; a protocol without a name is refused."""
    return PortBinding(
        container_port=message.container_port,
        host_port=message.host_port,
        host_ip=message.host_ip,
        protocol=_name(tables.PORT_PROTOCOLS, message.protocol, "protocol", "ports.protocol"),
    )


# --- capabilities and security options --------------------------------------------------------


def normalize_capability(name: object) -> str:
    """Docker's capability names as runc takes them: CAP_ prefixed, upper case; "ALL" stays."""
    _check_str("capability", name)
    upper = str(name).strip().upper()
    if upper == "ALL":
        return upper
    cap = upper if upper.startswith("CAP_") else f"CAP_{upper}"
    if cap not in ALL_CAPABILITIES:
        raise InvalidContainerConfig(
            f"unknown capability {quoted(name)}: expected a name such as NET_ADMIN or "
            "CAP_SYS_ADMIN, or ALL"
        )
    return cap


def capabilities(config: ContainerConfig) -> list[str]:
    """The container's capability (bounding) set: Docker's defaults with cap_drop removed and
    cap_add added, with moby's rules (oci/caps TweakCapabilities): ALL in cap_add is every
    capability but those dropped; ALL in cap_drop starts from nothing and adds cap_add."""
    adds = [normalize_capability(c) for c in _check_str_list("cap_add", config.cap_add)]
    drops = [normalize_capability(c) for c in _check_str_list("cap_drop", config.cap_drop)]
    if "ALL" in adds:
        return [c for c in ALL_CAPABILITIES if c not in drops]
    base = [] if "ALL" in drops else [c for c in DEFAULT_CAPABILITIES if c not in drops]
    # As in moby, a capability both added and dropped is added.
    return base + [c for c in dict.fromkeys(adds) if c not in base]


@dataclass(frozen=True)
class SecurityOptions:
    """security_opt read: `seccomp` is "default", "unconfined" or a profile's JSON text."""

    seccomp: str = "default"
    no_new_privileges: bool = True


_BOOLS = {"true": True, "1": True, "false": False, "0": False}


def security_options(config: ContainerConfig) -> SecurityOptions:
    """Read security_opt with Docker's syntax (KEY=VALUE, or the old KEY:VALUE); the last of
    a key wins. Refuses what a node cannot do with a message naming what it can."""
    seccomp, nnp = "default", True
    for opt in _check_str_list("security_opt", config.security_opt):
        key, sep, value = opt.partition("=")
        if not sep and key not in ("no-new-privileges",):
            key, sep, value = opt.partition(":")
        if key == "no-new-privileges":
            if sep and value.lower() not in _BOOLS:
                raise InvalidContainerConfig(
                    f"invalid security option {quoted(opt)}: no-new-privileges takes true or false"
                )
            nnp = _BOOLS[value.lower()] if sep else True
        elif key == "seccomp" and sep:
            if value == "unconfined":
                seccomp = value
            elif value.lstrip().startswith("{"):
                try:
                    profile = json.loads(value)
                except (ValueError, RecursionError) as e:
                    raise InvalidContainerConfig(
                        f"invalid seccomp profile in security option: not valid JSON: {e}"
                    ) from None
                if not isinstance(profile, dict) or not isinstance(
                    profile.get("defaultAction"), str
                ):
                    raise InvalidContainerConfig(
                        "invalid seccomp profile in security option: expected a JSON object "
                        "with a defaultAction, in Docker's seccomp profile format"
                    )
                seccomp = value
            else:
                raise InvalidContainerConfig(
                    f"invalid security option {quoted(opt)}: seccomp takes unconfined or a "
                    "profile's JSON (the berth CLI reads seccomp=FILE and sends its contents)"
                )
        else:
            raise InvalidContainerConfig(
                f"unsupported security option {quoted(opt)}: expected seccomp=unconfined, "
                "seccomp=PROFILE or no-new-privileges[=true|false]"
            )
    return SecurityOptions(seccomp, nnp)


def _name(table: EnumTable, value: int, what: str, field: str) -> str:
    """The name of a spec's enum value; a value without one (a newer client's, or garbage)
    is refused naming the field, as any bad field is."""
    try:
        return table.name(value)
    except ValueError:
        raise InvalidContainerConfig(
            f"unknown {what} {value}: expected one of {', '.join(table.names)}", field
        ) from None


# --- checks -----------------------------------------------------------------------------------


def check_image(image: object) -> None:
    """A container's image as a node can pull it (berth.reference.parse_container_image): the
    cluster refuses here what the node would only refuse once the container is placed."""
    _check_str("image", image)
    if not image:
        raise InvalidContainerConfig("image is required")
    if problem := _image_problem(str(image)):
        raise InvalidContainerConfig(f"invalid image {quoted(image)}: {problem}")


@functools.lru_cache(maxsize=4096)
def _image_problem(image: str) -> str | None:
    """Why a node could not pull `image`, or None. Cached: every desired record read back
    from etcd is validated again, and a cluster's records name few distinct images."""
    try:
        parse_container_image(image)
    except InvalidArgumentError as exc:
        return exc.message
    return None


def check_user(user: object) -> None:
    """A Docker --user value: user[:group], names or numeric ids."""
    _check_str("user", user)
    if str(user).count(":") > 1 or any(c in str(user) for c in "\x00\n"):
        raise InvalidContainerConfig(f"invalid user {quoted(user)}: expected user[:group]")


def check_hostname(hostname: str) -> None:
    """An RFC 1123 host name the kernel accepts (at most 64 characters)."""
    if len(hostname) > _MAX_HOSTNAME or not _HOSTNAME_RE.fullmatch(hostname):
        raise InvalidContainerConfig(
            f"invalid hostname {quoted(hostname)}: expected letters, digits and inner hyphens, "
            f"in dot-separated labels of up to 63 characters, {_MAX_HOSTNAME} in all"
        )


def check_secret_name(name: object) -> None:
    """Docker's rule for secret names: letters, digits, '-', '_' and '.', starting and ending
    with a letter or digit, at most 64 characters."""
    _check_str("secret name", name)
    if not name:
        raise InvalidContainerConfig("a secret name is required")
    if len(str(name)) > MAX_SECRET_NAME or not _SECRET_NAME_RE.fullmatch(str(name)):
        raise InvalidContainerConfig(
            f"invalid secret name {quoted(name)}: use letters, digits, '-', '_' and '.', "
            f"starting and ending with a letter or digit, at most {MAX_SECRET_NAME} characters"
        )


def _check_restart_policy(policy: object) -> None:
    _check_str("restart_policy", policy)
    if policy not in RESTART_POLICIES:
        raise InvalidContainerConfig(
            f"invalid restart policy {quoted(policy)}: "
            f"expected one of {', '.join(RESTART_POLICIES)}"
        )


def _check_network_mode(mode: object) -> None:
    _check_str("network_mode", mode)
    # Docker's "bridge" and "default" are no berth network: the default one is "berth".
    if mode not in NETWORK_MODES and (
        mode in ("bridge", "default") or not _NETWORK_NAME_RE.fullmatch(str(mode))
    ):
        raise InvalidContainerConfig(
            f"unsupported network mode {quoted(mode)}: expected none, host or a network's name"
        )


def _network_mode(spec: pb.ContainerSpec) -> str:
    """The model's network_mode of a spec: none, host, or the network's name."""
    mode = _name(tables.NETWORK_MODES, spec.network_mode, "network mode", "network_mode")
    if mode != "network":
        return mode
    if not spec.network:
        raise InvalidContainerConfig(
            "network_mode NETWORK_MODE_NETWORK needs the network's name in network", "network"
        )
    return spec.network


@functools.cache
def _field_names(cls: type) -> frozenset[str]:
    return frozenset(f.name for f in fields(cls))


def _mount_from_json(obj: object, i: int) -> MountSpec:
    if not isinstance(obj, dict) or not isinstance(obj.get("target"), str):
        raise InvalidContainerConfig(f"mounts[{i}] must be an object with source and target")
    return MountSpec(obj.get("source", ""), obj["target"], obj.get("read_only", False))


def _secret_from_json(obj: object, i: int) -> SecretReference:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise InvalidContainerConfig(f"secrets[{i}] must be an object with a name")
    known = _field_names(SecretReference)
    return SecretReference(**{k: v for k, v in obj.items() if k in known})


def _port_from_json(obj: object, i: int) -> PortBinding:
    if not isinstance(obj, dict) or "container_port" not in obj:
        raise InvalidContainerConfig(f"ports[{i}] must be an object with a container_port")
    known = _field_names(PortBinding)
    return PortBinding(**{k: v for k, v in obj.items() if k in known})


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise InvalidContainerConfig(f"{name} must be a string, got {quoted(value)}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidContainerConfig(f"{name} must be true or false, got {quoted(value)}")


def _check_int(name: str, value: object) -> None:
    # bool is an int in Python, not in JSON or protobuf.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidContainerConfig(f"{name} must be an integer, got {quoted(value)}")
    if value < 0:
        raise InvalidContainerConfig(f"{name} must not be negative, got {value}")


def _check_str_list(name: str, value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidContainerConfig(f"{name} must be a list of strings, got {quoted(value)}")
    return value


def _check_args(name: str, value: object) -> None:
    # runc passes args to execve, which cannot carry NUL bytes.
    if any("\x00" in v for v in _check_str_list(name, value)):
        raise InvalidContainerConfig(f"{name} must not contain NUL characters")
