"""`make lint` holds the protos to their last release: `buf breaking` runs against the commit
in protos/RELEASE, and its rule set refuses a change that would break a generated client."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _git(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def _buf() -> list[str]:
    """The buf command `make lint` runs (the Makefile's BUF), so the test pins the same one."""
    match = re.search(r"^BUF := (.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "the Makefile names no BUF"
    return match.group(1).split()


def test_lint_runs_buf_breaking_against_the_release_in_git() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "BREAKING_AGAINST ?= $(shell cat protos/RELEASE)" in makefile
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "$(BUF) breaking protos --against '.git#ref=$(BREAKING_AGAINST),subdir=protos'" in lint
    release = (ROOT / "protos" / "RELEASE").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{40}", release), release
    assert _git("cat-file", "-e", f"{release}^{{commit}}").returncode == 0, (
        f"protos/RELEASE names {release}, which this clone does not have"
    )


def test_buf_breaking_refuses_a_renamed_field(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "protos", repo / "protos")
    for args in (
        ("init", "-q"),
        ("add", "-A"),
        ("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "release"),
    ):
        assert _git(*args, cwd=repo).returncode == 0
    breaking = [*_buf(), "breaking", "protos", "--against", ".git#ref=HEAD,subdir=protos"]

    same = subprocess.run(breaking, cwd=repo, capture_output=True, text=True, timeout=300)
    assert same.returncode == 0, same.stdout + same.stderr

    registry = repo / "protos" / "berth" / "registry" / "v1" / "registry.proto"
    text = registry.read_text()
    assert "string upload_id = 1;" in text
    registry.write_text(text.replace("string upload_id = 1;", "string session_id = 1;", 1))
    broken = subprocess.run(breaking, cwd=repo, capture_output=True, text=True, timeout=300)
    assert broken.returncode != 0
    assert "upload_id" in broken.stdout + broken.stderr
