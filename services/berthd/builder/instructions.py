"""What an evaluated Dockerfile step does to the image config, its history line, RUN's argv.

CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, USER, WORKDIR and VOLUME go through
`berthd.common.changes`, the same code as `commit --change`. A Step's words are already
expanded in the stage's scope (which also holds the ARGs and the `# escape=` character), so
those handlers are told not to expand them again (`ChangeState.expanded`). CMD and ENTRYPOINT
in shell form
are handed over in JSON form with the config's Shell, which is what Docker runs them with.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from berthd.builder.dockerfile import DockerfileError, Step, healthcheck_config
from berthd.common import changes
from berthd.common.errors import InvalidArgument
from berthd.common.substitute import split_key_values

DEFAULT_SHELL = ("/bin/sh", "-c")
# A signal by name (SIGTERM, TERM, SIGRTMIN+3) or by number.
_SIGNAL = re.compile(r"(?:SIG)?[A-Z][A-Z0-9]*(?:[+-][0-9]+)?|[0-9]+")
# Docker marks the history of steps the builder ran (RUN, COPY, ADD) this way.
_BUILDKIT = " # buildkit"

Handler = Callable[[dict[str, Any], Step], None]


def apply_instruction(config: Mapping[str, Any], step: Step) -> dict[str, Any]:
    """A new image config `config` section: `config` after `step`. Instructions that only
    touch the filesystem (RUN, COPY, ADD) or the build's scope (ARG) leave it as it is."""
    result = copy.deepcopy(dict(config))
    handler = _HANDLERS.get(step.instruction.cmd)
    if handler is None:
        return result
    try:
        handler(result, step)
    except DockerfileError:
        raise
    except InvalidArgument as e:
        raise DockerfileError(step.instruction.line, str(e)) from None
    return result


def shell(config: Mapping[str, Any]) -> list[str]:
    """The shell that shell-form RUN, CMD and ENTRYPOINT run with (SHELL sets it)."""
    return list(config.get("Shell") or DEFAULT_SHELL)


def shell_command(step: Step, config: Mapping[str, Any]) -> list[str]:
    """RUN's argv: the exec form as written, the shell form run by the config's shell."""
    if step.instruction.json:
        return list(step.words)
    return [*shell(config), *step.words]


def history_text(step: Step, config: Mapping[str, Any]) -> str:
    """The history entry's created_by, as BuildKit writes it; `config` is the config before the
    step (RUN's shell, WORKDIR's base)."""
    instruction = step.instruction
    cmd, words = instruction.cmd, step.words
    if cmd == "RUN":
        # Docker shows the build args RUN saw: `RUN |2 A=1 B=2 /bin/sh -c make`.
        args = [f"|{len(step.used_args)}", *(f"{k}={v}" for k, v in step.used_args)]
        argv = shell_command(step, config)
        return "RUN " + " ".join([*(args if step.used_args else []), *argv]) + _BUILDKIT
    if cmd in ("COPY", "ADD"):
        return f"{cmd} {' '.join(words)}{_BUILDKIT}"
    if cmd in ("ENV", "LABEL"):
        return f"{cmd} " + " ".join(f"{k}={v}" for k, v in split_key_values(words))
    if cmd in ("CMD", "ENTRYPOINT"):
        key = "Cmd" if cmd == "CMD" else "Entrypoint"
        return f"{cmd} {_go_quoted(apply_instruction(config, step).get(key) or [])}"
    if cmd == "WORKDIR":
        return f"WORKDIR {apply_instruction(config, step)['WorkingDir']}"
    if cmd in ("HEALTHCHECK", "SHELL"):
        return instruction.original
    return f"{cmd} {' '.join(words)}"


def author(step: Step) -> str | None:
    """MAINTAINER's name, for the image config's top-level `author` (outside `config`)."""
    return step.words[0] if step.instruction.cmd == "MAINTAINER" else None


# --- the instructions ------------------------------------------------------------------------


def _command(config: dict[str, Any], step: Step) -> None:
    """CMD and ENTRYPOINT, through changes with the shell form made explicit."""
    args = step.words
    if args and not step.instruction.json:
        args = (*shell(config), *args)
    json_form = step.instruction.json or bool(args)
    change = _change(step, args, json_form=json_form)
    state = changes.ChangeState(cmd_set=step.cmd_set)
    changes.apply_instruction(config, change, state)


def _expanded(config: dict[str, Any], step: Step) -> None:
    """Handlers in changes, told the step's words are expanded already (ARGs included)."""
    change = _change(step, step.words, json_form=False)
    changes.apply_instruction(config, change, changes.ChangeState(expanded=True))


def _env(config: dict[str, Any], step: Step) -> None:
    for key, value in split_key_values(step.words):
        config["Env"] = changes.set_env(config.get("Env") or [], key, value)


def _volume(config: dict[str, Any], step: Step) -> None:
    # JSON form: changes takes the paths as they are, so one path with spaces stays one.
    changes.apply_instruction(
        config, _change(step, step.words, json_form=True), changes.ChangeState()
    )


def _shell(config: dict[str, Any], step: Step) -> None:
    config["Shell"] = list(step.words)


def _stopsignal(config: dict[str, Any], step: Step) -> None:
    signal = step.words[0]
    if not _SIGNAL.fullmatch(signal):
        raise InvalidArgument(f"STOPSIGNAL {signal}: expected a signal name or number")
    config["StopSignal"] = signal


def _healthcheck(config: dict[str, Any], step: Step) -> None:
    config["Healthcheck"] = healthcheck_config(step.words, step.instruction.json, step.flags)


def _onbuild(config: dict[str, Any], step: Step) -> None:
    config["OnBuild"] = [*(config.get("OnBuild") or []), step.words[0]]


_HANDLERS: dict[str, Handler] = {
    "CMD": _command,
    "ENTRYPOINT": _command,
    "ENV": _env,
    "EXPOSE": _expanded,
    "LABEL": _expanded,
    "USER": _expanded,
    "WORKDIR": _expanded,
    "VOLUME": _volume,
    "SHELL": _shell,
    "STOPSIGNAL": _stopsignal,
    "HEALTHCHECK": _healthcheck,
    "ONBUILD": _onbuild,
}


# --- helpers ---------------------------------------------------------------------------------


def _change(step: Step, args: Sequence[str], json_form: bool) -> changes.Instruction:
    instruction = step.instruction
    return changes.Instruction(instruction.cmd, tuple(args), json_form, (), instruction.original)


def _go_quoted(argv: Sequence[str]) -> str:
    """A list as Go's %q prints it, which is how BuildKit records CMD and ENTRYPOINT."""
    return "[" + " ".join(json.dumps(arg, ensure_ascii=False) for arg in argv) + "]"
