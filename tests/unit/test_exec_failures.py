"""runc's words for a process that could not start -> Docker's exit codes or a status, and the
exec requests refused before runc runs."""

from __future__ import annotations

import pytest

from berthd.common.errors import FailedPrecondition, InvalidArgument
from berthd.node.agent import check_exec
from berthd.node.runtime import ProcessNotStarted, exec_failure

NOT_FOUND = (
    'exec failed: unable to start container process: exec: "nosuch": executable file not '
    "found in $PATH"
)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (NOT_FOUND, 127),
        ('exec failed: unable to start container process: exec: "/a/b": stat /a/b: no such '
         "file or directory", 127),
        ('exec failed: unable to start container process: exec: "/etc/passwd": permission '
         "denied", 126),
        ('runc create failed: unable to start container process: exec: "x": executable file '
         "not found in $PATH", 127),
    ],
)  # fmt: skip
def test_a_command_that_cannot_start_is_an_exit_code(message: str, code: int) -> None:
    failure = exec_failure(message)
    assert isinstance(failure, ProcessNotStarted)
    assert failure.exit_code == code
    assert failure.message.startswith("exec failed: exec: ")
    assert "unable to start" not in failure.message and "\n" not in failure.message


def test_other_runtime_failures_are_a_status_with_runc_s_words() -> None:
    failure = exec_failure(
        'exec failed: unable to start container process: chdir to cwd ("/x") set in '
        "config.json failed: no such file or directory"
    )
    assert isinstance(failure, FailedPrecondition) and failure.reason == "EXEC_FAILED"
    assert str(failure) == (
        'exec failed: chdir to cwd ("/x") set in config.json failed: no such file or directory'
    )


@pytest.mark.parametrize(
    ("command", "env", "cwd", "field"),
    [
        ([], [], "", "command"),
        (["a\0b"], [], "", "command"),
        (["true"], ["A=\0"], "", "env"),
        (["true"], ["NOVALUE"], "", "env"),
        (["true"], ["=x"], "", "env"),
        (["true"], [], "tmp", "working_dir"),
        (["true"], [], "/t\0", "working_dir"),
    ],
)
def test_bad_exec_requests_are_refused_before_runc(
    command: list[str], env: list[str], cwd: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        check_exec(command, env, cwd, "")
    assert err.value.details.field_violations[0][0] == field
    check_exec(["true"], ["A=b"], "/tmp", "")
