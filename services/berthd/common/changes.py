"""Dockerfile metadata instructions applied to an image config's `config` section.

Used by `commit --change` and `import --change`, and by the builder for the same instructions:
CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, USER, WORKDIR and VOLUME. Text is parsed with BuildKit's
own parser (the `dockerfile` package); each instruction is one public function over a mutable
config section, listed in INSTRUCTIONS. Values follow BuildKit's rules: ENV, LABEL, EXPOSE,
USER, WORKDIR and VOLUME drop quotes and expand `$VAR` / `${VAR}` from the environment built so
far; CMD and ENTRYPOINT in shell form become `["/bin/sh", "-c", text]`, their JSON form is taken
as is.

Handlers raise InvalidArgument with a message starting with the instruction's name; callers
prefix where the instruction came from (`invalid --change "..."`, a Dockerfile line).
"""

from __future__ import annotations

import copy
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import dockerfile

from berthd.common.errors import InvalidArgument
from berthd.common.oci.digest import quoted
from berthd.common.substitute import expand, expand_words

SHELL = ("/bin/sh", "-c")
PROTOCOLS = ("tcp", "udp", "sctp")
_NAME_CHARS = re.compile(r"[A-Za-z0-9_]")


@dataclass(frozen=True)
class Instruction:
    """One parsed instruction: `name` upper case, `args` as the parser split them."""

    name: str
    args: tuple[str, ...]
    json: bool  # JSON (exec) form: ["a", "b"]
    flags: tuple[str, ...]
    original: str


@dataclass
class ChangeState:
    """What instructions of one batch need to know about the ones before them."""

    # A CMD came earlier in the batch: a later ENTRYPOINT keeps it (otherwise it resets CMD).
    cmd_set: bool = False
    # The words were expanded already (the builder does, with the stage's ARGs in scope):
    # take them as they are instead of expanding them again from the config's Env.
    expanded: bool = False


Handler = Callable[[dict[str, Any], Instruction, ChangeState], None]


# --- parsing -------------------------------------------------------------------------------


def parse_instruction(text: str) -> Instruction:
    """One Dockerfile instruction; anything else (none, several) is InvalidArgument."""
    try:
        commands = dockerfile.parse_string(text)
    except dockerfile.GoParseError as e:
        raise InvalidArgument(str(e)) from None
    if len(commands) != 1:
        raise InvalidArgument(f"expected one instruction, got {len(commands)}")
    c = commands[0]
    return Instruction(c.cmd.upper(), tuple(c.value), c.json, tuple(c.flags), c.original)


def parse_change(text: str) -> Instruction:
    """A `--change` value, checked to be an instruction apply_changes supports."""
    try:
        instruction = parse_instruction(text)
        if instruction.name not in INSTRUCTIONS:
            raise InvalidArgument(
                f"{instruction.name} is not supported; use {', '.join(INSTRUCTIONS)}"
            )
        if instruction.flags:
            raise InvalidArgument(f"{instruction.name} takes no flags ({instruction.flags[0]})")
    except InvalidArgument as e:
        raise InvalidArgument(f"invalid --change {quoted(text)}: {e}") from None
    return instruction


def parse_changes(changes: Iterable[str]) -> list[Instruction]:
    """Every change, parsed and checked, so a bad one fails before anything is touched."""
    return [parse_change(text) for text in changes]


def apply_instruction(config: dict[str, Any], instruction: Instruction, state: ChangeState) -> None:
    """Apply one instruction to `config` (changed in place)."""
    handler = INSTRUCTIONS.get(instruction.name)
    if handler is None:
        raise InvalidArgument(f"{instruction.name} is not supported; use {', '.join(INSTRUCTIONS)}")
    handler(config, instruction, state)


def apply_changes(config: Mapping[str, Any], changes: Iterable[str]) -> dict[str, Any]:
    """A new `config` section: `config` with the changes applied in order (Dockerfile text)."""
    result = copy.deepcopy(dict(config))
    state = ChangeState()
    for instruction in parse_changes(changes):
        try:
            apply_instruction(result, instruction, state)
        except InvalidArgument as e:
            raise InvalidArgument(f"invalid --change {quoted(instruction.original)}: {e}") from None
    return result


# --- the instructions ------------------------------------------------------------------------


def apply_cmd(config: dict[str, Any], instruction: Instruction, state: ChangeState) -> None:
    config["Cmd"] = _command(instruction)
    state.cmd_set = True


def apply_entrypoint(config: dict[str, Any], instruction: Instruction, state: ChangeState) -> None:
    # A bare ENTRYPOINT (or `ENTRYPOINT []`) clears it.
    entrypoint = _command(instruction) if instruction.args or instruction.json else []
    if entrypoint:
        config["Entrypoint"] = entrypoint
    else:
        config.pop("Entrypoint", None)
    # As in a Dockerfile: a new entrypoint drops the parent's CMD unless this batch set one.
    if not state.cmd_set:
        config.pop("Cmd", None)


def apply_env(config: dict[str, Any], instruction: Instruction, state: ChangeState) -> None:
    for key, raw in _pairs(instruction):
        if not key:
            raise InvalidArgument("ENV names must not be empty")
        value = _expand(raw, config, state)
        config["Env"] = set_env(config.get("Env") or [], key, value)


