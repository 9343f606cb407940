"""A Dockerfile parsed into build stages, and its instructions evaluated in their stage's scope.

Parsing is BuildKit's own parser (the `dockerfile` package): it handles comments, line
continuations, the `# escape=` and `# syntax=` directives, JSON (exec) and shell forms, flags
and heredocs, and reports where each instruction starts and ends. It reports syntax errors
without a line and lets through what BuildKit's next layer rejects, so this module adds what
`docker build` checks before it runs anything: known instructions and flags, argument counts,
`FROM` structure and references, stage names, `COPY --from` stages, ONBUILD triggers,
HEALTHCHECK options. Every error is a DockerfileError, `Dockerfile:<line>: <what>`.

Evaluation follows Docker: ARGs before the first FROM are only visible to FROM lines (and to
a stage that redeclares them without a default); `--build-arg` overrides a default; ARG
values are in RUN's environment but not in the image config; ENV overrides an ARG of the same
name; only some instructions expand variables (see `substitute`).
"""

from __future__ import annotations

import json
import platform
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import dockerfile as buildkit

from berthd.builder.errors import DOCKERFILE_INVALID, STAGE_NOT_FOUND
from berthd.common.changes import env_map, set_env
from berthd.common.errors import InvalidArgument, NotFound
from berthd.common.oci.digest import quoted
from berthd.common.oci.reference import parse_reference
from berthd.common.substitute import expand, expand_words, split_arg, split_key_values

