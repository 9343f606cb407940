"""From a container spec and an image config to an OCI runtime bundle, with Docker's rules.

The container model itself (ContainerConfig, MountSpec, their validation) is the client
package's `berth.containers`, used through berthd.common.containers.

Pure functions and plain data: the container manager calls these, then mounts overlayfs and runs
runc. Nothing here knows about gRPC; bad input raises InvalidArgument with a message a user can
act on.
"""

from __future__ import annotations

import errno
import os
import posixpath
import resource
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from berthd.common.containers import (
    SECRETS_DIR,
    ContainerConfig,
    MountSpec,
    capabilities,
    check_hostname,
    check_user,
    security_options,
)
from berthd.common.errors import InvalidArgument
from berthd.common.oci.digest import quoted
from berthd.node import seccomp
from berthd.node.dns import resolv_conf
from berthd.node.idmap import IdMap

OCI_VERSION = "1.0.2"
# Docker's PATH for images that set none (moby's system.DefaultPathEnv on Linux).
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CPU_PERIOD_US = 100_000
SHM_SIZE = "65536k"
MAX_NOFILE = 1_048_576
# moby oci/defaults.go: kernel interfaces a container must not read or write.
MASKED_PATHS = (
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# (path, major, minor): the nodes every container gets in its /dev.
DEFAULT_DEVICES = (
    ("/dev/null", 1, 3),
    ("/dev/zero", 1, 5),
    ("/dev/full", 1, 7),
    ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9),
    ("/dev/tty", 5, 0),
)
# (type, major, minor, access) allowed after a deny-all rule: what a Docker container's
# devices.list shows. None is the wildcard "*".
ALLOWED_DEVICES: tuple[tuple[str, int | None, int | None, str], ...] = (
    ("c", None, None, "m"),  # mknod of any node; using it still needs a rule below
    ("b", None, None, "m"),
    ("c", 1, 3, "rwm"),
    ("c", 1, 5, "rwm"),
    ("c", 1, 7, "rwm"),
    ("c", 1, 8, "rwm"),
    ("c", 1, 9, "rwm"),
    ("c", 5, 0, "rwm"),
    ("c", 5, 1, "rwm"),  # /dev/console
    ("c", 5, 2, "rwm"),  # /dev/ptmx
    ("c", 136, None, "rwm"),  # /dev/pts/*
    ("c", 10, 200, "rwm"),  # /dev/net/tun
)
# Mount points runc would otherwise create in the container's upper dir, where they would show
# up in `changes()` and in committed layers (Docker's init layer, daemon/initlayer).
INIT_LAYER_DIRS = ("dev", "dev/pts", "dev/shm", "proc", "sys", "etc")
INIT_LAYER_FILES = ("etc/hosts", "etc/hostname", "etc/resolv.conf", "dev/console")
ETC_FILES = ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf")
LOCALHOST_LINES = (
    "127.0.0.1\tlocalhost",
    "::1\tlocalhost ip6-localhost ip6-loopback",
    "fe00::0\tip6-localnet",
    "ff00::0\tip6-mcastprefix",
    "ff02::1\tip6-allnodes",
    "ff02::2\tip6-allrouters",
)

_MAX_ID = 2**31 - 1
_MAX_SYMLINKS = 40  # like the kernel's limit on symlinks followed in one lookup
_MAX_DB_BYTES = 16 * 1024 * 1024


# --- process ---------------------------------------------------------------------------------


def _image_args(image_config: Mapping[str, Any], key: str) -> list[str]:
    """Cmd or Entrypoint of an image config. A bare string counts as one argument, as Docker's
    strslice reads it; null means unset."""
    value = image_config.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise InvalidArgument(f"image config {key} must be a list of strings, got {quoted(value)}")


def _merge_env(base: list[str], overrides: Sequence[str]) -> list[str]:
    """Docker's ReplaceOrAppendEnvValues: an override replaces the same key in place."""
    merged = list(base)
    index = {e.partition("=")[0]: i for i, e in enumerate(merged)}
    for entry in overrides:
        key = entry.partition("=")[0]
        if key in index:
            merged[index[key]] = entry
        else:
            index[key] = len(merged)
            merged.append(entry)
    return merged


