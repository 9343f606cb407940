"""berthd.node.spec: Docker's process rules, user lookup in an untrusted rootfs, config.json."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import pytest

from berthd.common.errors import InvalidArgument
from berthd.node.idmap import IdMap
from berthd.node.spec import (
    DEFAULT_PATH,
    ContainerConfig,
    MountSpec,
    build_runtime_config,
    effective_user,
    prepare_etc_files,
    resolve_process,
    resolve_user,
    write_init_layer,
)

DOCKER_CAPS = {
    f"CAP_{c}"
    for c in [
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
    ]
}


# --- entrypoint and command ---------------------------------------------------------------

IMAGE = {"Entrypoint": ["/ep", "-x"], "Cmd": ["default"]}
CMD_ONLY = {"Cmd": ["/bin/sh", "-c", "echo hi"]}


@pytest.mark.parametrize(
    ("image", "entrypoint", "command", "expected"),
    [
        (IMAGE, [], [], ["/ep", "-x", "default"]),
        (IMAGE, [], ["mine"], ["/ep", "-x", "mine"]),
        # A new entrypoint drops the image's CMD...
        (IMAGE, ["/new"], [], ["/new"]),
        (IMAGE, ["/new"], ["arg"], ["/new", "arg"]),
        # ...but clearing the entrypoint (`--entrypoint ""`) leaves CMD to run alone.
        (IMAGE, [""], [], ["default"]),
        (IMAGE, [""], ["mine"], ["mine"]),
        (CMD_ONLY, [], [], ["/bin/sh", "-c", "echo hi"]),
        (CMD_ONLY, [], ["ls"], ["ls"]),
        (CMD_ONLY, ["/new"], [], ["/new"]),
        ({"Entrypoint": ["/ep"], "Cmd": None}, [], [], ["/ep"]),
        ({}, [], ["true"], ["true"]),
        # Docker's strslice reads a bare string as one argument.
        ({"Cmd": "/bin/sh"}, [], [], ["/bin/sh"]),
    ],
)
def test_docker_entrypoint_and_cmd_rules(
    image: dict[str, Any], entrypoint: list[str], command: list[str], expected: list[str]
) -> None:
    cfg = ContainerConfig("img", entrypoint=entrypoint, command=command)
    assert resolve_process(image, cfg)[0] == expected


@pytest.mark.parametrize(
    ("image", "entrypoint"),
    [({}, []), ({"Entrypoint": ["/ep"]}, [""]), ({"Cmd": [], "Entrypoint": None}, [])],
)
def test_nothing_to_run_is_an_error(image: dict[str, Any], entrypoint: list[str]) -> None:
    with pytest.raises(InvalidArgument, match="no command specified"):
        resolve_process(image, ContainerConfig("img", entrypoint=entrypoint))


def test_bad_image_cmd_type_is_reported() -> None:
    with pytest.raises(InvalidArgument, match="Cmd must be a list of strings"):
        resolve_process({"Cmd": [1]}, ContainerConfig("img"))


# --- environment and working directory ----------------------------------------------------


def test_container_env_overrides_image_env_in_place() -> None:
    image = {"Cmd": ["x"], "Env": ["PATH=/usr/bin", "A=1", "B=2"]}
    cfg = ContainerConfig("img", env=["B=3", "C=4=5", "A="])
    _, env, _ = resolve_process(image, cfg)
    assert env == ["PATH=/usr/bin", "A=", "B=3", "C=4=5"]


def test_path_default_and_hostname() -> None:
    _, env, _ = resolve_process(
        {"Cmd": ["x"], "Env": ["A=1"]}, ContainerConfig("img"), hostname="h1"
    )
    assert env == [f"PATH={DEFAULT_PATH}", "HOSTNAME=h1", "A=1"]
    _, env, _ = resolve_process({"Cmd": ["x"]}, ContainerConfig("img", env=["PATH=/opt"]))
    assert env == ["PATH=/opt"]


@pytest.mark.parametrize(
    ("image_dir", "cfg_dir", "expected"),
    [("", "", "/"), ("/srv", "", "/srv"), ("/srv", "/work", "/work"), ("app", "", "/app")],
)
def test_working_directory(image_dir: str, cfg_dir: str, expected: str) -> None:
    image = {"Cmd": ["x"], "WorkingDir": image_dir}
    assert resolve_process(image, ContainerConfig("img", working_dir=cfg_dir))[2] == expected


def test_effective_user_prefers_the_container() -> None:
    assert effective_user({"User": "app"}, ContainerConfig("img")) == "app"
    assert effective_user({"User": "app"}, ContainerConfig("img", user="0:0")) == "0:0"
    assert effective_user({}, ContainerConfig("img")) == ""


# --- users --------------------------------------------------------------------------------

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1::/:/sbin/nologin
broken line
app:x:1000:1000::/home/app:/bin/sh
"""
GROUP = """\
root:x:0:root
wheel:x:10:root,app
app:x:1000:
docker:x:999:app
"""