# Flags each instruction accepts, and whether the flag takes a value (else it is a switch).
# Other BuildKit flags (RUN --mount/--network/--security, ADD --checksum/--keep-git-dir) need
# machinery berth's builder does not have: they are rejected, not silently ignored.
FLAGS: dict[str, dict[str, bool]] = {
    "ADD": {"chown": True, "chmod": True, "link": False},
    "ARG": {},
    "CMD": {},
    "COPY": {"from": True, "chown": True, "chmod": True, "link": False},
    "ENTRYPOINT": {},
    "ENV": {},
    "EXPOSE": {},
    "FROM": {"platform": True},
    "HEALTHCHECK": {
        "interval": True,
        "timeout": True,
        "start-period": True,
        "start-interval": True,
        "retries": True,
    },
    "LABEL": {},
    "MAINTAINER": {},
    "ONBUILD": {},
    "RUN": {},
    "SHELL": {},
    "STOPSIGNAL": {},
    "USER": {},
    "VOLUME": {},
    "WORKDIR": {},
}
# Build args any Dockerfile may use without declaring them. They reach RUN's environment but
# not the cache key nor the history, so changing a proxy does not rebuild anything.
_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "FTP_PROXY", "NO_PROXY", "ALL_PROXY")
PROXY_ARGS = frozenset(_PROXIES) | {name.lower() for name in _PROXIES}
_ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
ARCHITECTURE = _ARCHITECTURES.get(platform.machine().lower(), platform.machine().lower())
PLATFORM = f"linux/{ARCHITECTURE}"
# BuildKit's automatic platform args: visible to FROM lines, and in a stage that declares them.
PLATFORM_ARGS: dict[str, str | None] = {
    f"{kind}{part}": value
    for kind in ("TARGET", "BUILD")
    for part, value in (
        ("PLATFORM", PLATFORM),
        ("OS", "linux"),
        ("ARCH", ARCHITECTURE),
        ("VARIANT", ""),
    )
}
# Instructions whose words Docker expands (FROM is expanded with the global args only).
_EXPANDED = frozenset(
    {"ADD", "ARG", "COPY", "ENV", "EXPOSE", "LABEL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}
)
_ONE_ARGUMENT = frozenset({"MAINTAINER", "STOPSIGNAL", "USER", "WORKDIR"})
_AT_LEAST_ONE = frozenset(
    {"ARG", "ENV", "EXPOSE", "HEALTHCHECK", "LABEL", "RUN", "SHELL", "VOLUME"}
)
_STAGE_NAME = re.compile(r"[a-z][a-z0-9_.-]*")
_CHMOD = re.compile(r"[0-7]{3,4}")
_REMOTE = re.compile(r"(?i)(https?|git)://|git@")
_ONBUILD_PREFIX = re.compile(r"(?i)^\s*ONBUILD\s*")
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
_NANOSECONDS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,
    "μs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_MINIMUM_INTERVAL = 1_000_000  # Docker's floor for HEALTHCHECK durations: 1ms


class DockerfileError(InvalidArgument):
    """A Dockerfile problem, reported as `Dockerfile:<line>: <what>`."""

    def __init__(self, line: int, what: str) -> None:
        super().__init__(
            f"Dockerfile:{line}: {what}",
            reason=DOCKERFILE_INVALID,
            metadata={"line": line},
            field="options.dockerfile",
        )
        self.line = line
        self.what = what


@dataclass(frozen=True)
class Instruction:
    """One instruction as written (before variable expansion)."""

    cmd: str  # upper case: "RUN", "COPY", ...
    line: int  # first line, 1-based
    end_line: int
    original: str  # as written, continuations joined
    args: tuple[str, ...]  # the parser's words; ENV/LABEL as key, value, key, value...
    json: bool  # exec (JSON) form
    flags: tuple[str, ...]  # raw, e.g. ("--from=build", "--chown=1:1")
    sub_cmd: str | None = None  # ONBUILD's trigger instruction ("RUN"); args are the trigger's


@dataclass
class Stage:
    index: int
    name: str | None  # `AS name`, lower-cased as Docker does
    base: str  # FROM's image after ARG expansion: "scratch", an image reference or a stage
    line: int
    instructions: list[Instruction]  # after FROM, in order
    base_stage: int | None = None  # index of the stage `base` names, if it names one
    needs: tuple[int, ...] = ()  # stages this one builds on: its base and COPY --from
    from_instruction: Instruction | None = None
    global_args_used: frozenset[str] = frozenset()  # in FROM and COPY --from


@dataclass
class Dockerfile:
    stages: list[Stage]
    # The ARGs before the first FROM and their values for this build: the --build-arg given
    # to parse_dockerfile, else the default (expanded), else None. Includes PLATFORM_ARGS.
    global_args: dict[str, str | None]
    escape: str = "\\"

    def stage(self, ref: str) -> Stage | None:
        """The stage a `--from` or `--target` names: its name (any case) or its index."""
        if ref.isdigit():
            index = int(ref)
            return self.stages[index] if index < len(self.stages) else None
        ref = ref.lower()
        return next((s for s in self.stages if s.name == ref), None)

    def scope(self, base_env: Sequence[str], build_args: Mapping[str, str]) -> StageScope:
        """A StageScope for one of this file's stages."""
        return StageScope(base_env, self.global_args, build_args, escape=self.escape)


# --- parsing ---------------------------------------------------------------------------------


def parse_dockerfile(text: str, build_args: Mapping[str, str] | None = None) -> Dockerfile:
    """Parse and check `text`. `build_args` (the --build-arg values) are needed here because
    FROM lines and COPY --from may use the global ARGs; pass the same ones to StageScope."""
    build_args = build_args or {}
    commands = _parse(text)
    escape = _escape_token(text)
    global_args = dict(PLATFORM_ARGS)
    stages: list[Stage] = []
    last_line = 1
    for command in commands:
        instruction = _instruction(command)
        last_line = instruction.end_line
        _check(instruction)
        if instruction.cmd == "FROM":
            stages.append(_stage(instruction, stages, global_args, escape))
        elif not stages:
            if instruction.cmd != "ARG":
                raise DockerfileError(
                    instruction.line,
                    f"{instruction.cmd} before the first FROM; only ARG may come before it",
                )
            _declare_global(instruction, global_args, build_args, escape)
        else:
            _add_to_stage(stages[-1], instruction, stages, global_args, escape)
    if not stages:
        raise DockerfileError(last_line, "no FROM instruction: every build stage starts with one")
    return Dockerfile(stages, global_args, escape)


def _parse(text: str) -> tuple[Any, ...]:
    try:
        return buildkit.parse_string(text)
    except buildkit.GoParseError as e:
        message = str(e)
        if message == "file with no instructions":
            raise DockerfileError(1, "the file has no instructions (it needs a FROM)") from None
        raise DockerfileError(_error_line(text, message), message) from None


def _error_line(text: str, message: str) -> int:
    """The parser's errors carry no line. It stops at the first bad instruction, so prefixes
    that end before it parse and the ones that include it fail the same way: bisect for the
    first line of the failing prefixes (the last line of a multi-line instruction)."""
    lines = text.splitlines(keepends=True)

    def fails(end: int) -> bool:
        try:
            buildkit.parse_string("".join(lines[:end]))
        except buildkit.GoParseError as e:
            return str(e) == message
        return False

    low, high = 1, max(len(lines), 1)
    while low < high:
        middle = (low + high) // 2
        if fails(middle):
            high = middle
        else:
            low = middle + 1
    return low


def _escape_token(text: str) -> str:
    """The escape character the parser used. Only the parser knows which leading comments it
    took as directives, so it parses them again with a probe that a backtick continues."""
    header: list[str] = []
    for line in text.splitlines():
        if not line.lstrip("\ufeff \t").startswith("#"):
            break
        header.append(line)
    probe = buildkit.parse_string("\n".join([*header, "RUN a `", "RUN b", ""]))
    return "`" if len(probe) == 1 else "\\"


def _instruction(command: Any) -> Instruction:
    if command.heredocs:
        raise DockerfileError(command.start_line, "heredocs (<<EOF) are not supported")
    return Instruction(
        cmd=command.cmd.upper(),
        line=command.start_line,
        end_line=command.end_line,
        original=command.original.strip(),
        args=tuple(command.value),
        json=command.json,
        flags=tuple(command.flags),
        sub_cmd=command.sub_cmd.upper() if command.sub_cmd else None,
    )


def _check(instruction: Instruction) -> None:
    """What BuildKit checks about one instruction before running anything."""
    line = instruction.line
    if instruction.cmd not in FLAGS:
        raise DockerfileError(line, f"unknown instruction: {instruction.cmd}")
    if instruction.cmd == "ONBUILD":
        _check_trigger(instruction)
    cmd = instruction.sub_cmd or instruction.cmd  # ONBUILD's trigger is checked like the rest
    flags = raw_flags(instruction)
    args = instruction.args
    if cmd in _ONE_ARGUMENT and len(args) != 1:
        raise DockerfileError(line, f"{cmd} requires exactly one argument")
    if cmd in _AT_LEAST_ONE and not args:
        raise DockerfileError(line, f"{cmd} requires at least one argument")
    if cmd in ("COPY", "ADD") and len(args) < 2:
        raise DockerfileError(line, f"{cmd} requires at least one source and a destination")
    if cmd in ("ENV", "LABEL") and any(not key for key, _ in split_key_values(args)):
        raise DockerfileError(line, f"{cmd} names must not be empty")
    if cmd == "CMD" and not args and not instruction.json:
        raise DockerfileError(line, "CMD requires a command (CMD [] clears it)")
    if cmd == "SHELL" and not instruction.json:
        raise DockerfileError(line, 'SHELL requires the JSON form: SHELL ["executable", "param"]')
    if cmd == "FROM" and not (len(args) == 1 or (len(args) == 3 and args[1].upper() == "AS")):
        raise DockerfileError(line, "FROM requires an image, optionally followed by AS name")
    try:
        if cmd == "ARG":
            for word in args:
                split_arg(word)
        if cmd == "HEALTHCHECK":
            healthcheck_config(args, instruction.json, flags)
    except InvalidArgument as e:
        raise DockerfileError(line, str(e)) from None


def _check_trigger(instruction: Instruction) -> None:
    trigger = instruction.sub_cmd
    if trigger is None:
        raise DockerfileError(instruction.line, "ONBUILD requires an instruction to trigger")
    if trigger == "ONBUILD":
        raise DockerfileError(instruction.line, "ONBUILD ONBUILD is not allowed")
    if trigger in ("FROM", "MAINTAINER"):
        raise DockerfileError(instruction.line, f"{trigger} is not allowed as an ONBUILD trigger")
    if trigger not in FLAGS:
        raise DockerfileError(instruction.line, f"unknown instruction: {trigger}")


def raw_flags(instruction: Instruction) -> dict[str, str]:
    """The flags as name -> value (switches are "true"), checked against FLAGS."""
    cmd = instruction.sub_cmd or instruction.cmd
    known = FLAGS.get(cmd, {})
    result: dict[str, str] = {}
    for flag in instruction.flags:
        name, equals, value = flag[2:].partition("=")
        takes_value = known.get(name)
        where = f"{cmd} {flag}"
        if takes_value is None:
            supported = ", ".join(f"--{f}" for f in known) or "none"
            raise DockerfileError(
                instruction.line, f"{where}: unknown flag (supported here: {supported})"
            )
        if name in result:
            raise DockerfileError(instruction.line, f"{where}: --{name} is given twice")
        if takes_value and not value:
            raise DockerfileError(instruction.line, f"{where}: --{name} needs a value")
        if not takes_value:
            if equals and value.lower() not in ("true", "false"):
                raise DockerfileError(instruction.line, f"{where}: expected true or false")
            value = value.lower() if equals else "true"
        result[name] = value
    return result


def _declare_global(
    instruction: Instruction,
    global_args: dict[str, str | None],
    build_args: Mapping[str, str],
    escape: str,
) -> None:
    for word in instruction.args:
        name, default = split_arg(word)
        if default is not None:
            default = _expand(instruction, default, _values(global_args), escape)
        global_args[name] = arg_value(name, default, build_args, global_args)


def arg_value(
    name: str,
    default: str | None,
    build_args: Mapping[str, str],
    earlier: Mapping[str, str | None],
) -> str | None:
    """An ARG's value: the --build-arg, else its default, else the value `earlier` gives the
    name (the global ARG for a stage's `ARG NAME`; an automatic platform arg)."""
    if name in build_args:
        return build_args[name]
    if default is not None:
        return default
    return earlier.get(name)


def _stage(
    instruction: Instruction,
    stages: list[Stage],
    global_args: Mapping[str, str | None],
    escape: str,
) -> Stage:
    """A new stage from its FROM line, its base expanded with the global args."""
    line = instruction.line
    scope = _Recording(_values(global_args))
    base = _expand(instruction, instruction.args[0], scope, escape)
    if not base:
        raise DockerfileError(line, f"FROM {instruction.args[0]}: the image name is empty")
    target_platform = raw_flags(instruction).get("platform")
    if target_platform is not None:
        wanted = _expand(instruction, target_platform, scope, escape)
        if wanted.lower() != PLATFORM:
            raise DockerfileError(
                line, f"FROM --platform={wanted}: this builder builds for {PLATFORM} only"
            )
    name = None
    if len(instruction.args) == 3:
        name = instruction.args[2].lower()
        if not _STAGE_NAME.fullmatch(name):
            raise DockerfileError(
                line,
                f"invalid stage name {quoted(instruction.args[2])}: use a letter, then letters, "
                "digits, _ . and -",
            )
        if any(s.name == name for s in stages):
            raise DockerfileError(line, f"duplicate stage name {quoted(name)}")
    base_stage = next((s.index for s in stages if s.name == base.lower()), None)
    if base_stage is None and base != "scratch":
        try:
            parse_reference(base)
        except InvalidArgument as e:
            raise DockerfileError(line, f"FROM {base}: {e}") from None
    return Stage(
        index=len(stages),
        name=name,
        base=base,
        line=line,
        instructions=[],
        base_stage=base_stage,
        needs=() if base_stage is None else (base_stage,),
        from_instruction=instruction,
        global_args_used=frozenset(scope.used),
    )


def _add_to_stage(
    stage: Stage,
    instruction: Instruction,
    stages: list[Stage],
    global_args: Mapping[str, str | None],
    escape: str,
) -> None:
    stage.instructions.append(instruction)
    if instruction.cmd != "COPY" or "from" not in raw_flags(instruction):
        return
    scope = _Recording(_values(global_args))
    source = copy_from(instruction, scope, escape)
    # Only earlier stages: a stage can never wait for itself or a later one.
    found = next((s for s in stages[:-1] if source in (s.name, str(s.index))), None)
    if found is None:
        raise DockerfileError(
            instruction.line,
            f"COPY --from={source}: no earlier build stage has that name or index "
            "(copying from an image is not supported)",
        )
    if found.index not in stage.needs:
        stage.needs = (*stage.needs, found.index)
    stage.global_args_used |= scope.used


def copy_from(instruction: Instruction, global_values: Mapping[str, str], escape: str) -> str:
    """COPY --from's stage, expanded with the global args (as the stage graph is built before
    any stage runs) and lower-cased like stage names."""
    return _expand(instruction, raw_flags(instruction)["from"], global_values, escape).lower()


def stages_needed(df: Dockerfile, target: str | None = None) -> list[Stage]:
    """The target stage (name or index; default the last) and every stage it needs, through
    FROM <stage> and COPY --from, in build order. The others are not built."""
    stage = df.stage(target) if target else df.stages[-1]
    if stage is None:
        raise NotFound(
            f"target stage {quoted(target)} not found in the Dockerfile",
            reason=STAGE_NOT_FOUND,
            metadata={"stage": target},
            field="options.target",
        )
    needed: set[int] = set()
    pending = [stage.index]
    while pending:
        index = pending.pop()
        if index not in needed:
            needed.add(index)
            pending.extend(df.stages[index].needs)
    return [s for s in df.stages if s.index in needed]


def unused_build_args(
    df: Dockerfile, stages: Sequence[Stage], build_args: Mapping[str, str]
) -> list[str]:
    """Build args no built stage declares and no FROM or COPY --from uses (Docker warns)."""
    used = set(PROXY_ARGS) | set(PLATFORM_ARGS)
    for stage in stages:
        used |= stage.global_args_used
        for instruction in stage.instructions:
            if instruction.cmd == "ARG":
                used.update(split_arg(word)[0] for word in instruction.args)
    return sorted(name for name in build_args if name not in used)


# --- evaluation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One instruction evaluated in its stage's scope."""

    instruction: Instruction
    # The arguments after variable expansion where Docker expands (see _EXPANDED); as written
    # for RUN, CMD, ENTRYPOINT, SHELL, HEALTHCHECK, MAINTAINER; ONBUILD's is its trigger text.
    words: tuple[str, ...]
    flags: dict[str, str]  # expanded for COPY/ADD, e.g. {"from": "build", "chown": "1:1"}
    run_env: tuple[str, ...]  # RUN only: "K=V" of the config env, then the ARGs in scope
    # RUN only: the build args in its environment (other steps' args show in their words).
    used_args: tuple[tuple[str, str], ...]
    cache_text: str  # the normalized instruction, for the cache key
    cmd_set: bool = False  # a CMD came earlier in this stage: ENTRYPOINT keeps it


class StageScope:
    """Tracks ARG and ENV through a stage. Create with the base image's config env
    (list of "K=V"), the global args, and the --build-arg values; then call step(instruction)
    for each instruction in order; it returns the Step and updates ARG/ENV scope."""

    def __init__(
        self,
        base_env: Sequence[str],
        global_args: Mapping[str, str | None],
        build_args: Mapping[str, str],
        escape: str = "\\",
    ) -> None:
        self.env = list(base_env)  # the image config's Env so far
        self.args: dict[str, str | None] = {}  # ARGs this stage declared, with their values
        self.global_args = dict(global_args)
        self.build_args = dict(build_args)
        self.escape = escape
        self.cmd_set = False

    def variables(self) -> dict[str, str]:
        """What `$NAME` means now: the stage's ARGs, overridden by ENV."""
        result = {k: v for k, v in self.args.items() if v is not None}
        result.update(env_map({"Env": self.env}))
        return result

    def step(self, instruction: Instruction) -> Step:
        try:
            step = self._evaluate(instruction)
        except DockerfileError:
            raise
        except InvalidArgument as e:
            raise DockerfileError(instruction.line, f"{instruction.cmd}: {e}") from None
        self._update(step)
        return step

    def _evaluate(self, instruction: Instruction) -> Step:
        cmd = instruction.cmd
        words = self._words(instruction)
        flags = raw_flags(instruction)
        if cmd in ("COPY", "ADD"):
            flags = self._copy_flags(instruction, flags, words)
        run_env: tuple[str, ...] = ()
        used_args: tuple[tuple[str, str], ...] = ()
        if cmd == "RUN":
            used_args = self._run_args()
            run_env = (*self.env, *(f"{k}={v}" for k, v in self._proxy_args() + used_args))
        cache = {"cmd": cmd, "json": instruction.json, "words": words, "flags": flags}
        if instruction.sub_cmd:
            cache["trigger"] = instruction.sub_cmd
        return Step(
            instruction=instruction,
            words=words,
            flags=flags,
            run_env=run_env,
            used_args=used_args,
            cache_text=json.dumps(cache, sort_keys=True, separators=(",", ":")),
            cmd_set=self.cmd_set,
        )

    def _words(self, instruction: Instruction) -> tuple[str, ...]:
        cmd, args = instruction.cmd, instruction.args
        if cmd == "ONBUILD":
            return (_ONBUILD_PREFIX.sub("", instruction.original),)
        if cmd not in _EXPANDED:
            return args
        variables = self.variables()

        def one(word: str) -> str:
            return expand(word, variables, self.escape)

        if cmd == "EXPOSE":
            return tuple(w for arg in args for w in expand_words(arg, variables, self.escape))
        if cmd == "ARG":
            declared = [split_arg(word) for word in args]
            return tuple(name if d is None else f"{name}={one(d)}" for name, d in declared)
        return tuple(one(word) for word in args)

    def _copy_flags(
        self, instruction: Instruction, flags: dict[str, str], words: tuple[str, ...]
    ) -> dict[str, str]:
        variables = self.variables()
        result = dict(flags)
        for name in ("chown", "chmod"):
            if name in result:
                result[name] = expand(result[name], variables, self.escape)
        if "chmod" in result and not _CHMOD.fullmatch(result["chmod"]):
            raise InvalidArgument(f"--chmod={result['chmod']}: expected an octal mode like 755")
        if "from" in result:
            result["from"] = copy_from(instruction, _values(self.global_args), self.escape)
        remote = next((w for w in words[:-1] if _REMOTE.match(w)), None)
        if remote is not None:
            raise InvalidArgument(f"{remote}: remote sources are not supported")
        return result

    def _run_args(self) -> tuple[tuple[str, str], ...]:
        """The declared ARGs RUN sees: those with a value that no ENV overrides."""
        env = env_map({"Env": self.env})
        return tuple((k, v) for k, v in sorted(self.args.items()) if v is not None and k not in env)

    def _proxy_args(self) -> tuple[tuple[str, str], ...]:
        """Proxy build args the stage did not declare: in RUN's environment all the same."""
        env = env_map({"Env": self.env})
        return tuple(
            (k, v)
            for k, v in sorted(self.build_args.items())
            if k in PROXY_ARGS and k not in self.args and k not in env
        )

    def _update(self, step: Step) -> None:
        cmd = step.instruction.cmd
        if cmd == "ENV":
            for key, value in split_key_values(step.words):
                self.env = set_env(self.env, key, value)
        elif cmd == "ARG":
            for word in step.words:
                name, default = split_arg(word)
                self.args[name] = arg_value(name, default, self.build_args, self.global_args)
        elif cmd == "CMD":
            self.cmd_set = True


# --- HEALTHCHECK -----------------------------------------------------------------------------


def healthcheck_config(
    args: Sequence[str], json_form: bool, flags: Mapping[str, str]
) -> dict[str, Any]:
    """The image config's Healthcheck for `HEALTHCHECK [options] CMD ...` or `HEALTHCHECK NONE`
    (durations in nanoseconds, zero values left out as Docker does)."""
    kind = args[0].upper() if args else ""
    if kind == "NONE":
        if len(args) > 1 or flags:
            raise InvalidArgument("HEALTHCHECK NONE takes no arguments or options")
        return {"Test": ["NONE"]}
    if kind != "CMD":
        raise InvalidArgument(f"HEALTHCHECK {quoted(args[0])}: expected CMD or NONE")
    command = list(args[1:])
    if not command or command == [""]:
        raise InvalidArgument("HEALTHCHECK CMD requires a command")
    result: dict[str, Any] = {"Test": ["CMD" if json_form else "CMD-SHELL", *command]}
    for flag, key in (
        ("interval", "Interval"),
        ("timeout", "Timeout"),
        ("start-period", "StartPeriod"),
        ("start-interval", "StartInterval"),
    ):
        if flag in flags:
            nanoseconds = parse_duration(flags[flag])
            if 0 < nanoseconds < _MINIMUM_INTERVAL or nanoseconds < 0:
                raise InvalidArgument(f"HEALTHCHECK --{flag}={flags[flag]}: at least 1ms, or 0")
            if nanoseconds:
                result[key] = nanoseconds
    if "retries" in flags:
        retries = flags["retries"]
        if not retries.isdigit():
            raise InvalidArgument(f"HEALTHCHECK --retries={retries}: expected a whole number")
        if int(retries):
            result["Retries"] = int(retries)
    return result


def parse_duration(text: str) -> int:
    """A Go duration (`30s`, `1m30s`, `1.5h`, `500ms`, `0`) in nanoseconds."""
    sign, body = (-1, text[1:]) if text.startswith("-") else (1, text.removeprefix("+"))
    if body == "0":
        return 0
    invalid = InvalidArgument(f"invalid duration {quoted(text)}: expected e.g. 30s, 1m30s, 500ms")
    total, pos = Decimal(0), 0
    while pos < len(body):
        match = _DURATION_PART.match(body, pos)
        if match is None or match.group(1) in ("", "."):
            raise invalid
        total += Decimal(match.group(1)) * _NANOSECONDS[match.group(2)]
        pos = match.end()
    if not body:
        raise invalid
    return sign * int(total)


# --- helpers ---------------------------------------------------------------------------------


class _Recording(Mapping[str, str]):
    """A mapping that remembers which names an expansion looked up."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = values
        self.used: set[str] = set()

    def __getitem__(self, key: str) -> str:
        self.used.add(key)
        return self.values[key]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.used.add(key)
        return key in self.values

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def _expand(instruction: Instruction, word: str, env: Mapping[str, str], escape: str) -> str:
    try:
        return expand(word, env, escape)
    except InvalidArgument as e:
        raise DockerfileError(instruction.line, f"{instruction.cmd}: {e}") from None


def _values(args: Mapping[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in args.items() if v is not None}
