"""Interop with the OCI tools people already use: umoci builds, berth stores, skopeo and umoci read.

Also the CLI's contract: progress on push, exit codes, one error line for a user mistake.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.oci_images import make_busybox_image

BERTH = [sys.executable, "-m", "berth"]


def berth(registry, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*BERTH, "--registry", registry.address, *args], capture_output=True, text=True
    )
    if check and result.returncode != 0:
        raise AssertionError(f"berth {' '.join(args)} failed:\n{result.stderr}")
    return result


def skopeo_inspect(ref: str, raw: bool = False) -> str:
    argv = ["skopeo", "inspect", *(["--raw"] if raw else []), ref]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def busybox_layout(tmp_path_factory) -> Path:
    layout = tmp_path_factory.mktemp("oci") / "busybox"
    make_busybox_image(layout, "latest")
    return layout


def test_umoci_image_survives_berth_unchanged(registry, busybox_layout, tmp_path: Path) -> None:
    pushed = berth(registry, "oci", "push", f"{busybox_layout}:latest", "demo/busybox:1.35")
    assert "digest: sha256:" in pushed.stdout
    out = tmp_path / "pulled"
    berth(registry, "oci", "pull", "demo/busybox:1.35", f"{out}:1.35")

    # Byte-identical manifest, so the same digests for skopeo.
    assert skopeo_inspect(f"oci:{out}:1.35", raw=True) == skopeo_inspect(
        f"oci:{busybox_layout}:latest", raw=True
    )
    original = json.loads(skopeo_inspect(f"oci:{busybox_layout}:latest"))
    pulled = json.loads(skopeo_inspect(f"oci:{out}:1.35"))
    assert pulled["Digest"] == original["Digest"]
    assert pulled["Layers"] == original["Layers"]
    assert pulled["Env"] == original["Env"]

    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{out}:1.35", str(bundle)],
        check=True,
        capture_output=True,
    )
    busybox = bundle / "rootfs" / "bin" / "busybox"
    assert busybox.read_bytes() == Path("/bin/busybox").read_bytes()
    assert (bundle / "rootfs" / "bin" / "sh").is_symlink()
    echo = subprocess.run([str(busybox), "echo", "hello"], capture_output=True, text=True)
    assert echo.stdout == "hello\n"


def test_second_push_sends_no_layer_bytes(registry, busybox_layout) -> None:
    berth(registry, "oci", "push", f"{busybox_layout}:latest", "demo/first:1")
    again = berth(registry, "oci", "push", f"{busybox_layout}:latest", "demo/first:2")
    assert "Layer already exists" in again.stdout
    other = berth(registry, "oci", "push", f"{busybox_layout}:latest", "other/copy:1")
    assert "Mounted from" in other.stdout
    tags = json.loads(berth(registry, "registry", "tags", "demo/first", "--format", "json").stdout)
    assert sorted(t["name"] for t in tags) == ["1", "2"]


def test_user_mistakes_get_one_error_line_and_exit_1(registry, tmp_path: Path) -> None:
    for args in (
        ["registry", "tags", "no/such-repo"],
        ["oci", "push", str(tmp_path / "missing"), "demo/x:1"],
        ["oci", "pull", "Bad/Name:1", str(tmp_path / "out")],
    ):
        result = berth(registry, *args, check=False)
        assert result.returncode == 1, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
        assert "Traceback" not in result.stderr
