"""berthd.common.changes: `--change` instructions applied to an image config, as Docker does."""

from __future__ import annotations

import pytest

from berthd.common.changes import (
    INSTRUCTIONS,
    ChangeState,
    apply_changes,
    apply_instruction,
    parse_instruction,
)
from berthd.common.errors import InvalidArgument
from berthd.common.substitute import expand

BASE = {"Env": ["PATH=/bin", "HOME=/root"], "Cmd": ["sh"], "WorkingDir": "/srv"}


def test_cmd_json_and_shell_forms() -> None:
    assert apply_changes(BASE, ['CMD ["ls", "-l"]'])["Cmd"] == ["ls", "-l"]
    assert apply_changes(BASE, ["CMD echo $HOME > /x"])["Cmd"] == [
        "/bin/sh",
        "-c",
        "echo $HOME > /x",
    ]
    assert apply_changes(BASE, ["CMD []"])["Cmd"] == []
    assert apply_changes(BASE, ["cmd ls"])["Cmd"] == ["/bin/sh", "-c", "ls"]


def test_entrypoint_forms_and_its_effect_on_cmd() -> None:
    changed = apply_changes(BASE, ['ENTRYPOINT ["/bin/app"]'])
    assert changed["Entrypoint"] == ["/bin/app"]
    assert "Cmd" not in changed  # a new entrypoint drops the parent's CMD, as in a Dockerfile
    changed = apply_changes(BASE, ["ENTRYPOINT app serve", 'CMD ["-v"]'])
    assert changed["Entrypoint"] == ["/bin/sh", "-c", "app serve"]
    assert changed["Cmd"] == ["-v"]
    cleared = apply_changes({**BASE, "Entrypoint": ["x"]}, ["ENTRYPOINT []"])
    assert "Entrypoint" not in cleared


def test_cmd_set_before_entrypoint_is_kept() -> None:
    changed = apply_changes(BASE, ['CMD ["--help"]', 'ENTRYPOINT ["/bin/app"]'])
    assert changed == {**BASE, "Cmd": ["--help"], "Entrypoint": ["/bin/app"]}


def test_env_both_forms_quotes_and_expansion() -> None:
    changed = apply_changes(
        BASE,
        [
            "ENV A=1 B=\"two words\" C='$HOME' D=$HOME/x E=${MISSING:-dflt} F=a\\ b",
            "ENV LEGACY value with spaces",
            "ENV PATH=/usr/bin:$PATH",
        ],
    )
    assert changed["Env"] == [
        "PATH=/usr/bin:/bin",  # replaced where it stood
        "HOME=/root",
        "A=1",
        "B=two words",
        "C=$HOME",
        "D=/root/x",
        "E=dflt",
        "F=a b",
        "LEGACY=value with spaces",
    ]
    # Variables set earlier in the same batch are visible to later instructions.
    assert apply_changes({}, ["ENV X=1", "ENV Y=${X}2"])["Env"] == ["X=1", "Y=12"]


def test_expose_ports_protocols_and_ranges() -> None:
    changed = apply_changes({"ExposedPorts": {"22/tcp": {}}}, ["EXPOSE 80 53/udp 8000-8002/TCP"])
    assert changed["ExposedPorts"] == {
        "22/tcp": {},
        "80/tcp": {},
        "53/udp": {},
        "8000/tcp": {},
        "8001/tcp": {},
        "8002/tcp": {},
    }


def test_label_new_and_legacy_forms() -> None:
    changed = apply_changes(
        {"Env": ["V=1.0"]}, ['LABEL a=b "c d"="e f" version=$V', "LABEL legacy the value"]
    )
    assert changed["Labels"] == {"a": "b", "c d": "e f", "version": "1.0", "legacy": "the value"}


def test_user_workdir_volume() -> None:
    changed = apply_changes(
        BASE,
        ["USER 1000:1000", "WORKDIR app", "WORKDIR ../data", 'VOLUME ["/a", "/b c"]', "VOLUME /d"],
    )
    assert changed["User"] == "1000:1000"
    assert changed["WorkingDir"] == "/srv/data"
    assert changed["Volumes"] == {"/a": {}, "/b c": {}, "/d": {}}
    assert apply_changes({}, ["WORKDIR /opt/$X/y"])["WorkingDir"] == "/opt/y"


def test_input_is_not_modified() -> None:
    base = {"Env": ["A=1"], "Labels": {"x": "y"}}
    apply_changes(base, ["ENV A=2", "LABEL x=z"])
    assert base == {"Env": ["A=1"], "Labels": {"x": "y"}}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("FROM busybox", 'invalid --change "FROM busybox": FROM is not supported; use CMD,'),
        ("RUN echo", 'invalid --change "RUN echo": RUN is not supported'),
        ("", 'invalid --change "": file with no instructions'),
        ("CMD a\nCMD b", "expected one instruction, got 2"),
        ("ENV A", "ENV must have two arguments"),
        ("EXPOSE 99999", "EXPOSE 99999: invalid port"),
        ("EXPOSE 80/icmp", 'EXPOSE 80/icmp: unknown protocol "icmp"'),
        ("EXPOSE 90-80", "EXPOSE 90-80: the range ends before it starts"),
        ("EXPOSE", "EXPOSE requires at least one port"),
        ("VOLUME", "VOLUME requires at least one path"),
        ("USER", "USER requires exactly one argument"),
        ("WORKDIR", "WORKDIR requires exactly one argument"),
        ("CMD", "CMD requires a command"),
        ("CMD --flag=1 x", "CMD takes no flags (--flag=1)"),
        ("ENV A=${B", "missing }"),
        ('ENV A="open', "no closing double quote"),
        ("ENV A=${B:?required}", "B: required"),
    ],
)
def test_errors_are_one_line_naming_the_change(change: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        apply_changes(BASE, [change])
    text = str(raised.value)
    assert message in text
    assert text.startswith("invalid --change ")
    assert "\n" not in text


def test_bad_change_fails_before_any_is_applied() -> None:
    with pytest.raises(InvalidArgument, match="FROM is not supported"):
        apply_changes(BASE, ["ENV A=1", "FROM x"])


def test_table_is_public_for_the_builder() -> None:
    assert set(INSTRUCTIONS) == {
        "CMD",
        "ENTRYPOINT",
        "ENV",
        "EXPOSE",
        "LABEL",
        "USER",
        "WORKDIR",
        "VOLUME",
    }
    config: dict = {}
    state = ChangeState()
    apply_instruction(config, parse_instruction("CMD x"), state)
    assert state.cmd_set
    apply_instruction(config, parse_instruction("ENTRYPOINT y"), state)
    assert config == {"Cmd": ["/bin/sh", "-c", "x"], "Entrypoint": ["/bin/sh", "-c", "y"]}
    with pytest.raises(InvalidArgument, match=r"^ENV names must not be empty$"):
        apply_instruction(config, parse_instruction("ENV =x"), state)


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("plain", "plain"),
        ("$A-$B", "1-"),
        ("${A}x", "1x"),
        ("$", "$"),
        ("a$", "a$"),
        ("${A:+set}${B:+set}", "set"),
        ("${B-unset}${E-unset}${E:-empty}", "unset" + "" + "empty"),
        ("'$A'\"$A\"\\$A", "$A1$A"),
        ('"a\\"b\\c"', 'a"b\\c'),
    ],
)
def test_word_expansion(word: str, expected: str) -> None:
    assert expand(word, {"A": "1", "E": ""}) == expected
