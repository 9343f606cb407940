"""Admission: which parts of a container spec give it power over its host.

A default container is confined (Docker's 14 capabilities, the default seccomp profile,
no-new-privileges, its own loopback-only network namespace, no host path). A spec that undoes
any of that needs Permission.HOST_ACCESS (admins by default). The cluster checks it when a
container or a service is asked for (RunContainer, CreateService, UpdateService) and stamps the
admitted record with who admitted it; a node creates a host-access spec only from a stamped
record (defence in depth), and its own CreateContainer checks the caller. docs/security.md,
"Admission".

What counts as host access, read from the spec's fields:

- a bind mount of a host path (a mount whose source is an absolute path; a named volume is
  the node's own storage and is not);
- the host network (`network_mode` host);
- capabilities beyond Docker's default set (cap_add of one the default set lacks, or ALL;
  adding back a default capability after dropping it is not);
- `seccomp=unconfined` or a custom seccomp profile (it can allow any system call);
- `no-new-privileges=false` (setuid binaries regain their power).

`userns` is not host access in any mode: "" and "host" are the host's user namespace that a
default container has, and "remap" takes power away (the container's root is an unprivileged
host uid). The spec has no device field.
"""

from __future__ import annotations

from dataclasses import dataclass

from berth import containers as model
from berth.error_details import Violation
from berth.errors import InvalidArgumentError
from berth.types.v1 import container_pb2 as pb
from berthd.common.containers import ContainerConfig, invalid_spec
from berthd.common.errors import PermissionDenied
from berthd.common.security.permissions import Permission
from berthd.common.security.principal import Principal

# PermissionDenied's reason, and the node's ContainerFailure.reason for an unstamped record.
HOST_ACCESS_DENIED = "HOST_ACCESS_DENIED"

# HostAccess.kind (the Violation type of a refusal).
BIND_MOUNT = "HOST_BIND_MOUNT"
HOST_NETWORK = "HOST_NETWORK"
CAPABILITY = "CAPABILITY"
SECCOMP_UNCONFINED = "SECCOMP_UNCONFINED"
SECCOMP_PROFILE = "SECCOMP_PROFILE"
NEW_PRIVILEGES = "NEW_PRIVILEGES"


@dataclass(frozen=True)
class HostAccess:
    """One reason a spec needs host access: a stable `kind`, the `subject` it is about
    ("mount//", "capability/CAP_SYS_ADMIN") and a phrase for a person."""

    kind: str
    subject: str
    description: str

    def violation(self) -> Violation:
        return Violation(self.kind, self.subject, self.description)


def host_access(spec: ContainerConfig | pb.ContainerSpec, field: str = "spec") -> list[HostAccess]:
    """Every reason `spec` needs host access, in field order; empty for a confined spec.
    InvalidArgument (reason INVALID_SPEC, `field`) when its capabilities or security options
    cannot be read at all."""
    try:
        config = model.from_spec(spec) if isinstance(spec, pb.ContainerSpec) else spec
        caps = model.capabilities(config)
        adds = [model.normalize_capability(c) for c in config.cap_add]
        options = model.security_options(config)
    except InvalidArgumentError as exc:
        raise invalid_spec(exc, field) from None
    found = [
        HostAccess(
            BIND_MOUNT,
            f"mount/{m.source}",
            f"bind mount of host path {m.source} at {m.target}",
        )
        for m in config.mounts
        if m.source.startswith("/")
    ]
    if config.network_mode == "host":
        found.append(HostAccess(HOST_NETWORK, "network/host", "the host network"))
    if "ALL" in adds:
        found.append(HostAccess(CAPABILITY, "capability/ALL", "every capability (--cap-add ALL)"))
    else:
        found += [
            HostAccess(CAPABILITY, f"capability/{cap}", f"capability {cap}")
            for cap in caps
            if cap not in model.DEFAULT_CAPABILITIES
        ]
    if options.seccomp == "unconfined":
        found.append(HostAccess(SECCOMP_UNCONFINED, "security_opt/seccomp", "no seccomp filter"))
    elif options.seccomp != "default":
        found.append(
            HostAccess(SECCOMP_PROFILE, "security_opt/seccomp", "a custom seccomp profile")
        )
    if not options.no_new_privileges:
        found.append(
            HostAccess(
                NEW_PRIVILEGES,
                "security_opt/no-new-privileges",
                "new privileges (no-new-privileges=false)",
            )
        )
    return found


def admit(
    spec: ContainerConfig | pb.ContainerSpec, principal: Principal, field: str = "spec"
) -> str:
    """The admission stamp for a spec asked for by `principal`: "" when it needs no host
    access, the principal's name when it does and the principal holds HOST_ACCESS.
    PermissionDenied (HOST_ACCESS_DENIED, one violation per reason) otherwise."""
    reasons = host_access(spec, field)
    if not reasons:
        return ""
    if principal.holds(Permission.HOST_ACCESS):
        return principal.name
    raise denied(principal, reasons)


def denied(principal: Principal, reasons: list[HostAccess]) -> PermissionDenied:
    what = ", ".join(r.description for r in reasons)
    return PermissionDenied(
        f"{principal.name} may not give a container host access ({what}): it needs the "
        f"{Permission.HOST_ACCESS.value} permission (admins by default)",
        reason=HOST_ACCESS_DENIED,
        metadata={"permission": Permission.HOST_ACCESS.value, "principal": principal.name},
        violations=[r.violation() for r in reasons],
    )
