"""berthd.builder.dockerfile: stages, checks with line numbers, ARG/ENV scope, cache text."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import pytest

from berthd.builder.dockerfile import (
    PLATFORM,
    Dockerfile,
    DockerfileError,
    Step,
    parse_dockerfile,
    parse_duration,
    stages_needed,
    unused_build_args,
)
from berthd.common.errors import InvalidArgument, NotFound


def steps(
    text: str,
    build_args: Mapping[str, str] | None = None,
    base_env: Sequence[str] = ("PATH=/bin",),
    stage: int = -1,
) -> list[Step]:
    """Every step of one stage (default the last), evaluated in order."""
    build_args = build_args or {}
    df = parse_dockerfile(text, build_args)
    scope = df.scope(base_env, build_args)
    return [scope.step(i) for i in df.stages[stage].instructions]


def error(text: str, build_args: Mapping[str, str] | None = None) -> DockerfileError:
    with pytest.raises(DockerfileError) as info:
        steps(text, build_args)
    assert str(info.value).startswith(f"Dockerfile:{info.value.line}: ")
    return info.value


def cache_text(instruction: str, prefix: str = "FROM busybox\n") -> str:
    return steps(prefix + instruction + "\n")[-1].cache_text


# --- structure and line numbers ----------------------------------------------------------------


def test_continuations_comments_and_line_numbers():
    df = parse_dockerfile(
        "# a comment\n"
        "FROM busybox\n"
        "\n"
        "RUN echo one \\\n"
        "    # a comment inside the continuation\n"
        "    two \\\n"
        "    three\n"
        "# another\n"
        "ENV A=1\n"
    )
    run, env = df.stages[0].instructions
    assert (run.cmd, run.line, run.end_line) == ("RUN", 4, 7)
    assert run.original == "RUN echo one     two     three"
    assert run.args == ("echo one     two     three",)
    assert (env.cmd, env.line, env.end_line) == ("ENV", 9, 9)
    assert df.stages[0].line == 2


def test_lower_case_instructions_are_upper_cased():
    df = parse_dockerfile("from busybox\nrun true\n")
    assert df.stages[0].base == "busybox"
    assert df.stages[0].instructions[0].cmd == "RUN"


def test_escape_directive_backtick():
    text = "# escape=`\nFROM busybox\nRUN echo a `\n    b\nCOPY C:\\src\\x.txt /dst/\n"
    df = parse_dockerfile(text)
    assert df.escape == "`"
    run, copy = df.stages[0].instructions
    assert (run.line, run.end_line) == (3, 4)
    scope = df.scope([], {})
    scope.step(run)
    assert scope.step(copy).words == ("C:\\src\\x.txt", "/dst/")


def test_escape_directive_only_counts_at_the_top():
    df = parse_dockerfile("# a comment first\n# escape=`\nFROM busybox\nENV A=a\\ b\n")
    assert df.escape == "\\"
    assert steps("# comment\n# escape=`\nFROM busybox\nENV A=a\\ b\n")[0].words == ("A", "a b")
    assert parse_dockerfile("# syntax=docker/dockerfile:1\n# escape=`\nFROM x\n").escape == "`"


def test_exec_and_shell_forms():
    df = parse_dockerfile('FROM busybox\nRUN ["echo", "$HOME"]\nRUN echo $HOME\nCMD [ "a", "b" ]\n')
    exec_run, shell_run, cmd = df.stages[0].instructions
    assert (exec_run.json, exec_run.args) == (True, ("echo", "$HOME"))
    assert (shell_run.json, shell_run.args) == (False, ("echo $HOME",))
    assert (cmd.json, cmd.args) == (True, ("a", "b"))


def test_flags_are_parsed_and_expanded():
    step = steps("FROM busybox\nARG U=app\nCOPY --chown=$U:$U --chmod=0755 --link a b\n")[-1]
    assert step.flags == {"chown": "app:app", "chmod": "0755", "link": "true"}
    assert step.instruction.flags == ("--chown=$U:$U", "--chmod=0755", "--link")


# --- stages ------------------------------------------------------------------------------------

MULTI = """\
FROM busybox AS Base
RUN echo base
FROM base AS build
RUN echo build
FROM busybox AS tools
RUN echo tools
FROM scratch AS final
COPY --from=BUILD /out /out
COPY --from=0 /etc/passwd /etc/passwd
FROM busybox AS unrelated
"""


def test_stage_names_are_case_insensitive_and_from_resolves_stages():
    df = parse_dockerfile(MULTI)
    assert [s.name for s in df.stages] == ["base", "build", "tools", "final", "unrelated"]
    build, final = df.stages[1], df.stages[3]
    assert (build.base, build.base_stage, build.needs) == ("base", 0, (0,))
    assert (final.base, final.base_stage, final.needs) == ("scratch", None, (1, 0))
    assert df.stage("Final") is final
    assert df.stage("3") is final
    assert df.stage("9") is None
    assert df.stage("nope") is None


def test_stages_needed_builds_only_what_the_target_needs():
    df = parse_dockerfile(MULTI)
    indexes = lambda target: [s.index for s in stages_needed(df, target)]  # noqa: E731
    assert indexes("final") == [0, 1, 3]  # tools and unrelated are skipped
    assert indexes("build") == [0, 1]
    assert indexes("TOOLS") == [2]
    assert indexes("1") == [0, 1]
    assert indexes(None) == [4]  # default: the last stage
    with pytest.raises(NotFound, match='target stage "missing" not found'):
        stages_needed(df, "missing")


def test_copy_from_numeric_index_and_step_flag():
    text = "FROM busybox\nRUN true\nFROM scratch\nCOPY --from=0 /bin/sh /sh\n"
    assert parse_dockerfile(text).stages[1].needs == (0,)
    assert steps(text)[0].flags == {"from": "0"}


def test_copy_from_uses_global_args():
    text = "ARG SRC=build\nFROM busybox AS build\nFROM scratch\nCOPY --from=$SRC /a /a\n"
    df = parse_dockerfile(text)
    assert df.stages[1].needs == (0,)
    assert steps(text)[0].flags["from"] == "build"


# --- ARG and ENV scope -------------------------------------------------------------------------


def test_global_arg_in_from_default_and_build_arg():
    text = "ARG TAG=1.36\nARG IMAGE=busybox:${TAG}\nFROM $IMAGE\n"
    assert parse_dockerfile(text).stages[0].base == "busybox:1.36"
    assert parse_dockerfile(text, {"TAG": "1.35"}).stages[0].base == "busybox:1.35"
    assert parse_dockerfile(text, {"IMAGE": "alpine"}).stages[0].base == "alpine"


def test_global_args_are_not_visible_in_a_stage_unless_redeclared():
    text = "ARG V=1\nFROM busybox\nENV A=x$V\nARG V\nENV B=x$V\nRUN true\n"
    env_a, _, env_b, run = steps(text)
    assert env_a.words == ("A", "x")
    assert env_b.words == ("B", "x1")  # the redeclared ARG takes the global default
    assert ("V", "1") in run.used_args
    _, _, env_b, _ = steps(text, {"V": "2"})
    assert env_b.words == ("B", "x2")


def test_arg_default_and_build_arg():
    text = "FROM busybox\nARG A=default\nARG B\nRUN true\n"
    assert steps(text)[-1].used_args == (("A", "default"),)  # B has no value: not set
    run = steps(text, {"A": "given", "B": "b"})[-1]
    assert run.used_args == (("A", "given"), ("B", "b"))
    assert "A=given" in run.run_env and "B=b" in run.run_env


def test_arg_default_is_expanded_and_arg_is_not_an_env():
    text = "FROM busybox\nENV HOME=/root\nARG CACHE=$HOME/.cache\nENV DIR=$CACHE/x\nRUN true\n"
    _, arg, env, run = steps(text)
    assert arg.words == ("CACHE=/root/.cache",)
    assert env.words == ("DIR", "/root/.cache/x")
    assert run.run_env == ("PATH=/bin", "HOME=/root", "DIR=/root/.cache/x", "CACHE=/root/.cache")


def test_env_overrides_an_arg_of_the_same_name():
    _, _, run = steps("FROM busybox\nARG A=arg\nENV A=env\nRUN true\n")
    assert "A=env" in run.run_env and "A=arg" not in run.run_env
    assert run.used_args == ()


def test_env_pairs_expand_with_the_values_before_the_instruction():
    _, env = steps("FROM busybox\nENV A=old\nENV A=new B=$A\n")
    assert env.words == ("A", "new", "B", "old")


def test_env_then_used_in_copy_and_workdir():
    text = "FROM busybox\nENV APP=/srv/app NAME='my file'\nWORKDIR $APP\nCOPY ${NAME} $APP/\n"
    _, workdir, copy = steps(text)
    assert workdir.words == ("/srv/app",)
    assert copy.words == ("my file", "/srv/app/")


def test_base_image_env_is_in_scope():
    run = steps("FROM busybox\nENV P=$PATH:/x\nRUN true\n", base_env=["PATH=/bin"])[-1]
    assert run.run_env == ("PATH=/bin", "P=/bin:/x")


def test_default_and_alternative_forms_in_instructions():
    text = "FROM busybox\nARG MODE\nENV A=${MODE:-release} B=${MODE:+set}\n"
    assert steps(text)[-1].words == ("A", "release", "B", "")
    assert steps(text, {"MODE": "debug"})[-1].words == ("A", "debug", "B", "set")


def test_quotes_are_removed_in_env_and_label():
    env, label = steps('FROM busybox\nENV A="a b" B=\'$x\'\nLABEL "k k"="v v" c=d\n')
    assert env.words == ("A", "a b", "B", "$x")
    assert label.words == ("k k", "v v", "c", "d")


def test_run_cmd_and_entrypoint_are_never_expanded():
    run, cmd, entrypoint = steps(
        'FROM busybox\nRUN echo "$HOME"\nCMD echo $HOME\nENTRYPOINT ["$HOME"]\n'
    )
    assert run.words == ('echo "$HOME"',)
    assert cmd.words == ("echo $HOME",)
    assert entrypoint.words == ("$HOME",)


def test_expose_words_split_after_expansion():
    assert steps('FROM busybox\nENV PORTS="80 443"\nEXPOSE $PORTS 53/udp\n')[-1].words == (
        "80",
        "443",
        "53/udp",
    )


def test_proxy_build_args_reach_run_but_not_the_cache_key():
    run = steps("FROM busybox\nRUN true\n", {"http_proxy": "http://proxy:3128"})[0]
    assert "http_proxy=http://proxy:3128" in run.run_env
    assert run.used_args == ()


def test_only_run_gets_an_environment():
    copy, run = steps("FROM busybox\nARG A=1\nCOPY a b\nRUN true\n")[1:]
    assert (copy.run_env, copy.used_args) == ((), ())
    assert run.run_env == ("PATH=/bin", "A=1")


def test_automatic_platform_args():
    text = (
        "FROM --platform=$BUILDPLATFORM busybox AS b\nARG TARGETPLATFORM\nENV P=$TARGETPLATFORM\n"
    )
    assert steps(text)[-1].words == ("P", PLATFORM)


def test_unused_build_args():
    text = "ARG TAG=1\nARG UNUSED_GLOBAL\nFROM busybox:$TAG\nARG A\nFROM busybox AS other\nARG B\n"
    df = parse_dockerfile(text)
    args = {"TAG": "2", "A": "a", "B": "b", "UNUSED_GLOBAL": "x", "NOPE": "n", "HTTP_PROXY": "p"}
    assert unused_build_args(df, df.stages[:1], args) == ["B", "NOPE", "UNUSED_GLOBAL"]
    assert unused_build_args(df, df.stages, args) == ["NOPE", "UNUSED_GLOBAL"]


# --- cache text --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("COPY a b", "COPY    a     b   "),
        ("COPY --chown=1:1 --chmod=644 a b", "COPY --chmod=644   --chown=1:1 a b"),
        ("copy a b", "COPY a b"),
        ("ENV A=1 B=2", "ENV  A=1   B=2"),
        ("ENV A 1", "ENV A=1"),
        ("ENV A=x", 'ENV A="x"'),
        ('CMD ["a","b"]', 'CMD [ "a",   "b" ]'),
        ("EXPOSE 80  443", "EXPOSE 80 443"),
        ("WORKDIR /app", "WORKDIR    /app"),
        ("RUN echo hi", "RUN \\\n  echo hi"),
    ],
)
def test_cache_text_equal_for_equivalent_instructions(a, b):
    assert cache_text(a) == cache_text(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("COPY a b", "COPY a c"),
        ("COPY a b", "COPY --chown=1:1 a b"),
        ("ENV A=1", "ENV A=2"),
        ("CMD x", 'CMD ["x"]'),  # shell vs exec form
        ("RUN echo hi", "RUN echo ho"),
        ("ADD a b", "COPY a b"),
        ("ONBUILD RUN a", "ONBUILD RUN b"),
    ],
)
def test_cache_text_differs_for_different_instructions(a, b):
    assert cache_text(a) != cache_text(b)


def test_cache_text_sees_expanded_values():
    text = "FROM busybox\nARG DEST=/a\nCOPY x $DEST\n"
    assert steps(text)[-1].cache_text != steps(text, {"DEST": "/b"})[-1].cache_text
    assert json.loads(steps(text)[-1].cache_text)["words"] == ["x", "/a"]


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("", 1, "no instructions"),
        ("# only a comment\n\n", 1, "no instructions"),
        ("FROM busybox\nRUN true\nFOO bar\n", 3, "unknown instruction: FOO"),
        ("ARG A\n\nARG B\n", 3, "no FROM instruction"),
        ("ARG A\nRUN echo\nFROM busybox\n", 2, "RUN before the first FROM"),
        ("FROM busybox\nCOPY --from=nowhere /a /b\n", 2, "COPY --from=nowhere: no earlier"),
        ("FROM busybox AS a\nCOPY --from=a /a /b\n", 2, "no earlier build stage"),
        ("FROM busybox\nCOPY --from=1 /a /b\nFROM busybox\n", 2, "no earlier build stage"),
        ("FROM busybox\nFROM Bad:Ref\n", 2, "FROM Bad:Ref: invalid repository name"),
        ("FROM busybox:-bad\n", 1, "FROM busybox:-bad: invalid tag"),
        ("ARG IMAGE\nFROM $IMAGE\n", 2, "the image name is empty"),
        ("FROM busybox AS\n", 1, "FROM requires an image"),
        ("FROM a b c\n", 1, "FROM requires an image"),
        ("FROM busybox AS 1st\n", 1, "invalid stage name"),
        ("FROM busybox AS a\nFROM busybox AS A\n", 2, "duplicate stage name"),
        ("FROM busybox\n\nENV A\n", 3, "ENV must have two arguments"),
        ("FROM busybox\nRUN echo \\\n  ok\nLABEL x\n", 4, "LABEL must have two arguments"),
        ("FROM busybox\nCOPY a\n", 2, "COPY requires at least one source"),
        ("FROM busybox\nRUN a\nLABEL\nRUN b\n", 3, "LABEL requires at least one argument"),
        ("FROM busybox\nENV A=1 \\\n  B\n", 3, 'can\'t find = in "B"'),
        ("FROM busybox\nWORKDIR\n", 2, "WORKDIR requires exactly one argument"),
        ("FROM busybox\nRUN --mount=type=cache,target=/x make\n", 2, "unknown flag"),
        ("FROM busybox\nCOPY --frm=x a b\n", 2, "COPY --frm=x: unknown flag"),
        ("FROM busybox\nCOPY --chown a b\n", 2, "--chown needs a value"),
        ("FROM busybox\nCOPY --link=maybe a b\n", 2, "expected true or false"),
        ("FROM busybox\nRUN <<EOF\necho hi\nEOF\n", 2, "heredocs"),
        ("FROM busybox\nSHELL /bin/bash -c\n", 2, "SHELL requires the JSON form"),
        ("FROM busybox\nONBUILD ONBUILD RUN x\n", 2, "ONBUILD ONBUILD is not allowed"),
        ("FROM busybox\nONBUILD FROM x\n", 2, "FROM is not allowed as an ONBUILD trigger"),
        ("FROM busybox\nONBUILD FOO x\n", 2, "unknown instruction: FOO"),
        ("FROM busybox\nCMD\n", 2, "CMD requires a command"),
        ("FROM busybox\nHEALTHCHECK --interval=5x CMD true\n", 2, "invalid duration"),
        ("FROM busybox\nHEALTHCHECK --interval=1us CMD true\n", 2, "at least 1ms"),
        ("FROM busybox\nHEALTHCHECK --retries=-1 CMD true\n", 2, "whole number"),
        ("FROM busybox\nHEALTHCHECK CMD\n", 2, "requires a command"),
        ("FROM busybox\nHEALTHCHECK --retries=1 NONE\n", 2, "NONE takes no arguments"),
        ("FROM busybox\nHEALTHCHECK sometimes\n", 2, "expected CMD or NONE"),
        ("# escape=x\nFROM busybox\n", 1, "invalid escape token"),
        ("FROM --platform=linux/s390x busybox\n", 1, f"builds for {PLATFORM} only"),
        ("ARG A=${\nFROM busybox\n", 1, "ARG: "),
    ],
)
def test_errors_name_their_line(text, line, message):
    e = error(text)
    assert e.line == line
    assert message in str(e)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("FROM busybox\nRUN true\nENV A=${B\n", 3, 'ENV: "${B": missing }'),
        ("FROM busybox\nWORKDIR '/a\n", 2, "no closing single quote"),
        ("FROM busybox\nARG X\nENV A=${X:?required}\n", 3, "X: required"),
        ("FROM busybox\nCOPY --chmod=rwx a b\n", 2, "expected an octal mode"),
        ("FROM busybox\nADD https://example.com/x /x\n", 2, "remote sources are not supported"),
    ],
)
def test_evaluation_errors_name_their_line(text, line, message):
    e = error(text)
    assert e.line == line
    assert message in str(e)


def test_dockerfile_error_is_an_invalid_argument():
    e = error("FROM busybox\nBAD x\n")
    assert isinstance(e, InvalidArgument)
    assert str(e) == "Dockerfile:2: unknown instruction: BAD"


def test_scratch_and_digests_are_valid_bases():
    digest = "sha256:" + "a" * 64
    df = parse_dockerfile(f"FROM scratch\nFROM busybox@{digest}\nFROM localhost:5000/x/y:1\n")
    assert isinstance(df, Dockerfile)
    assert [s.base for s in df.stages] == [
        "scratch",
        f"busybox@{digest}",
        "localhost:5000/x/y:1",
    ]


@pytest.mark.parametrize(
    ("text", "nanoseconds"),
    [
        ("0", 0),
        ("30s", 30_000_000_000),
        ("1m30s", 90_000_000_000),
        ("1.5h", 5_400_000_000_000),
        ("500ms", 500_000_000),
        ("10us", 10_000),
        ("+2s", 2_000_000_000),
        ("-1s", -1_000_000_000),
    ],
)
def test_parse_duration(text, nanoseconds):
    assert parse_duration(text) == nanoseconds


@pytest.mark.parametrize("text", ["", "5", "5x", "s", ".s", "1s2", "1 s"])
def test_parse_duration_rejects(text):
    with pytest.raises(InvalidArgument, match="invalid duration"):
        parse_duration(text)