def apply_label(config: dict[str, Any], instruction: Instruction, state: ChangeState) -> None:
    if not instruction.args:
        raise InvalidArgument("LABEL requires at least one key=value")
    labels = dict(config.get("Labels") or {})
    for raw_key, raw_value in _pairs(instruction):
        key = _expand(raw_key, config, state)
        if not key:
            raise InvalidArgument("LABEL names must not be empty")
        labels[key] = _expand(raw_value, config, state)
    config["Labels"] = labels


def apply_expose(config: dict[str, Any], instruction: Instruction, state: ChangeState) -> None:
    words = _words(instruction, config, state)
    if not words:
        raise InvalidArgument("EXPOSE requires at least one port")
    ports = dict(config.get("ExposedPorts") or {})
    for word in words:
        for port in expose_ports(word):
            ports[port] = {}
    config["ExposedPorts"] = ports


def apply_user(config: dict[str, Any], instruction: Instruction, state: ChangeState) -> None:
    config["User"] = _single(instruction, config, state, "a user")


def apply_workdir(config: dict[str, Any], instruction: Instruction, state: ChangeState) -> None:
    path = _single(instruction, config, state, "a path")
    if not path.startswith("/"):
        path = posixpath.join(config.get("WorkingDir") or "/", path)
    config["WorkingDir"] = posixpath.normpath(path)


def apply_volume(config: dict[str, Any], instruction: Instruction, state: ChangeState) -> None:
    paths = list(instruction.args) if instruction.json else _words(instruction, config, state)
    if not paths:
        raise InvalidArgument("VOLUME requires at least one path")
    volumes = dict(config.get("Volumes") or {})
    for path in paths:
        if not path.strip():
            raise InvalidArgument("VOLUME paths must not be empty")
        volumes[path] = {}
    config["Volumes"] = volumes


INSTRUCTIONS: dict[str, Handler] = {
    "CMD": apply_cmd,
    "ENTRYPOINT": apply_entrypoint,
    "ENV": apply_env,
    "EXPOSE": apply_expose,
    "LABEL": apply_label,
    "USER": apply_user,
    "WORKDIR": apply_workdir,
    "VOLUME": apply_volume,
}


# --- helpers ---------------------------------------------------------------------------------


def _command(instruction: Instruction) -> list[str]:
    """CMD / ENTRYPOINT: the JSON array as is, or the shell form run by /bin/sh -c."""
    if instruction.json:
        return list(instruction.args)
    if not instruction.args:
        raise InvalidArgument(f"{instruction.name} requires a command")
    return [*SHELL, " ".join(instruction.args)]


def _pairs(instruction: Instruction) -> list[tuple[str, str]]:
    """key, value pairs of ENV / LABEL (the parser yields them flattened, legacy form too)."""
    args = instruction.args
    if not args or len(args) % 2:
        raise InvalidArgument(f"{instruction.name} requires key=value pairs")
    return list(zip(args[::2], args[1::2], strict=True))


def _expand(word: str, config: Mapping[str, Any], state: ChangeState) -> str:
    return word if state.expanded else expand(word, env_map(config))


def _words(instruction: Instruction, config: Mapping[str, Any], state: ChangeState) -> list[str]:
    """Shell-form arguments with variables expanded; words that expand to nothing vanish."""
    if state.expanded:
        return [word for word in instruction.args if word]
    env = env_map(config)
    return [word for arg in instruction.args for word in expand_words(arg, env)]


def _single(
    instruction: Instruction, config: Mapping[str, Any], state: ChangeState, what: str
) -> str:
    if len(instruction.args) != 1 or instruction.json:
        raise InvalidArgument(f"{instruction.name} requires exactly one argument ({what})")
    value = _expand(instruction.args[0], config, state)
    if not value:
        raise InvalidArgument(f"{instruction.name} requires {what}")
    return value


def env_map(config: Mapping[str, Any]) -> dict[str, str]:
    """The config's Env as a dict, for variable expansion."""
    result: dict[str, str] = {}
    for item in config.get("Env") or []:
        key, _, value = str(item).partition("=")
        result[key] = value
    return result


def set_env(env: list[str], key: str, value: str) -> list[str]:
    """env with KEY=value set: an existing KEY is replaced where it stands, else appended."""
    entry = f"{key}={value}"
    result = list(env)
    for i, item in enumerate(result):
        if item.partition("=")[0] == key:
            result[i] = entry
            return result
    return [*result, entry]


def expose_ports(spec: str) -> list[str]:
    """`80`, `80/udp` or `8000-8002/tcp` -> ExposedPorts keys ("80/tcp", ...)."""
    port_range, _, protocol = spec.partition("/")
    protocol = (protocol or "tcp").lower()
    if protocol not in PROTOCOLS:
        raise InvalidArgument(
            f"EXPOSE {spec}: unknown protocol {quoted(protocol)}; use {', '.join(PROTOCOLS)}"
        )
    first, dash, last = port_range.partition("-")
    start, end = _port(first, spec), _port(last, spec) if dash else None
    if end is None:
        return [f"{start}/{protocol}"]
    if end < start:
        raise InvalidArgument(f"EXPOSE {spec}: the range ends before it starts")
    return [f"{port}/{protocol}" for port in range(start, end + 1)]


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InvalidArgument(f"EXPOSE {spec}: invalid port {quoted(text)}; expected 1-65535")
    return int(text)
