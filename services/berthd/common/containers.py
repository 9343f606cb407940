"""The container model shared by the cluster and the node: ContainerConfig and MountSpec.

Plain data with Docker's validation rules. The node stores it as a container's on-disk record
and builds runtime bundles from it (berthd.node.spec); the cluster stores it as the desired
spec of a container. Nothing here knows about gRPC (berthd.common.container_messages has the
proto conversions); bad input raises InvalidArgument with a message a user can act on.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import asdict, dataclass, field, fields

from berthd.common.errors import InvalidArgument
from berthd.common.oci.digest import quoted

RESTART_POLICIES = ("no", "on-failure", "always")
# "bridge" joins an existing namespace (build_runtime_config's network_namespace_path) once
# the node has a bridge driver; add it here then.
NETWORK_MODES = ("none", "host")
MIN_MEMORY_BYTES = 6 * 1024 * 1024  # Docker's "Minimum memory limit allowed is 6MB"
MIN_CPU_MILLIS = 10  # 0.01 CPU: the kernel rejects CFS quotas under 1 ms
MAX_CPU_SHARES = 262144

_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
_HOSTNAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_MAX_HOSTNAME = 64  # the kernel's HOST_NAME_MAX
_ENV_KEY_RE = re.compile(r"[^=\x00]+")


@dataclass
class MountSpec:
    """A bind mount (absolute host path) or named volume (a name) at `target`."""

    source: str
    target: str
    read_only: bool = False


@dataclass
class ContainerConfig:
    """The proto ContainerSpec as plain data, also the node's on-disk record of a container.

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

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ContainerConfig:
        """Load and validate a record; unknown keys are ignored so newer agents' records load."""
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InvalidArgument(f"container config is not valid JSON: {e}") from e
        if not isinstance(obj, dict):
            raise InvalidArgument(f"container config must be a JSON object, got {quoted(obj)}")
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in obj.items() if k in known}
        if "image" not in values:
            raise InvalidArgument('container config has no "image"')
        mounts = values.get("mounts", [])
        if isinstance(mounts, list):
            values["mounts"] = [_mount_from_json(m, i) for i, m in enumerate(mounts)]
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise InvalidArgument naming the first bad field; types are checked too, since
        records come from JSON."""
        _check_str("image", self.image)
        if not self.image:
            raise InvalidArgument("image is required")
        _check_str("name", self.name)
        if self.name and not _NAME_RE.fullmatch(self.name):
            raise InvalidArgument(
                f"invalid container name {quoted(self.name)}: "
                "only [a-zA-Z0-9][a-zA-Z0-9_.-]+ is allowed"
            )
        _check_args("entrypoint", self.entrypoint)
        _check_args("command", self.command)
        _check_str_list("env", self.env)
        for entry in self.env:
            key, sep, _ = entry.partition("=")
            if not sep or not _ENV_KEY_RE.fullmatch(key) or "\x00" in entry:
                raise InvalidArgument(
                    f"invalid environment variable {quoted(entry)}: expected KEY=VALUE"
                )
        _check_str("working_dir", self.working_dir)
        if self.working_dir and not self.working_dir.startswith("/"):
            raise InvalidArgument(
                f"working directory {quoted(self.working_dir)} is invalid: "
                "it needs to be an absolute path"
            )
        check_user(self.user)
        _check_str("hostname", self.hostname)
        if self.hostname:
            check_hostname(self.hostname)
        if not isinstance(self.labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.labels.items()
        ):
            raise InvalidArgument("labels must map strings to strings")
        self._validate_mounts()
        _check_bool("read_only_rootfs", self.read_only_rootfs)
        self._validate_resources()
        self._validate_restart()
        _check_str("network_mode", self.network_mode)
        if self.network_mode not in NETWORK_MODES:
            raise InvalidArgument(
                f"unsupported network mode {quoted(self.network_mode)}: "
                f"expected one of {', '.join(NETWORK_MODES)}"
            )

    def _validate_mounts(self) -> None:
        if not isinstance(self.mounts, list) or not all(
            isinstance(m, MountSpec) for m in self.mounts
        ):
            raise InvalidArgument("mounts must be a list of mounts")
        seen: set[str] = set()
        for m in self.mounts:
            _check_str("mount source", m.source)
            _check_str("mount target", m.target)
            _check_bool("mount read_only", m.read_only)
            where = f"mount {quoted(m.source)} -> {quoted(m.target)}"
            if not m.source:
                raise InvalidArgument(f"{where}: source is required")
            if not m.source.startswith("/") and not _NAME_RE.fullmatch(m.source):
                raise InvalidArgument(
                    f"{where}: source must be an absolute host path or a volume name "
                    "matching [a-zA-Z0-9][a-zA-Z0-9_.-]+"
                )
            if not m.target.startswith("/"):
                raise InvalidArgument(f"{where}: target must be an absolute path")
            if ".." in m.target.split("/") or "\x00" in m.target:
                raise InvalidArgument(f"{where}: target must not contain '..'")
            target = posixpath.normpath(m.target)
            if target == "/":
                raise InvalidArgument(f"{where}: target cannot be '/'")
            if target in seen:
                raise InvalidArgument(f"duplicate mount point {quoted(target)}")
            seen.add(target)

    def _validate_resources(self) -> None:
        for name in ("memory_bytes", "cpu_millis", "cpu_shares", "pids_limit"):
            _check_int(name, getattr(self, name))
        if self.memory_bytes != 0 and self.memory_bytes < MIN_MEMORY_BYTES:
            raise InvalidArgument(
                f"memory limit {self.memory_bytes} bytes is too small: "
                f"the minimum is 6 MiB ({MIN_MEMORY_BYTES}), or 0 for no limit"
            )
        if self.cpu_millis != 0 and self.cpu_millis < MIN_CPU_MILLIS:
            raise InvalidArgument(
                f"cpu_millis {self.cpu_millis} is out of range: "
                f"use 0 for no limit or at least {MIN_CPU_MILLIS} (0.01 CPU)"
            )
        if self.cpu_shares != 0 and not 2 <= self.cpu_shares <= MAX_CPU_SHARES:
            raise InvalidArgument(
                f"cpu_shares {self.cpu_shares} is out of range: "
                f"use 0 for the default or 2 to {MAX_CPU_SHARES}"
            )
        if self.pids_limit < 0:
            raise InvalidArgument(f"pids_limit {self.pids_limit} is negative: use 0 for no limit")

    def _validate_restart(self) -> None:
        _check_str("restart_policy", self.restart_policy)
        if self.restart_policy not in RESTART_POLICIES:
            raise InvalidArgument(
                f"invalid restart policy {quoted(self.restart_policy)}: "
                f"expected one of {', '.join(RESTART_POLICIES)}"
            )
        _check_int("restart_max_retries", self.restart_max_retries)
        if self.restart_max_retries and self.restart_policy != "on-failure":
            raise InvalidArgument(
                f"maximum retry count cannot be used with restart policy {self.restart_policy!r}"
            )


def _mount_from_json(obj: object, i: int) -> MountSpec:
    if not isinstance(obj, dict) or not isinstance(obj.get("target"), str):
        raise InvalidArgument(f"mounts[{i}] must be an object with source and target")
    return MountSpec(obj.get("source", ""), obj["target"], obj.get("read_only", False))


def _check_str(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise InvalidArgument(f"{name} must be a string, got {quoted(value)}")


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be true or false, got {quoted(value)}")


def _check_int(name: str, value: object) -> None:
    # bool is an int in Python, not in JSON or protobuf.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an integer, got {quoted(value)}")
    if value < 0:
        raise InvalidArgument(f"{name} must not be negative, got {value}")


def _check_str_list(name: str, value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{name} must be a list of strings, got {quoted(value)}")
    return value


def _check_args(name: str, value: object) -> None:
    # runc passes args to execve, which cannot carry NUL bytes.
    if any("\x00" in v for v in _check_str_list(name, value)):
        raise InvalidArgument(f"{name} must not contain NUL characters")


def check_user(user: object) -> None:
    """A Docker --user value: user[:group], names or numeric ids."""
    _check_str("user", user)
    if str(user).count(":") > 1 or any(c in str(user) for c in "\x00\n"):
        raise InvalidArgument(f"invalid user {quoted(user)}: expected user[:group]")


def check_hostname(hostname: str) -> None:
    """An RFC 1123 host name the kernel accepts (at most 64 characters)."""
    if len(hostname) > _MAX_HOSTNAME or not _HOSTNAME_RE.fullmatch(hostname):
        raise InvalidArgument(
            f"invalid hostname {quoted(hostname)}: expected letters, digits and inner hyphens, "
            f"in dot-separated labels of up to 63 characters, {_MAX_HOSTNAME} in all"
        )
