"""berthd.node.seccomp: Docker's profile format to OCI linux.seccomp, and the node's default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from berth.containers import DEFAULT_CAPABILITIES
from berthd.common.errors import FailedPrecondition, InvalidArgument
from berthd.node import seccomp
from berthd.node.spec import ContainerConfig, build_runtime_config, prepare_etc_files

AMD64 = ("amd64", "SCMP_ARCH_X86_64")
ARM64 = ("arm64", "SCMP_ARCH_AARCH64")

PROFILE: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "defaultErrnoRet": 38,
    "archMap": [
        {
            "architecture": "SCMP_ARCH_X86_64",
            "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        },
        {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
    ],
    "syscalls": [
        {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW", "args": [], "comment": ""},
        {"names": ["arch_prctl"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["amd64"]}},
        {"names": ["breakpoint"], "action": "SCMP_ACT_ALLOW", "includes": {"arches": ["arm64"]}},
        {"names": ["bpf"], "action": "SCMP_ACT_ALLOW", "includes": {"caps": ["CAP_SYS_ADMIN"]}},
        {
            "names": ["bpf"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 1,
            "excludes": {"caps": ["CAP_SYS_ADMIN"]},
        },
        {
            "names": ["ptrace"],
            "action": "SCMP_ACT_ALLOW",
            "includes": {"caps": ["CAP_SYS_PTRACE", "CAP_SYS_ADMIN"]},
        },
        {"names": ["newcall"], "action": "SCMP_ACT_ALLOW", "includes": {"minKernel": "6.5"}},
        {"names": ["oldcall"], "action": "SCMP_ACT_ALLOW", "excludes": {"minKernel": "4.8"}},
        {"names": ["noarm"], "action": "SCMP_ACT_ALLOW", "excludes": {"arches": ["arm64"]}},
        {
            "names": ["personality"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}],
        },
    ],
}


def names(converted: dict[str, Any], action: str | None = None) -> set[str]:
    return {
        n
        for call in converted["syscalls"]
        if action is None or call["action"] == action
        for n in call["names"]
    }


def test_rules_resolve_against_the_arch() -> None:
    amd = seccomp.convert(PROFILE, DEFAULT_CAPABILITIES, arch=AMD64, kernel=(6, 1))
    assert amd["defaultAction"] == "SCMP_ACT_ERRNO" and amd["defaultErrnoRet"] == 38
    assert amd["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert "arch_prctl" in names(amd) and "breakpoint" not in names(amd)
    assert "noarm" in names(amd)
    arm = seccomp.convert(PROFILE, DEFAULT_CAPABILITIES, arch=ARM64, kernel=(6, 1))
    assert arm["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    assert "breakpoint" in names(arm) and "arch_prctl" not in names(arm)
    assert "noarm" not in names(arm)


def test_rules_resolve_against_the_capabilities() -> None:
    default = seccomp.convert(PROFILE, DEFAULT_CAPABILITIES, arch=AMD64, kernel=(6, 1))
    assert "bpf" in names(default, "SCMP_ACT_ERRNO") and "bpf" not in names(
        default, "SCMP_ACT_ALLOW"
    )
    assert "ptrace" not in names(default)
    admin = seccomp.convert(
        PROFILE, [*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN"], arch=AMD64, kernel=(6, 1)
    )
    assert "bpf" in names(admin, "SCMP_ACT_ALLOW") and "bpf" not in names(admin, "SCMP_ACT_ERRNO")
    assert "ptrace" not in names(admin)  # includes.caps needs all of them
    both = seccomp.convert(PROFILE, ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"], arch=AMD64, kernel=(6, 1))
    assert "ptrace" in names(both)


def test_rules_resolve_against_the_kernel_and_keep_args() -> None:
    old = seccomp.convert(PROFILE, [], arch=AMD64, kernel=(4, 4))
    new = seccomp.convert(PROFILE, [], arch=AMD64, kernel=(6, 1))
    assert "oldcall" in names(old) and "oldcall" not in names(new)
    assert "newcall" not in names(new)
    assert "newcall" in names(seccomp.convert(PROFILE, [], arch=AMD64, kernel=(6, 12)))
    [personality] = [c for c in new["syscalls"] if c["names"] == ["personality"]]
    assert personality["args"] == [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]
    read = next(c for c in new["syscalls"] if "read" in c["names"])
    assert read == {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"}  # no comment, args


@pytest.mark.parametrize(
    ("profile", "message"),
    [
        ({"syscalls": []}, "defaultAction"),
        ({"defaultAction": "ALLOW"}, "defaultAction"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["X"], "archMap": [{}]}, "not both"),
        ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {}}, "syscalls must be a list"),
        (
            {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["x"], "action": "NO"}]},
            "invalid action",
        ),
    ],
)
def test_bad_profiles_are_refused(profile: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        seccomp.convert(profile, [], arch=AMD64, kernel=(6, 1))


def test_the_namespace_rules_apply_without_sys_admin() -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "syscalls": [
            {"names": ["read", "unshare", "clone", "clone3", "mount"], "action": "SCMP_ACT_ALLOW"}
        ],
    }
    plain = seccomp.with_namespace_rules(
        seccomp.convert(profile, DEFAULT_CAPABILITIES, arch=AMD64), DEFAULT_CAPABILITIES, "amd64"
    )
    assert plain["syscalls"][0] == {"names": ["read"], "action": "SCMP_ACT_ALLOW"}
    assert {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38} in plain["syscalls"]
    denied = next(c for c in plain["syscalls"] if "unshare" in c["names"])
    assert denied["action"] == "SCMP_ACT_ERRNO" and denied["errnoRet"] == 1
    assert "mount" in denied["names"] and "setns" in denied["names"]
    clones = [c for c in plain["syscalls"] if c["names"] == ["clone"]]
    assert clones[0]["action"] == "SCMP_ACT_ALLOW"
    assert clones[0]["args"][0]["value"] == seccomp.CLONE_NAMESPACE_FLAGS
    flags = [c["args"][0]["value"] for c in clones[1:]]
    assert sum(flags) == seccomp.CLONE_NAMESPACE_FLAGS and len(flags) == 7
    admin_caps = [*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN"]
    admin = seccomp.convert(profile, admin_caps, arch=AMD64)
    assert seccomp.with_namespace_rules(admin, admin_caps, "amd64") == admin


def test_the_default_profile_of_the_node(tmp_path: Path) -> None:
    if not seccomp.DEFAULT_PROFILE_PATH.exists():
        pytest.fail(f"{seccomp.DEFAULT_PROFILE_PATH} is missing: run `make apt`")
    converted = seccomp.default_seccomp(DEFAULT_CAPABILITIES)
    assert converted["defaultAction"] == "SCMP_ACT_ERRNO"
    assert "SCMP_ARCH_X86_64" in converted.get("architectures", ["SCMP_ARCH_X86_64"])
    allowed = names(converted, "SCMP_ACT_ALLOW")
    assert {"read", "execve", "chroot"} <= allowed  # chroot: CAP_SYS_CHROOT is a default
    assert not {"unshare", "setns", "mount", "bpf", "clone3"} & allowed
    assert converted == seccomp.default_seccomp(list(reversed(DEFAULT_CAPABILITIES)))  # cached
    converted["syscalls"].clear()  # a caller's copy: the cache is not touched
    assert seccomp.default_seccomp(DEFAULT_CAPABILITIES)["syscalls"]
    admin = seccomp.default_seccomp([*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN"])
    assert {"unshare", "mount", "bpf"} <= names(admin, "SCMP_ACT_ALLOW")


def runtime_config(tmp_path: Path, **fields: Any) -> dict[str, Any]:
    cfg = ContainerConfig("img", command=["true"], **fields)
    cfg.validate()
    return build_runtime_config(
        config=cfg,
        args=["true"],
        env=[],
        cwd="/",
        uid=0,
        gid=0,
        rootfs=tmp_path / "rootfs",
        hostname="box",
        etc_files=prepare_etc_files(tmp_path / "etc", "box", cfg.network_mode),
        cgroups_path="/berth/x",
    )


def test_runtime_config_security(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = runtime_config(tmp_path)
    assert config["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ERRNO"
    assert {"type": "cgroup"} in config["linux"]["namespaces"]
    assert config["process"]["noNewPrivileges"] is True

    config = runtime_config(
        tmp_path, security_opt=["seccomp=unconfined", "no-new-privileges=false"]
    )
    assert "seccomp" not in config["linux"]
    assert config["process"]["noNewPrivileges"] is False

    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}
    config = runtime_config(tmp_path, security_opt=[f"seccomp={json.dumps(profile)}"])
    assert config["linux"]["seccomp"]["defaultAction"] == "SCMP_ACT_ALLOW"
    assert config["linux"]["seccomp"]["syscalls"] == []  # no additions to a user's profile

    config = runtime_config(tmp_path, cap_drop=["ALL"], cap_add=["NET_BIND_SERVICE"])
    assert config["process"]["capabilities"]["bounding"] == ["CAP_NET_BIND_SERVICE"]
    assert config["process"]["capabilities"]["effective"] == ["CAP_NET_BIND_SERVICE"]

    # A node without the default profile refuses to run a container unconfined by accident.
    monkeypatch.setattr(seccomp, "DEFAULT_PROFILE_PATH", tmp_path / "missing.json")
    with pytest.raises(FailedPrecondition, match=r"default seccomp profile .* is missing"):
        runtime_config(tmp_path)
    assert "seccomp" not in runtime_config(tmp_path, security_opt=["seccomp=unconfined"])["linux"]
