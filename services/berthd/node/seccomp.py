"""Seccomp profiles: Docker's profile format to the OCI `linux.seccomp` runc takes.

The default profile is Docker's and Podman's, as Debian's golang-github-containers-common
ships it (/usr/share/containers/seccomp.json). A profile in that format has rules that apply
only with some capabilities, on some architectures or from some kernel version (`includes` and
`excludes`); `convert` resolves them for one container, as moby's `seccomp.setupSeccomp` and
containers/common's do: capabilities are the container's bounding set, the architecture is
the host's.

On top of that profile the default adds Docker's namespace rules, which Podman's profile
leaves out: without CAP_SYS_ADMIN a container cannot make namespaces (unshare, clone with
namespace flags, setns) nor mount (mount, umount2, the new mount API). Without them
`unshare -Ur` gives a container's root every capability in a new user namespace.
"""

from __future__ import annotations

import functools
import json
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from berthd.common.errors import FailedPrecondition, InvalidArgument

DEFAULT_PROFILE_PATH = Path("/usr/share/containers/seccomp.json")
_EPERM = 1
_ENOSYS = 38
# Docker's clone rule: allowed when no namespace flag is set (CLONE_NEWNS | NEWCGROUP |
# NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET).
CLONE_NAMESPACE_FLAGS = 0x7E020000
# Syscalls moby's default profile allows only with CAP_SYS_ADMIN and Podman's allows to all:
# they make or join namespaces, or mount.
SYS_ADMIN_SYSCALLS = (
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "mount",
    "mount_setattr",
    "move_mount",
    "open_tree",
    "setns",
    "umount",
    "umount2",
    "unshare",
)
# Python's machine name -> (Go's GOARCH, as profiles' includes/excludes name it; libseccomp's
# native architecture, as archMap names it).
_ARCHES = {
    "x86_64": ("amd64", "SCMP_ARCH_X86_64"),
    "amd64": ("amd64", "SCMP_ARCH_X86_64"),
    "aarch64": ("arm64", "SCMP_ARCH_AARCH64"),
    "arm64": ("arm64", "SCMP_ARCH_AARCH64"),
    "i386": ("386", "SCMP_ARCH_X86"),
    "i686": ("386", "SCMP_ARCH_X86"),
    "armv7l": ("arm", "SCMP_ARCH_ARM"),
    "armv6l": ("arm", "SCMP_ARCH_ARM"),
    "ppc64le": ("ppc64le", "SCMP_ARCH_PPC64LE"),
    "s390x": ("s390x", "SCMP_ARCH_S390X"),
    "riscv64": ("riscv64", "SCMP_ARCH_RISCV64"),
    "mips64": ("mips64", "SCMP_ARCH_MIPS64"),
}


def host_arch() -> tuple[str, str]:
    """(GOARCH, native libseccomp architecture) of this machine."""
    machine = platform.machine()
    try:
        return _ARCHES[machine]
    except KeyError:
        raise FailedPrecondition(f"no seccomp architecture known for machine {machine}") from None


def kernel_version() -> tuple[int, int]:
    return _version(os.uname().release)


def _version(text: str) -> tuple[int, int]:
    parts = text.split("-")[0].split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise InvalidArgument(f"invalid kernel version {text!r} in seccomp profile") from None


def _strings(value: object, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"seccomp profile: {what} must be a list of strings")
    return value


def _filter(
    rule: Mapping[str, Any], key: str
) -> tuple[list[str], list[str], tuple[int, int] | None]:
    """(caps, arches, minKernel) of a rule's includes or excludes."""
    obj = rule.get(key) or {}
    if not isinstance(obj, dict):
        raise InvalidArgument(f"seccomp profile: {key} must be an object")
    min_kernel = obj.get("minKernel")
    if min_kernel is not None and not isinstance(min_kernel, str):
        raise InvalidArgument(f"seccomp profile: {key}.minKernel must be a string like 4.8")
    return (
        _strings(obj.get("caps"), f"{key}.caps"),
        _strings(obj.get("arches"), f"{key}.arches"),
        _version(min_kernel) if min_kernel else None,
    )