def resolve_process(
    image_config: Mapping[str, Any], cfg: ContainerConfig, *, hostname: str = ""
) -> tuple[list[str], list[str], str]:
    """(args, env, cwd) of the container's process, with Docker's rules.

    `image_config` is the image config's `config` object (Env, Cmd, Entrypoint, WorkingDir).
    `hostname` is the container's effective hostname (cfg.hostname, else derived from the id);
    Docker puts it in HOSTNAME.
    """
    if not cfg.entrypoint:
        entrypoint = _image_args(image_config, "Entrypoint")
        command = cfg.command or _image_args(image_config, "Cmd")
    else:
        entrypoint = [] if cfg.entrypoint == [""] else list(cfg.entrypoint)
        # A new entrypoint makes the image's CMD meaningless, except when it only clears
        # the image's entrypoint (`--entrypoint ""`): then CMD runs on its own.
        command = cfg.command or ([] if entrypoint else _image_args(image_config, "Cmd"))
    args = entrypoint + command
    if not args:
        raise InvalidArgument(
            "no command specified: the image has no ENTRYPOINT or CMD, give a command"
        )

    image_env = image_config.get("Env") or []
    if not isinstance(image_env, list) or not all(isinstance(e, str) for e in image_env):
        raise InvalidArgument(
            f"image config Env must be a list of strings, got {quoted(image_env)}"
        )
    defaults = [f"PATH={DEFAULT_PATH}"]
    if hostname or cfg.hostname:
        defaults.append(f"HOSTNAME={hostname or cfg.hostname}")
    env = _merge_env(_merge_env(defaults, image_env), cfg.env)

    cwd = cfg.working_dir or image_config.get("WorkingDir") or "/"
    if not isinstance(cwd, str):
        raise InvalidArgument(f"image config WorkingDir must be a string, got {quoted(cwd)}")
    # Old builders wrote relative WorkingDirs; Docker resolves them against /.
    return args, env, posixpath.normpath(posixpath.join("/", cwd))


def effective_user(image_config: Mapping[str, Any], cfg: ContainerConfig) -> str:
    """The user spec to resolve: the container's, else the image's USER, else root."""
    user = cfg.user or image_config.get("User") or ""
    check_user(user)
    return user


# --- users -----------------------------------------------------------------------------------


def _open_in_root(root: Path, path: str) -> int | None:
    """Open the regular file `path` as if `root` were `/`, for reading; None if there is none.

    The rootfs is untrusted: symlinks are followed one component at a time, absolute targets
    restart at `root` and `..` stops there, like path lookup inside a chroot. Every open is
    relative to a directory fd with O_NOFOLLOW, so nothing outside `root` is ever reached.
    """
    dirs = [os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]
    todo = [p for p in reversed(path.split("/")) if p]  # pop() yields the next component
    links = 0
    try:
        while todo:
            part = todo.pop()
            if part == ".":
                continue
            if part == "..":
                if len(dirs) > 1:
                    os.close(dirs.pop())
                continue
            try:
                fd = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirs[-1])
            except (FileNotFoundError, NotADirectoryError):
                return None
            mode = os.fstat(fd).st_mode
            if stat.S_ISLNK(mode):
                os.close(fd)
                links += 1
                if links > _MAX_SYMLINKS:
                    return None
                target = os.readlink(part, dir_fd=dirs[-1])
                if target.startswith("/"):
                    while len(dirs) > 1:
                        os.close(dirs.pop())
                todo.extend(p for p in reversed(target.split("/")) if p)
            elif todo:
                if not stat.S_ISDIR(mode):
                    os.close(fd)
                    return None
                dirs.append(fd)
            else:
                os.close(fd)
                return _open_regular(part, dirs[-1])
        return None
    finally:
        for fd in dirs:
            os.close(fd)


def _open_regular(name: str, dir_fd: int) -> int | None:
    # O_NONBLOCK: a FIFO swapped in after the type check must not hang the agent.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
            return None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def _read_db(rootfs: Path, path: str) -> list[list[str]] | None:
    """The colon-separated lines of /etc/passwd or /etc/group; None if the file is missing."""
    fd = _open_in_root(rootfs, path)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        data = f.read(_MAX_DB_BYTES + 1)
    if len(data) > _MAX_DB_BYTES:
        raise InvalidArgument(f"{path} in the image is larger than {_MAX_DB_BYTES} bytes")
    lines = (line.strip() for line in data.decode("utf-8", "replace").splitlines())
    return [line.split(":") for line in lines if line and not line.startswith("#")]


