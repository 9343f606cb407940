"""The node agent raises its soft RLIMIT_NOFILE to the hard limit at start: it holds a pidfd
per running container."""

from __future__ import annotations

import resource
import subprocess
import sys


def test_the_agent_raises_its_soft_open_files_limit_to_the_hard_one() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    script = (
        "import resource\n"
        "from berthd.node.main import raise_nofile_limit\n"
        "before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
        "print(before, raise_nofile_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[1])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        preexec_fn=low_soft_limit,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    before, after, kept_hard = map(int, out)
    assert before == 256 and kept_hard == hard
    assert after == (hard if hard != resource.RLIM_INFINITY else 1_048_576)