def _applies(
    rule: Mapping[str, Any], caps: frozenset[str], arch: str, kernel: tuple[int, int]
) -> bool:
    """moby's setupSeccomp: excludes first (any match drops the rule), then includes (all must
    hold)."""
    ex_caps, ex_arches, ex_kernel = _filter(rule, "excludes")
    if arch in ex_arches or any(c in caps for c in ex_caps):
        return False
    if ex_kernel is not None and kernel >= ex_kernel:
        return False
    in_caps, in_arches, in_kernel = _filter(rule, "includes")
    if in_arches and arch not in in_arches:
        return False
    if not all(c in caps for c in in_caps):
        return False
    return in_kernel is None or kernel >= in_kernel


def convert(
    profile: Mapping[str, Any],
    capabilities: Iterable[str],
    *,
    arch: tuple[str, str] | None = None,
    kernel: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The OCI `linux.seccomp` of a profile in Docker's format, for a container with these
    (bounding) capabilities, on `arch` (GOARCH, native libseccomp name; default the host's)
    and `kernel` (default the running one's)."""
    if not isinstance(profile, Mapping):
        raise InvalidArgument("seccomp profile must be a JSON object")
    go_arch, native = arch or host_arch()
    kernel = kernel or kernel_version()
    caps = frozenset(capabilities)
    default_action = profile.get("defaultAction")
    if not isinstance(default_action, str) or not default_action.startswith("SCMP_ACT_"):
        raise InvalidArgument("seccomp profile: defaultAction must be an SCMP_ACT_* action")
    arch_map = profile.get("archMap") or []
    architectures = _strings(profile.get("architectures"), "architectures")
    if arch_map and architectures:
        raise InvalidArgument("seccomp profile: use architectures or archMap, not both")
    if arch_map:
        if not isinstance(arch_map, list) or not all(isinstance(a, dict) for a in arch_map):
            raise InvalidArgument("seccomp profile: archMap must be a list of objects")
        for entry in arch_map:
            if entry.get("architecture") == native:
                architectures = [native, *_strings(entry.get("subArchitectures"), "archMap")]
    out: dict[str, Any] = {"defaultAction": default_action}
    if architectures:
        out["architectures"] = architectures
    if isinstance(profile.get("defaultErrnoRet"), int):
        out["defaultErrnoRet"] = profile["defaultErrnoRet"]
    flags = _strings(profile.get("flags"), "flags")
    if flags:
        out["flags"] = flags
    rules = profile.get("syscalls")
    rules = [] if rules is None else rules
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise InvalidArgument("seccomp profile: syscalls must be a list of objects")
    syscalls = []
    for rule in rules:
        if not _applies(rule, caps, go_arch, kernel):
            continue
        names = _strings(rule.get("names"), "syscalls names")
        if isinstance(rule.get("name"), str):
            names = [*names, rule["name"]]
        action = rule.get("action")
        if not names:
            continue
        if not isinstance(action, str) or not action.startswith("SCMP_ACT_"):
            raise InvalidArgument(f"seccomp profile: invalid action {action!r} for {names[0]}")
        call: dict[str, Any] = {"names": list(names), "action": action}
        if isinstance(rule.get("errnoRet"), int):
            call["errnoRet"] = rule["errnoRet"]
        args = rule.get("args") or []
        if not isinstance(args, list) or not all(isinstance(a, dict) for a in args):
            raise InvalidArgument(f"seccomp profile: args of {names[0]} must be objects")
        if args:
            call["args"] = [
                {k: a[k] for k in ("index", "value", "valueTwo", "op") if k in a} for a in args
            ]
        syscalls.append(call)
    out["syscalls"] = syscalls
    return out


def with_namespace_rules(
    seccomp: dict[str, Any], capabilities: Iterable[str], go_arch: str
) -> dict[str, Any]:
    """Docker's rules for namespaces and mounts on a converted profile: without CAP_SYS_ADMIN,
    SYS_ADMIN_SYSCALLS fail with EPERM, clone only without namespace flags (EPERM with one),
    clone3 with ENOSYS (so that libc falls back to clone, whose flags a filter can read)."""
    if "CAP_SYS_ADMIN" in capabilities:
        return seccomp
    gated = {*SYS_ADMIN_SYSCALLS, "clone", "clone3"}
    syscalls = []
    for call in seccomp["syscalls"]:
        # The profile's own rules for these give way to Docker's.
        names = [n for n in call["names"] if n not in gated]
        if names:
            syscalls.append({**call, "names": names})
    # s390 passes clone's flags second.
    flags_index = 1 if go_arch in ("s390", "s390x") else 0
    syscalls.append(
        {
            "names": ["clone"],
            "action": "SCMP_ACT_ALLOW",
            "args": [
                {
                    "index": flags_index,
                    "value": CLONE_NAMESPACE_FLAGS,
                    "valueTwo": 0,
                    "op": "SCMP_CMP_MASKED_EQ",
                }
            ],
        }
    )
    for bit in range(32):
        flag = 1 << bit
        if CLONE_NAMESPACE_FLAGS & flag:
            syscalls.append(
                {
                    "names": ["clone"],
                    "action": "SCMP_ACT_ERRNO",
                    "errnoRet": _EPERM,
                    "args": [
                        {
                            "index": flags_index,
                            "value": flag,
                            "valueTwo": flag,
                            "op": "SCMP_CMP_MASKED_EQ",
                        }
                    ],
                }
            )
    syscalls.append({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": _ENOSYS})
    syscalls.append(
        {"names": list(SYS_ADMIN_SYSCALLS), "action": "SCMP_ACT_ERRNO", "errnoRet": _EPERM}
    )
    return {**seccomp, "syscalls": syscalls}


def load_profile(path: Path | None = None) -> dict[str, Any]:
    """The default profile's JSON; a node without it cannot run containers confined."""
    path = path or DEFAULT_PROFILE_PATH
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise FailedPrecondition(
            f"the default seccomp profile {path} is missing on this node: install Debian's "
            "golang-github-containers-common (make apt), or run the container with "
            "--security-opt seccomp=unconfined"
        ) from None
    try:
        profile = json.loads(text)
    except ValueError as e:
        raise FailedPrecondition(f"the default seccomp profile {path} is not JSON: {e}") from None
    if not isinstance(profile, dict):
        raise FailedPrecondition(f"the default seccomp profile {path} is not a JSON object")
    return profile


@functools.lru_cache(maxsize=64)
def _default_for(
    capabilities: frozenset[str], path: Path, mtime_ns: int
) -> str:  # JSON text: callers get a fresh copy
    profile = load_profile(path)
    arch = host_arch()
    seccomp = convert(profile, capabilities, arch=arch)
    return json.dumps(with_namespace_rules(seccomp, capabilities, arch[0]))


def default_seccomp(capabilities: Sequence[str], path: Path | None = None) -> dict[str, Any]:
    """The OCI seccomp of the default profile for a container with these capabilities; cached
    per capability set (and per version of the file)."""
    path = path or DEFAULT_PROFILE_PATH
    try:
        mtime = path.stat().st_mtime_ns
    except FileNotFoundError:
        load_profile(path)  # raises the clear error
        raise
    return json.loads(_default_for(frozenset(capabilities), path, mtime))


def custom_seccomp(profile_json: str, capabilities: Sequence[str]) -> dict[str, Any]:
    """The OCI seccomp of a profile given with --security-opt seccomp=PROFILE: converted as
    the default, without berth's additions (as in Docker, the profile is the whole filter)."""
    try:
        profile = json.loads(profile_json)
    except ValueError as e:
        raise InvalidArgument(f"seccomp profile is not valid JSON: {e}") from None
    return convert(profile, capabilities)