def _parse_id(text: str, what: str) -> int | None:
    """A numeric uid/gid, None for a name; out-of-range numbers are errors."""
    if not text.isdigit() or not text.isascii():
        return None
    value = int(text)
    if value > _MAX_ID:
        raise InvalidArgument(f"{what} {text} is out of range: ids go from 0 to {_MAX_ID}")
    return value


def _id_field(fields_: list[str], i: int) -> int | None:
    if len(fields_) <= i or not fields_[i].isdigit() or not fields_[i].isascii():
        return None
    value = int(fields_[i])
    return value if value <= _MAX_ID else None


def resolve_user(rootfs: Path, user: str) -> tuple[int, int, list[int]]:
    """(uid, gid, additional gids) for `user[:group]`, with runc's (and so Docker's) rules.

    Names are looked up in the rootfs's /etc/passwd and /etc/group; numbers need no entry. A
    user found in /etc/passwd also gets its primary gid and, unless a group is given, the
    groups that list it as a member. "" is root, also looked up (root's groups apply).
    """
    check_user(user)
    user_arg, _, group_arg = user.partition(":")
    uid_arg = 0 if user_arg == "" else _parse_id(user_arg, "uid")
    gid_arg = _parse_id(group_arg, "gid")
    uid, gid, additional = uid_arg or 0, 0, []

    passwd = _read_db(rootfs, "/etc/passwd")
    matched = None
    for entry in passwd or []:
        entry_uid, entry_gid = _id_field(entry, 2), _id_field(entry, 3)
        if entry_uid is None or entry_gid is None:
            continue
        if (entry_uid == uid_arg) if uid_arg is not None else (entry[0] == user_arg):
            matched, uid, gid = entry[0], entry_uid, entry_gid
            break
    if matched is None and uid_arg is None:
        why = "no matching entry in" if passwd is not None else "the image has no"
        raise InvalidArgument(f"unable to find user {quoted(user_arg)}: {why} /etc/passwd")

    if group_arg or matched is not None:
        groups: list[int] = []
        for entry in _read_db(rootfs, "/etc/group") or []:
            entry_gid = _id_field(entry, 2)
            if entry_gid is None:
                continue
            if not group_arg:
                members = entry[3].split(",") if len(entry) > 3 else []
                hit = matched in members
            elif gid_arg is not None:
                hit = entry_gid == gid_arg
            else:
                hit = entry[0] == group_arg
            if hit:
                groups.append(entry_gid)
        if group_arg:
            if groups:
                gid = groups[0]
            elif gid_arg is not None:
                gid = gid_arg
            else:
                raise InvalidArgument(
                    f"unable to find group {quoted(group_arg)}: no matching entry in /etc/group"
                )
        else:
            additional = groups
    return uid, gid, additional


# --- bundle ----------------------------------------------------------------------------------


def _mount(destination: str, type_: str, source: str, options: list[str]) -> dict[str, Any]:
    return {"destination": destination, "type": type_, "source": source, "options": options}


def _bind(destination: str, source: str, read_only: bool) -> dict[str, Any]:
    # rprivate: mounts made later on the host must not propagate into the container.
    return _mount(
        destination, "bind", source, ["rbind", "rprivate", *(["ro"] if read_only else [])]
    )


