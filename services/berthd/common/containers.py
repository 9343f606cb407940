"""The container model as the services use it: `berth.containers`, raising InvalidArgument.

ContainerConfig and MountSpec are the client package's (`berth.containers`), so the CLI, the
clients, the cluster and the node accept and refuse the same configs with the same words. The
model raises the client package's InvalidContainerConfig; the functions here are the ones the
services call where a config comes in (a request, an etcd record, a container.json), and
re-raise it as InvalidArgument with the same message (`berthd.common.errors.invalid_argument`).
Call `validate(config)` rather than `config.validate()` in a service.
"""

from __future__ import annotations

from berth import containers as model
from berth.containers import (
    DEFAULT_CAPABILITIES,
    MAX_CPU_SHARES,
    MIN_CPU_MILLIS,
    MIN_MEMORY_BYTES,
    NETWORK_MODES,
    RESTART_POLICIES,
    SECRETS_DIR,
    ContainerConfig,
    MountSpec,
    SecretReference,
    capabilities,
    check_secret_name,
    security_options,
)
from berth.errors import InvalidArgumentError
from berth.types.v1 import container_pb2 as pb
from berthd.common.errors import InvalidArgument, invalid_argument

__all__ = [
    "DEFAULT_CAPABILITIES",
    "MAX_CPU_SHARES",
    "MIN_CPU_MILLIS",
    "MIN_MEMORY_BYTES",
    "NETWORK_MODES",
    "RESTART_POLICIES",
    "SECRETS_DIR",
    "ContainerConfig",
    "MountSpec",
    "SecretReference",
    "capabilities",
    "check_hostname",
    "check_secret_name",
    "check_user",
    "from_json",
    "from_spec",
    "invalid_spec",
    "security_options",
    "to_spec",
    "validate",
]


def invalid_spec(exc: InvalidArgumentError, field: str = "spec") -> InvalidArgument:
    """The model's refusal as InvalidArgument with reason INVALID_SPEC; the field at fault is
    `field` (the request field the config came from) with the model's own field below it
    ("spec.network_mode")."""
    inner = getattr(exc, "field", "")
    return InvalidArgument(
        exc.message, reason="INVALID_SPEC", field=f"{field}.{inner}" if inner else field
    )


def validate(config: ContainerConfig, field: str = "spec") -> None:
    """config.validate(), raising InvalidArgument with reason INVALID_SPEC naming the field
    at fault under `field` (see invalid_spec)."""
    try:
        config.validate()
    except InvalidArgumentError as exc:
        raise invalid_spec(exc, field) from None


def from_json(text: str | bytes) -> ContainerConfig:
    """A validated config from its record (etcd, container.json); see ContainerConfig.from_json."""
    with invalid_argument():
        return ContainerConfig.from_json(text)


def from_dict(obj: object) -> ContainerConfig:
    """A validated config from a record already parsed from JSON; see ContainerConfig.from_dict."""
    with invalid_argument():
        return ContainerConfig.from_dict(obj)


def from_spec(spec: pb.ContainerSpec, field: str = "spec") -> ContainerConfig:
    """A request's ContainerSpec as a config, not yet validated; InvalidArgument with reason
    INVALID_SPEC (and `field`) for one that cannot be a config at all."""
    try:
        return model.from_spec(spec)
    except InvalidArgumentError as exc:
        raise invalid_spec(exc, field) from None


def to_spec(config: ContainerConfig) -> pb.ContainerSpec:
    with invalid_argument():
        return model.to_spec(config)


def check_user(user: object) -> None:
    """A Docker --user value: user[:group], names or numeric ids."""
    with invalid_argument():
        model.check_user(user)


def check_hostname(hostname: str) -> None:
    """An RFC 1123 host name the kernel accepts (at most 64 characters)."""
    with invalid_argument():
        model.check_hostname(hostname)