def make_rootfs(root: Path, passwd: str | None = PASSWD, group: str | None = GROUP) -> Path:
    (root / "etc").mkdir(parents=True)
    if passwd is not None:
        (root / "etc" / "passwd").write_text(passwd)
    if group is not None:
        (root / "etc" / "group").write_text(group)
    return root


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("", (0, 0, [0, 10])),  # Docker's root gets the groups listing root
        ("root", (0, 0, [0, 10])),
        ("app", (1000, 1000, [10, 999])),
        ("1000", (1000, 1000, [10, 999])),  # a known uid counts as that user
        ("4242", (4242, 0, [])),
        ("4242:4343", (4242, 4343, [])),
        ("app:docker", (1000, 999, [])),  # an explicit group replaces the supplementary ones
        ("app:5555", (1000, 5555, [])),
        ("daemon:wheel", (1, 10, [])),
    ],
)
def test_resolve_user(tmp_path: Path, user: str, expected: tuple[int, int, list[int]]) -> None:
    assert resolve_user(make_rootfs(tmp_path), user) == expected


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("nobody", 'unable to find user "nobody"'),
        ("app:nogroup", 'unable to find group "nogroup"'),
        ("2147483648", "out of range"),
        ("a:b:c", "expected user"),
    ],
)
def test_resolve_user_errors(tmp_path: Path, user: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        resolve_user(make_rootfs(tmp_path), user)


def test_no_passwd_file_means_no_named_users(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path, passwd=None, group=None)
    assert resolve_user(rootfs, "") == (0, 0, [])
    assert resolve_user(rootfs, "33:33") == (33, 33, [])
    with pytest.raises(InvalidArgument, match=r'"app".*no /etc/passwd'):
        resolve_user(rootfs, "app")


def host_passwd(tmp_path: Path) -> Path:
    """A passwd file outside the rootfs that an image must never be able to point us at."""
    host = tmp_path / "host" / "etc"
    host.mkdir(parents=True)
    (host / "passwd").write_text("evil:x:0:0::/:/bin/sh\n")
    return host / "passwd"


@pytest.mark.parametrize("style", ["absolute", "relative", "parent-dir"])
def test_hostile_passwd_symlink_stays_inside_the_rootfs(tmp_path: Path, style: str) -> None:
    outside = host_passwd(tmp_path)
    rootfs = make_rootfs(tmp_path / "rootfs", passwd=None, group=None)
    if style == "absolute":
        (rootfs / "etc" / "passwd").symlink_to(outside)
    elif style == "relative":
        (rootfs / "etc" / "passwd").symlink_to("../../../../../../../../" + str(outside))
    else:  # /etc itself points at the host's directory
        (rootfs / "etc").rmdir()
        (rootfs / "etc").symlink_to(outside.parent)
    with pytest.raises(InvalidArgument, match='unable to find user "evil"'):
        resolve_user(rootfs, "evil")


def test_symlinks_inside_the_rootfs_resolve_against_it(tmp_path: Path) -> None:
    host_passwd(tmp_path)
    rootfs = make_rootfs(tmp_path / "rootfs", passwd=None, group=None)
    (rootfs / "usr" / "lib").mkdir(parents=True)
    (rootfs / "usr" / "lib" / "passwd").write_text("app:x:7:8::/:/bin/sh\n")
    # Absolute targets mean the container's /, not the host's.
    (rootfs / "etc" / "passwd").symlink_to("/usr/../usr/lib/passwd")
    assert resolve_user(rootfs, "app") == (7, 8, [])


def test_symlink_loops_and_special_files_count_as_missing(tmp_path: Path) -> None:
    rootfs = make_rootfs(tmp_path, passwd=None, group=None)
    (rootfs / "etc" / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(InvalidArgument, match="no /etc/passwd"):
        resolve_user(rootfs, "app")
    (rootfs / "etc" / "passwd").unlink()
    os.mkfifo(rootfs / "etc" / "passwd")  # reading it would block forever
    with pytest.raises(InvalidArgument, match="no /etc/passwd"):
        resolve_user(rootfs, "app")


# --- config.json --------------------------------------------------------------------------


def runtime_config(
    tmp_path: Path, uid: int = 0, idmap: IdMap | None = None, **fields: Any
) -> dict[str, Any]:
    cfg = ContainerConfig("img", command=["true"], **fields)
    cfg.validate()
    args, env, cwd = resolve_process({}, cfg)
    etc = prepare_etc_files(tmp_path / "etc", "box", cfg.network_mode)
    config = build_runtime_config(
        config=cfg,
        args=args,
        env=env,
        cwd=cwd,
        uid=uid,
        gid=uid,
        additional_gids=[10],
        rootfs=tmp_path / "rootfs",
        hostname="box",
        etc_files=etc,
        cgroups_path="/berth/node1/abc",
        idmap=idmap,
    )
    json.dumps(config)  # must serialize as is
    return config


def test_runtime_config_has_docker_defaults(tmp_path: Path) -> None:
    config = runtime_config(tmp_path)
    assert config["ociVersion"] == "1.0.2"
    process = config["process"]
    assert process["terminal"] is False
    assert process["noNewPrivileges"] is True
    assert process["user"] == {"uid": 0, "gid": 0, "additionalGids": [10]}
    caps = process["capabilities"]
    for kind in ("bounding", "effective", "permitted"):
        assert set(caps[kind]) == DOCKER_CAPS
        assert len(caps[kind]) == 14
    assert "inheritable" not in caps and "ambient" not in caps
    assert config["root"] == {"path": str(tmp_path / "rootfs"), "readonly": False}
    assert config["hostname"] == "box"
    linux = config["linux"]
    assert linux["cgroupsPath"] == "/berth/node1/abc"
    assert "/proc/kcore" in linux["maskedPaths"]
    assert "/sys/firmware" in linux["maskedPaths"]
    assert linux["readonlyPaths"] == [
        "/proc/bus",
        "/proc/fs",
        "/proc/irq",
        "/proc/sys",
        "/proc/sysrq-trigger",
    ]
    assert [n["type"] for n in linux["namespaces"]] == [
        "pid",
        "ipc",
        "uts",
        "mount",
        "cgroup",
        "network",
    ]
    assert {d["path"] for d in linux["devices"]} == {
        "/dev/null",
        "/dev/zero",
        "/dev/full",
        "/dev/random",
        "/dev/urandom",
        "/dev/tty",
    }
    rules = linux["resources"]["devices"]
    assert rules[0] == {"allow": False, "access": "rwm"}  # deny first, then Docker's list
    assert {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"} in rules
    assert {"allow": True, "type": "c", "major": 136, "access": "rwm"} in rules
    assert set(linux["resources"]) == {"devices"}  # no limits asked, none set


def test_rlimit_never_exceeds_our_hard_limit(tmp_path: Path) -> None:
    (rlimit,) = runtime_config(tmp_path)["process"]["rlimits"]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert rlimit["type"] == "RLIMIT_NOFILE"
    assert rlimit["soft"] == rlimit["hard"] <= 1048576
    if hard != resource.RLIM_INFINITY:
        assert rlimit["hard"] <= hard


def test_non_root_user_keeps_only_the_bounding_set(tmp_path: Path) -> None:
    caps = runtime_config(tmp_path, uid=1000)["process"]["capabilities"]
    assert set(caps) == {"bounding"}
    assert set(caps["bounding"]) == DOCKER_CAPS


def test_resources_are_mapped(tmp_path: Path) -> None:
    config = runtime_config(
        tmp_path, memory_bytes=512 * 1024 * 1024, cpu_millis=500, cpu_shares=512, pids_limit=100
    )
    res = config["linux"]["resources"]
    assert res["memory"] == {"limit": 536870912}
    assert res["cpu"] == {"quota": 50000, "period": 100000, "shares": 512}
    assert res["pids"] == {"limit": 100}


def test_host_network_has_no_network_namespace(tmp_path: Path) -> None:
    namespaces = runtime_config(tmp_path, network_mode="host")["linux"]["namespaces"]
    assert "network" not in [n["type"] for n in namespaces]


def test_joining_an_existing_network_namespace(tmp_path: Path) -> None:
    cfg = ContainerConfig("img", command=["true"])
    common: dict[str, Any] = dict(
        args=["true"],
        env=[],
        cwd="/",
        uid=0,
        gid=0,
        rootfs="/r",
        hostname="box",
        etc_files={},
        cgroups_path="/c",
    )
    config = build_runtime_config(config=cfg, network_namespace_path="/run/netns/n1", **common)
    assert {"type": "network", "path": "/run/netns/n1"} in config["linux"]["namespaces"]
    cfg.network_mode = "host"
    with pytest.raises(InvalidArgument, match="host network mode"):
        build_runtime_config(config=cfg, network_namespace_path="/run/netns/n1", **common)


def test_mounts(tmp_path: Path) -> None:
    config = runtime_config(
        tmp_path,
        read_only_rootfs=True,
        mounts=[
            MountSpec("/srv/sub", "/data/sub/"),
            MountSpec("/srv/data", "/data", read_only=True),
            MountSpec("/srv/shm", "/dev/shm"),
        ],
    )
    assert config["root"]["readonly"] is True
    mounts = {m["destination"]: m for m in config["mounts"]}
    order = [m["destination"] for m in config["mounts"]]
    for dest in ("/proc", "/dev", "/dev/pts", "/dev/mqueue", "/sys", "/sys/fs/cgroup"):
        assert dest in mounts
    assert mounts["/sys"]["options"][-1] == "ro"
    assert mounts["/sys/fs/cgroup"]["options"][-1] == "ro"
    # A user mount replaces the default one at the same place.
    assert mounts["/dev/shm"] == {
        "destination": "/dev/shm",
        "type": "bind",
        "source": "/srv/shm",
        "options": ["rbind", "rprivate"],
    }
    assert order.count("/dev/shm") == 1
    assert mounts["/data"]["options"] == ["rbind", "rprivate", "ro"]
    assert order.index("/data") < order.index("/data/sub")
    for name in ("hosts", "hostname", "resolv.conf"):
        etc = mounts[f"/etc/{name}"]
        assert etc["source"] == str(tmp_path / "etc" / name)
        assert "ro" in etc["options"]  # read-only rootfs: read-only /etc files, as in Docker


def test_default_shm_is_64m(tmp_path: Path) -> None:
    mounts = {m["destination"]: m for m in runtime_config(tmp_path)["mounts"]}
    assert "size=65536k" in mounts["/dev/shm"]["options"]
    assert "ro" not in mounts["/etc/hosts"]["options"]


def test_volume_names_must_be_resolved_before_building(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a host path"):
        runtime_config(tmp_path, mounts=[MountSpec("myvolume", "/data")])


# --- /etc files and init layer ------------------------------------------------------------


def test_etc_files(tmp_path: Path) -> None:
    files = prepare_etc_files(tmp_path / "c", "web-1", "none")
    assert set(files) == {"/etc/hosts", "/etc/hostname", "/etc/resolv.conf"}
    hosts = files["/etc/hosts"].read_text()
    assert hosts.startswith("127.0.0.1\tlocalhost\n::1\tlocalhost")
    assert hosts.endswith("127.0.0.1\tweb-1\n")
    assert files["/etc/hostname"].read_text() == "web-1\n"
    assert "nameserver" not in files["/etc/resolv.conf"].read_text()
    hosts = prepare_etc_files(tmp_path / "d", "web-1", "none", address="10.0.0.5")["/etc/hosts"]
    assert hosts.read_text().endswith("10.0.0.5\tweb-1\n")


def test_host_mode_copies_the_hosts_resolv_conf(tmp_path: Path) -> None:
    host = Path("/etc/resolv.conf")
    expected = host.read_text() if host.exists() else ""
    files = prepare_etc_files(tmp_path, "box", "host")
    assert files["/etc/resolv.conf"].read_text() == expected


def test_init_layer(tmp_path: Path) -> None:
    write_init_layer(tmp_path)
    write_init_layer(tmp_path)  # idempotent
    for d in ("proc", "sys", "dev/pts", "dev/shm"):
        assert (tmp_path / d).is_dir()
    for f in ("etc/hosts", "etc/hostname", "etc/resolv.conf"):
        assert (tmp_path / f).is_file()


def test_secrets_are_mounted_read_only_at_run_secrets_last(tmp_path: Path) -> None:
    cfg = ContainerConfig("img", command=["true"], mounts=[MountSpec("/srv/run", "/run")])
    args, env, cwd = resolve_process({}, cfg)
    config = build_runtime_config(
        config=cfg,
        args=args,
        env=env,
        cwd=cwd,
        uid=0,
        gid=0,
        rootfs=tmp_path / "rootfs",
        hostname="box",
        etc_files={},
        cgroups_path="/berth/node1/abc",
        secrets_dir=tmp_path / "secrets",
    )
    # After the user's /run, so it lands on top; read-only, no devices, set-uid or programs.
    assert config["mounts"][-1] == {
        "destination": "/run/secrets",
        "type": "bind",
        "source": str(tmp_path / "secrets"),
        "options": ["rbind", "rprivate", "ro", "nosuid", "nodev", "noexec"],
    }
    assert "/run/secrets" not in [m["destination"] for m in runtime_config(tmp_path)["mounts"]]


def test_the_init_layer_holds_run_secrets_only_for_a_container_with_secrets(
    tmp_path: Path,
) -> None:
    write_init_layer(tmp_path / "plain")
    write_init_layer(tmp_path / "secret", secrets=True)
    assert not (tmp_path / "plain" / "run").exists()
    assert (tmp_path / "secret" / "run" / "secrets").is_dir()


# --- --userns remap ---------------------------------------------------------------------------


def test_uid_and_gid_mappings_only_in_remap_mode(tmp_path: Path) -> None:
    host = runtime_config(tmp_path, userns="host")
    assert "uidMappings" not in host["linux"] and "gidMappings" not in host["linux"]
    assert "user" not in [n["type"] for n in host["linux"]["namespaces"]]
    remapped = runtime_config(tmp_path, idmap=IdMap(100000, 65536), userns="remap")
    linux = remapped["linux"]
    assert [n["type"] for n in linux["namespaces"]][-2:] == ["network", "user"]
    mapping = [{"containerID": 0, "hostID": 100000, "size": 65536}]
    assert linux["uidMappings"] == linux["gidMappings"] == mapping
    # The container's ids stay the container's: the mapping translates them.
    assert remapped["process"]["user"] == {"uid": 0, "gid": 0, "additionalGids": [10]}
    assert set(remapped["process"]["capabilities"]["effective"]) == DOCKER_CAPS
    assert "seccomp" in linux  # the same filter: unshare and mount stay refused


@pytest.mark.parametrize(
    ("uid", "fields", "message"),
    [
        (70000, {}, "uid 70000 is outside the remapped user namespace, which maps ids 0 to 999"),
        (0, {"network_mode": "host"}, "cannot share the host's network namespace"),
    ],
)
def test_what_a_remapped_container_cannot_have(
    tmp_path: Path, uid: int, fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        runtime_config(tmp_path, uid=uid, idmap=IdMap(100000, 1000), **fields)


def test_additional_gids_must_be_mapped_too(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="gid 10 is outside"):
        runtime_config(tmp_path, idmap=IdMap(100000, 5))


def test_etc_files_belong_to_a_remapped_root(tmp_path: Path) -> None:
    files = prepare_etc_files(tmp_path / "etc", "box", "none", owner=(100000, 100000))
    for path in files.values():
        st = path.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (100000, 100000, 0o644)