# (destination, type, source, options): the kernel file systems every container gets.
_SYSTEM_MOUNTS = (
    ("/proc", "proc", "proc", ("nosuid", "noexec", "nodev")),
    ("/dev", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
    (
        "/dev/pts",
        "devpts",
        "devpts",
        ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"),
    ),
    ("/dev/shm", "tmpfs", "shm", ("nosuid", "noexec", "nodev", "mode=1777", f"size={SHM_SIZE}")),
    ("/dev/mqueue", "mqueue", "mqueue", ("nosuid", "noexec", "nodev")),
    ("/sys", "sysfs", "sysfs", ("nosuid", "noexec", "nodev", "ro")),
    ("/sys/fs/cgroup", "cgroup", "cgroup", ("nosuid", "noexec", "nodev", "relatime", "ro")),
)


def nofile_limit() -> int:
    """RLIMIT_NOFILE for containers: Docker's 1048576, capped at our own hard limit, since
    without CAP_SYS_RESOURCE runc cannot raise it (HOST-NOTES)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return MAX_NOFILE if hard == resource.RLIM_INFINITY else min(MAX_NOFILE, hard)


def _resources(cfg: ContainerConfig) -> dict[str, Any]:
    devices: list[dict[str, Any]] = [{"allow": False, "access": "rwm"}]
    for type_, major, minor, access in ALLOWED_DEVICES:
        rule: dict[str, Any] = {"allow": True, "type": type_, "access": access}
        rule.update({k: v for k, v in (("major", major), ("minor", minor)) if v is not None})
        devices.append(rule)
    res: dict[str, Any] = {"devices": devices}
    if cfg.memory_bytes:
        res["memory"] = {"limit": cfg.memory_bytes}
    cpu: dict[str, Any] = {}
    if cfg.cpu_millis:
        cpu.update(quota=cfg.cpu_millis * CPU_PERIOD_US // 1000, period=CPU_PERIOD_US)
    if cfg.cpu_shares:
        cpu["shares"] = cfg.cpu_shares
    if cpu:
        res["cpu"] = cpu
    if cfg.pids_limit:
        res["pids"] = {"limit": cfg.pids_limit}
    return res


def build_runtime_config(
    *,
    config: ContainerConfig,
    args: Sequence[str],
    env: Sequence[str],
    cwd: str,
    uid: int,
    gid: int,
    additional_gids: Sequence[int] = (),
    rootfs: str | Path,
    hostname: str,
    etc_files: Mapping[str, Path],
    cgroups_path: str,
    mounts: Sequence[MountSpec] | None = None,
    network_namespace_path: str | None = None,
    secrets_dir: str | Path | None = None,
    idmap: IdMap | None = None,
) -> dict[str, Any]:
    """The OCI runtime-spec config.json for runc, with Docker's defaults.

    `args`/`env`/`cwd` come from resolve_process, `uid`/`gid`/`additional_gids` from
    resolve_user, `etc_files` from prepare_etc_files. `mounts` are config.mounts with volume
    names resolved to host paths (default: config.mounts, which must then all be paths).
    `network_namespace_path` joins an existing network namespace (a future bridge mode)
    instead of making a new one. `secrets_dir` (the container's secrets tmpfs on the node) is
    mounted read-only at /run/secrets. `idmap` runs the container in a user namespace of its
    own with that mapping (`--userns remap`); the root filesystem must then be readable
    through it (berthd.node.idmap).
    """
    check_hostname(hostname)
    mounts = config.mounts if mounts is None else mounts
    for m in mounts:
        if not m.source.startswith("/"):
            raise InvalidArgument(f"mount source {quoted(m.source)} is not a host path")
    if config.network_mode == "host" and network_namespace_path:
        raise InvalidArgument("host network mode cannot join another network namespace")
    if idmap is not None:
        if config.network_mode == "host":
            # The model refuses it too; sysfs cannot be mounted without owning the netns.
            raise InvalidArgument(
                "user namespace mode remap cannot share the host's network namespace"
            )
        # runc would fail with a bare "invalid argument" from setuid/setgroups.
        idmap.check("uid", [uid])
        idmap.check("gid", [gid, *additional_gids])

    # Docker's default set with cap_add/cap_drop applied.
    caps = capabilities(config)
    security = security_options(config)
    # A non-root user gets no effective/permitted capabilities, as after execve (moby's
    # CVE-2022-24769 fix); inheritable/ambient stay empty so they cannot leak through exec.
    cap_sets: dict[str, list[str]] = {"bounding": caps}
    if uid == 0:
        cap_sets.update(effective=list(caps), permitted=list(caps))

    # A user mount replaces a default one at the same place, as in Docker.
    targets = {posixpath.normpath(m.target) for m in mounts}
    oci_mounts = [
        _mount(dest, type_, source, list(options))
        for dest, type_, source, options in _SYSTEM_MOUNTS
        if dest not in targets
    ]
    # Docker makes these read-only only with a read-only rootfs.
    oci_mounts += [
        _bind(dest, str(src), config.read_only_rootfs)
        for dest, src in sorted(etc_files.items())
        if dest not in targets
    ]
    # Parents before children, so /data/sub lands on top of /data.
    for m in sorted(mounts, key=lambda m: posixpath.normpath(m.target).count("/")):
        oci_mounts.append(_bind(posixpath.normpath(m.target), m.source, m.read_only))
    if secrets_dir is not None:
        # Last, so a user's mount of /run cannot cover it; the model refuses one at its place.
        options = ["rbind", "rprivate", "ro", "nosuid", "nodev", "noexec"]
        oci_mounts.append(_mount(SECRETS_DIR, "bind", str(secrets_dir), options))

    # A private cgroup namespace: the container sees its own cgroup as the root.
    namespaces: list[dict[str, str]] = [
        {"type": t} for t in ("pid", "ipc", "uts", "mount", "cgroup")
    ]
    if config.network_mode != "host":
        netns = {"type": "network"}
        if network_namespace_path:
            netns["path"] = network_namespace_path
        namespaces.append(netns)
    if idmap is not None:
        namespaces.append({"type": "user"})

    nofile = nofile_limit()
    user_obj: dict[str, Any] = {"uid": uid, "gid": gid}
    if additional_gids:
        user_obj["additionalGids"] = list(additional_gids)
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "resources": _resources(config),
        "cgroupsPath": cgroups_path,
        "devices": [
            {
                "path": p,
                "type": "c",
                "major": ma,
                "minor": mi,
                "fileMode": 0o666,
                "uid": 0,
                "gid": 0,
            }
            for p, ma, mi in DEFAULT_DEVICES
        ],
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }
    if idmap is not None:
        linux["uidMappings"] = idmap.oci()
        linux["gidMappings"] = idmap.oci()
    if security.seccomp == "default":
        # Raises FailedPrecondition when the node lacks the profile: never silently unconfined.
        linux["seccomp"] = seccomp.default_seccomp(caps)
    elif security.seccomp != "unconfined":
        linux["seccomp"] = seccomp.custom_seccomp(security.seccomp, caps)
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            # A pty from runc, whose master conmon (-t) receives over its console socket.
            "terminal": config.tty,
            "user": user_obj,
            "args": list(args),
            "env": list(env),
            "cwd": cwd,
            "capabilities": cap_sets,
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": nofile, "soft": nofile}],
            "noNewPrivileges": security.no_new_privileges,
        },
        "root": {"path": str(rootfs), "readonly": config.read_only_rootfs},
        "hostname": hostname,
        "mounts": oci_mounts,
        "linux": linux,
    }


def write_init_layer(path: Path, secrets: bool = False) -> None:
    """Fill `path` with the mount points every container needs (Docker's init layer), and
    /run/secrets for a container with `secrets`.

    Stacked as the top lower dir, right under the upper dir: runc then finds its mount points
    and never creates them in the upper dir, where they would show up as changes.
    """
    for d in (*INIT_LAYER_DIRS, *([SECRETS_DIR.lstrip("/")] if secrets else [])):
        (path / d).mkdir(mode=0o755, parents=True, exist_ok=True)
    for f in INIT_LAYER_FILES:
        (path / f).touch(mode=0o644, exist_ok=True)


def prepare_etc_files(
    container_dir: Path,
    hostname: str,
    network_mode: str,
    *,
    address: str | None = None,
    nameserver: str | None = None,
    owner: tuple[int, int] | None = None,
) -> dict[str, Path]:
    """Write the container's hosts, hostname and resolv.conf into `container_dir`.

    Returns {destination in the container: host file}, for build_runtime_config's
    etc_files. `address` is the container's own IP once it has one (bridge mode); without it
    the hostname resolves to loopback. `nameserver`: the node's resolver for the container's
    network (its bridge's gateway, berthd.node.dns). `owner` (host uid, gid) is a remapped
    container's root, which must be able to write them as Docker's containers can.
    """
    check_hostname(hostname)
    try:
        host_resolv = Path("/etc/resolv.conf").read_text()
    except FileNotFoundError:
        host_resolv = ""
    if network_mode == "host":
        resolv = host_resolv
    elif nameserver:
        resolv = resolv_conf(nameserver, host_resolv)
    else:
        resolv = f"# berth: network mode {network_mode}, no name servers\n"
    hosts = "\n".join([*LOCALHOST_LINES, f"{address or '127.0.0.1'}\t{hostname}"]) + "\n"
    contents = {"hosts": hosts, "hostname": f"{hostname}\n", "resolv.conf": resolv}
    container_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, text in contents.items():
        path = container_dir / name
        path.write_text(text)
        path.chmod(0o644)
        if owner is not None:
            os.chown(path, *owner)
        written[f"/etc/{name}"] = path
    return written
