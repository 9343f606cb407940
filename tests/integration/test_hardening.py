"""Hardened containers for real: capabilities, seccomp, no user namespaces, cgroup namespace.

Each test runs busybox through a node agent (conmon + runc on overlayfs) and reads what the
container's process sees; the fixtures remove every container and the agent.
"""

from __future__ import annotations

import os

import pytest

from berth.client import ContainerConfig, NodeClient
from berth.errors import BerthClientError

from .test_node_agent import logs

pytestmark = pytest.mark.integration

# Docker's default set (CHOWN DAC_OVERRIDE FOWNER FSETID KILL SETGID SETUID SETPCAP
# NET_BIND_SERVICE NET_RAW SYS_CHROOT MKNOD AUDIT_WRITE SETFCAP), as /proc/self/status shows it.
DOCKER_CAPS = "00000000a80425fb"
SYS_ADMIN = 1 << 21

# Every line: NAME VALUE, so one container answers every question.
PROBE = """
grep -E '^(CapEff|CapBnd|Seccomp|NoNewPrivs):' /proc/self/status | tr -d '\\t' | tr ':' ' '
unshare -U true 2>/tmp/e && echo unshare_U ok || echo unshare_U "$(cat /tmp/e)"
unshare -Ur sh -c 'echo in-userns' 2>/tmp/e || echo unshare_Ur "$(cat /tmp/e)"
mkdir -p /mnt/t
mount -t tmpfs none /mnt/t 2>/tmp/e && echo mount ok || echo mount "$(cat /tmp/e)"
echo 1 2>/tmp/e >/proc/sys/kernel/ns_last_pid && echo procsys rw || echo procsys "$(cat /tmp/e)"
echo cgroupns "$(readlink /proc/self/ns/cgroup)"
echo cgroup_paths "$(cut -d: -f3 /proc/self/cgroup | sort -u | tr '\\n' ,)"
"""


def probe(node: NodeClient, busybox: str, **options) -> dict[str, str]:
    node.pull(busybox)
    box = node.run(ContainerConfig(busybox, command=["sh", "-c", PROBE], **options)).id
    assert node.wait(box) == 0, logs(node, box)
    out = logs(node, box)
    seen = {}
    for line in out.splitlines():
        key, _, value = line.partition(" ")
        seen[key] = value
    return seen


def test_a_default_container_is_hardened_like_docker(node, busybox) -> None:
    seen = probe(node, busybox)
    assert seen["CapEff"] == DOCKER_CAPS
    assert seen["CapBnd"] == DOCKER_CAPS
    assert seen["Seccomp"] == "2"
    assert seen["NoNewPrivs"] == "1"
    # No new user namespace (which would give the container's root every capability in it).
    assert "Operation not permitted" in seen["unshare_U"], seen
    assert "Operation not permitted" in seen["unshare_Ur"], seen
    assert "in-userns" not in seen
    # busybox's words for EPERM (or EACCES) from mount(2).
    assert "permission denied (are you root?)" in seen["mount"], seen
    assert "Read-only file system" in seen["procsys"], seen
    # A cgroup namespace of its own, whose root is the container's cgroup.
    assert seen["cgroupns"] != os.readlink("/proc/self/ns/cgroup")
    assert seen["cgroup_paths"] == "/,", seen


def test_cap_add_and_cap_drop(node, busybox) -> None:
    added = probe(node, busybox, cap_add=["SYS_ADMIN"])
    assert int(added["CapEff"], 16) == int(DOCKER_CAPS, 16) | SYS_ADMIN
    assert added["Seccomp"] == "2"
    # With CAP_SYS_ADMIN the profile lets mount through, as Docker's does.
    assert added["mount"] == "ok"
    dropped = probe(node, busybox, cap_drop=["ALL"])
    assert dropped["CapEff"] == dropped["CapBnd"] == "0000000000000000"
    some = probe(node, busybox, cap_drop=["cap_net_raw", "CHOWN"], cap_add=["NET_ADMIN"])
    assert int(some["CapEff"], 16) == (int(DOCKER_CAPS, 16) & ~(1 << 13) & ~1) | (1 << 12)


def test_security_opt_unconfined_and_no_new_privileges(node, busybox) -> None:
    seen = probe(node, busybox, security_opt=["seccomp=unconfined", "no-new-privileges=false"])
    assert seen["Seccomp"] == "0"
    assert seen["NoNewPrivs"] == "0"
    assert seen["CapEff"] == DOCKER_CAPS


def test_a_custom_seccomp_profile_is_the_whole_filter(node, busybox) -> None:
    # Docker's format: everything allowed but mkdir, which fails with EPERM.
    profile = (
        '{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir", "mkdirat"],'
        ' "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}'
    )
    node.pull(busybox)
    box = node.run(
        ContainerConfig(
            busybox,
            command=["sh", "-c", "grep Seccomp: /proc/self/status; mkdir /d || echo refused"],
            security_opt=[f"seccomp={profile}"],
        )
    ).id
    node.wait(box)
    out = logs(node, box)
    assert "Seccomp:\t2" in out and "refused" in out, out


def test_bad_options_are_refused_by_the_node(node, busybox) -> None:
    node.pull(busybox)
    for options, words in (
        ({"cap_add": ["NOT_A_CAP"]}, "unknown capability"),
        ({"security_opt": ["apparmor=unconfined"]}, "unsupported security option"),
        ({"userns": "private"}, "user namespace mode"),
    ):
        with pytest.raises(BerthClientError) as refused:
            node.run(ContainerConfig(busybox, command=["true"], **options))
        assert refused.value.code == "INVALID_ARGUMENT"
        assert words in str(refused.value)


def test_exec_gets_the_same_confinement_and_the_cgroup_is_the_containers(node, busybox) -> None:
    node.pull(busybox)
    box = node.run(ContainerConfig(busybox, command=["sleep", "1000"], memory_bytes=64 << 20)).id
    try:
        result = node.exec(
            box,
            [
                "sh",
                "-c",
                "grep -E '^(CapEff|Seccomp|NoNewPrivs):' /proc/self/status; "
                "unshare -U true || echo refused; "
                "cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
            ],
        )
        out = result.stdout.decode()
        assert f"CapEff:\t{DOCKER_CAPS}" in out
        assert "Seccomp:\t2" in out and "NoNewPrivs:\t1" in out
        assert "refused" in out
        # /sys/fs/cgroup is the container's own cgroup: its limit, at the root.
        assert out.split()[-1] == str(64 << 20), out
    finally:
        node.remove(box, force=True)
