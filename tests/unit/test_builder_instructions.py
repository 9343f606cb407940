"""berthd.builder.instructions: config effects, history lines and RUN's argv of Dockerfile steps."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from berthd.builder.dockerfile import DockerfileError, Step, parse_dockerfile
from berthd.builder.instructions import (
    apply_instruction,
    author,
    history_text,
    shell_command,
)

BASE = {"Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/"}


def build(
    text: str,
    config: Mapping[str, Any] = BASE,
    build_args: Mapping[str, str] | None = None,
) -> list[tuple[Step, dict[str, Any], dict[str, Any]]]:
    """Every step of the last stage with the config before and after it."""
    build_args = build_args or {}
    df = parse_dockerfile(text, build_args)
    scope = df.scope(config.get("Env") or [], build_args)
    result = []
    before = dict(config)
    for instruction in df.stages[-1].instructions:
        step = scope.step(instruction)
        after = apply_instruction(before, step)
        result.append((step, before, after))
        before = after
    return result


def final(text: str, **kwargs: Any) -> dict[str, Any]:
    return build(text, **kwargs)[-1][2]


def history(text: str, **kwargs: Any) -> list[str]:
    return [history_text(step, before) for step, before, _ in build(text, **kwargs)]


def test_healthcheck_durations_in_nanoseconds():
    config = final(
        "FROM busybox\n"
        "HEALTHCHECK --interval=1m30s --timeout=500ms --start-period=2s --retries=3 \\\n"
        "  CMD wget -q -O- http://localhost/ || exit 1\n"
    )
    assert config["Healthcheck"] == {
        "Test": ["CMD-SHELL", "wget -q -O- http://localhost/ || exit 1"],
        "Interval": 90_000_000_000,
        "Timeout": 500_000_000,
        "StartPeriod": 2_000_000_000,
        "Retries": 3,
    }


def test_healthcheck_exec_form_none_and_zero_values():
    config = final('FROM busybox\nHEALTHCHECK --interval=0 --retries=0 CMD ["/check", "-v"]\n')
    assert config["Healthcheck"] == {"Test": ["CMD", "/check", "-v"]}
    config = final("FROM busybox\nHEALTHCHECK CMD true\nHEALTHCHECK NONE\n")
    assert config["Healthcheck"] == {"Test": ["NONE"]}


def test_workdir_resolves_against_the_previous_one():
    steps = build(
        "FROM busybox\nWORKDIR app\nWORKDIR src/../lib\nENV D=/opt\nWORKDIR $D/x\nWORKDIR y\n",
        config={**BASE, "WorkingDir": "/srv"},
    )
    assert [after.get("WorkingDir") for _, _, after in steps] == [
        "/srv/app",
        "/srv/app/lib",
        "/srv/app/lib",
        "/opt/x",
        "/opt/x/y",
    ]
    assert history("FROM busybox\nWORKDIR app\n", config={**BASE, "WorkingDir": "/srv"}) == [
        "WORKDIR /srv/app"
    ]


def test_shell_changes_run_argv_and_shell_form_cmd():
    (run1, before1, _), (_, _, _), (run2, before2, _), (_, _, after) = build(
        'FROM busybox\nRUN echo "$A"\nSHELL ["/bin/bash", "-eux", "-c"]\nRUN echo hi\nCMD serve\n'
    )
    assert shell_command(run1, before1) == ["/bin/sh", "-c", 'echo "$A"']
    assert shell_command(run2, before2) == ["/bin/bash", "-eux", "-c", "echo hi"]
    assert after["Cmd"] == ["/bin/bash", "-eux", "-c", "serve"]
    assert after["Shell"] == ["/bin/bash", "-eux", "-c"]


def test_exec_form_run_is_taken_as_is():
    (run, before, after) = build('FROM busybox\nSHELL ["/bin/bash", "-c"]\nRUN ["ls", "$HOME"]\n')[
        1
    ]
    assert shell_command(run, before) == ["ls", "$HOME"]
    assert after == before  # RUN changes the filesystem, not the config


def test_cmd_and_entrypoint():
    config = final('FROM busybox\nENTRYPOINT ["/app"]\n')
    assert config["Entrypoint"] == ["/app"]
    assert "Cmd" not in config  # a new ENTRYPOINT drops the inherited CMD...
    config = final('FROM busybox\nCMD ["--help"]\nENTRYPOINT ["/app"]\n')
    assert config["Cmd"] == ["--help"]  # ...but not one set earlier in the stage
    config = final("FROM busybox\nENTRYPOINT /app --flag\nCMD []\n")
    assert config["Entrypoint"] == ["/bin/sh", "-c", "/app --flag"]
    assert config["Cmd"] == []


def test_env_values_are_kept_verbatim():
    config = final(
        "FROM busybox\nARG V=1.2\n"
        'ENV A=\'$literal\' B="say \\"hi\\"" C=back\\\\slash D=v$V E="it\'s"\n'
    )
    assert config["Env"] == [
        "PATH=/bin",
        "A=$literal",
        'B=say "hi"',
        "C=back\\slash",
        "D=v1.2",
        "E=it's",
    ]  # and the ARG V itself is not in the config


def test_env_replaces_in_place():
    config = final("FROM busybox\nENV PATH=/usr/bin:$PATH X=1\n")
    assert config["Env"] == ["PATH=/usr/bin:/bin", "X=1"]


def test_label_user_expose_volume():
    config = final(
        "FROM busybox\nARG U=app\nENV PORTS='80 443/udp'\n"
        'LABEL "org.x.name"="a \\$b" c=\'d"e\'\n'
        "USER $U:$U\n"
        "EXPOSE $PORTS 8000-8001\n"
        'VOLUME /data $U\nVOLUME ["/a dir"]\n'
    )
    assert config["Labels"] == {"org.x.name": "a $b", "c": 'd"e'}
    assert config["User"] == "app:app"
    assert set(config["ExposedPorts"]) == {"80/tcp", "443/udp", "8000/tcp", "8001/tcp"}
    assert set(config["Volumes"]) == {"/data", "app", "/a dir"}


def test_stopsignal_onbuild_maintainer_arg():
    steps = build(
        "FROM busybox\nSTOPSIGNAL SIGQUIT\nONBUILD COPY . /src\nONBUILD RUN make\n"
        "MAINTAINER Jane <j@x>\nARG A=1\n"
    )
    config = steps[-1][2]
    assert config["StopSignal"] == "SIGQUIT"
    assert config["OnBuild"] == ["COPY . /src", "RUN make"]
    maintainer, before, after = steps[3]
    assert author(maintainer) == "Jane <j@x>"
    assert author(steps[0][0]) is None
    assert after == before  # MAINTAINER and ARG leave the config section alone
    assert steps[4][2] == steps[4][1]


def test_apply_instruction_returns_a_new_config():
    config = {"Env": ["PATH=/bin"], "Labels": {"a": "b"}}
    step = build("FROM busybox\nLABEL c=d\n", config=config)[0][0]
    changed = apply_instruction(config, step)
    assert changed["Labels"] == {"a": "b", "c": "d"}
    assert config == {"Env": ["PATH=/bin"], "Labels": {"a": "b"}}


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("FROM busybox\nARG U\nUSER $U\n", 3, "USER requires a user"),
        ("FROM busybox\nEXPOSE 80/xyz\n", 2, "unknown protocol"),
        ("FROM busybox\n\nSTOPSIGNAL kill-it\n", 3, "expected a signal name or number"),
        ("FROM busybox\nENV P=''\nVOLUME $P\n", 3, "VOLUME paths must not be empty"),
    ],
)
def test_errors_name_the_line(text, line, message):
    with pytest.raises(DockerfileError) as info:
        build(text)
    assert info.value.line == line
    assert message in str(info.value)
    assert str(info.value).startswith(f"Dockerfile:{line}: ")


def test_history_lines_like_buildkit():
    lines = history(
        "FROM busybox\nARG V=1\nENV A=1 B='x y'\nRUN echo $A\nCOPY --chown=1:1 a b /dst/\n"
        'CMD echo hi\nENTRYPOINT ["/app", "x"]\nEXPOSE 80\nUSER app\nLABEL k=v\n'
        "ONBUILD RUN make\nHEALTHCHECK --interval=5s CMD true\n"
    )
    assert lines == [
        "ARG V=1",
        "ENV A=1 B=x y",
        "RUN |1 V=1 /bin/sh -c echo $A # buildkit",
        "COPY a b /dst/ # buildkit",
        'CMD ["/bin/sh" "-c" "echo hi"]',
        'ENTRYPOINT ["/app" "x"]',
        "EXPOSE 80",
        "USER app",
        "LABEL k=v",
        "ONBUILD RUN make",
        "HEALTHCHECK --interval=5s CMD true",
    ]


def test_history_of_run_without_args_and_in_exec_form():
    assert history('FROM busybox\nRUN echo hi\nRUN ["ls", "-l"]\n') == [
        "RUN /bin/sh -c echo hi # buildkit",
        "RUN ls -l # buildkit",
    ]
