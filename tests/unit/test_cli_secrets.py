"""`berth secret ...` and `--secret` on `run` and `service create`, without a cluster."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pytest

from berth.cli import secret_cmds
from berth.cli.container_cmds import container_config, parse_secret, run_config
from berth.cli.main import build_parser, main
from berth.containers import SecretReference
from berth.errors import BerthClientError


def test_parse_secret_reads_dockers_short_and_long_forms() -> None:
    assert parse_secret("db-pass") == SecretReference("db-pass")
    assert parse_secret("source=db-pass,target=pw,mode=0400") == SecretReference(
        "db-pass", "pw", 0o400
    )
    assert parse_secret("src=tls,uid=70,gid=71,mode=600") == SecretReference(
        "tls", "", 0o600, 70, 71
    )


@pytest.mark.parametrize(
    ("text", "mentions"),
    [
        ("target=pw", "source=NAME is required"),
        ("source=db,colour=red", "expected NAME or source=NAME"),
        ("source=db,mode=0999", "mode must be an octal mode"),
        ("source=db,uid=root", "uid must be a number"),
    ],
)
def test_parse_secret_rejects(text: str, mentions: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=mentions):
        parse_secret(text)


def test_run_and_service_create_take_secrets() -> None:
    args = build_parser().parse_args(
        ["run", "--secret", "db", "--secret", "source=tls,target=key.pem", "busybox", "true"]
    )
    assert run_config(args).secrets == [SecretReference("db"), SecretReference("tls", "key.pem")]
    argv = ["service", "create", "--name", "api", "--secret", "db", "busybox"]
    assert container_config(build_parser(argv).parse_args(argv)).secrets == [SecretReference("db")]


def test_a_bad_secret_reference_fails_before_any_call(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--secret", "source=db,target=a/b", "busybox"]) == 1
    err = capsys.readouterr().err
    assert 'invalid target "a/b"' in err and err.count("\n") == 1


def test_secret_commands_parse() -> None:
    args = build_parser().parse_args(["secret", "create", "-l", "env=prod", "db", "-"])
    assert (args.name, args.file, args.label) == ("db", "-", [("env", "prod")])
    args = build_parser().parse_args(["secret", "ls", "-q"])
    assert args.quiet and args.func is secret_cmds.cmd_secret_ls
    args = build_parser().parse_args(["secret", "rm", "a", "b"])
    assert args.secrets == ["a", "b"]


def test_the_value_comes_from_a_file_or_stdin_and_is_limited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "value"
    path.write_bytes(b"s3cret\n")
    assert secret_cmds.read_value(str(path)) == b"s3cret\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"from stdin")))
    assert secret_cmds.read_value("-") == b"from stdin"
    path.write_bytes(b"x" * (500 * 1024 + 1))
    with pytest.raises(BerthClientError, match="larger than 500 KiB"):
        secret_cmds.read_value(str(path))
    path.write_bytes(b"")
    with pytest.raises(BerthClientError, match="empty"):
        secret_cmds.read_value(str(path))
