"""Compose files for `berth stack deploy`: read the YAML, interpolate variables, check the
result against the Compose specification's JSON schema (compose-spec.json, vendored from
compose-spec/compose-spec with its NOTICE and LICENSE beside it).

The order is docker compose's: interpolation first (so `replicas: ${N:-2}` is checked as the
value it becomes), then the schema. Every problem is a ComposeError naming the path of the key
at fault, as `services.web.deploy.replcas: Additional property replcas is not allowed`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from berth.errors import BerthClientError

SCHEMA_FILE = Path(__file__).with_name("compose-spec.json")
DEFAULT_FILES = ("compose.yaml", "compose.yml", "docker-compose.yaml", "docker-compose.yml")

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, ${VAR:+alt},
# ${VAR+alt}, $VAR and $$ (a literal $), as the Compose specification's interpolation.
_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|(?P<named>[_a-zA-Z][_a-zA-Z0-9]*)"
    r"|\{(?P<braced>[_a-zA-Z][_a-zA-Z0-9]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<invalid>))"
)
_ENV_LINE = re.compile(r"(?:export\s+)?([^=\s#][^=\s]*)\s*(?:=\s*(.*))?")


class ComposeError(BerthClientError):
    """A compose file berth cannot deploy: a user mistake (exit 1, INVALID_ARGUMENT)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "INVALID_ARGUMENT")


def key_path(parts: Any) -> str:
    return ".".join(str(p) for p in parts)


# --- .env files -------------------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str | None]:
    """KEY=VALUE lines as docker compose reads .env and env_file: `#` comments, an optional
    `export `, surrounding quotes removed; a bare KEY is None (take it from the environment)."""
    values: dict[str, str | None] = {}
    try:
        text = path.read_text()
    except OSError as err:
        raise ComposeError(f"{path}: {err.strerror}") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENV_LINE.fullmatch(line)
        if not match:
            raise ComposeError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        key, value = match.groups()
        values[key] = None if value is None else _unquote(value)
    return values


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        inner = value[1:-1]
        return inner.replace("\\n", "\n") if value[0] == '"' else inner
    # An unquoted value ends at an inline comment (" #").
    return value.split(" #", 1)[0].rstrip()


def environment_of(directory: Path, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables a compose file in `directory` is interpolated with: its .env file, under
    the process environment (which wins, as in docker compose)."""
    env: dict[str, str] = {}
    dotenv = directory / ".env"
    if dotenv.is_file():
        env.update({k: v for k, v in read_env_file(dotenv).items() if v is not None})
    env.update(os.environ if environ is None else environ)
    return env


# --- interpolation ----------------------------------------------------------------------------


def interpolate(value: Any, env: Mapping[str, str], path: tuple[Any, ...] = ()) -> Any:
    """`value` with every variable of every string replaced (keys are left alone)."""
    if isinstance(value, str):
        return _substitute(value, env, path)
    if isinstance(value, dict):
        return {k: interpolate(v, env, (*path, k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, (*path, i)) for i, v in enumerate(value)]
    return value


def _substitute(text: str, env: Mapping[str, str], path: tuple[Any, ...]) -> str:
    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        if match["invalid"] is not None:
            raise ComposeError(
                f'{key_path(path)}: invalid interpolation format in "{text}": '
                "you may need to escape any $ with another $"
            )
        name = match["named"] or match["braced"]
        op, arg = match["op"], match["arg"] or ""
        value = env.get(name)
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op in ("-", ":-"):
            return _substitute(arg, env, path) if unset else str(value)
        if op in ("?", ":?"):
            if unset:
                why = arg or f"variable {name} is not set"
                raise ComposeError(f"{key_path(path)}: required variable {name}: {why}")
            return str(value)
        if op in ("+", ":+"):
            return "" if unset else _substitute(arg, env, path)
        return value or ""

    return _VARIABLE.sub(one, text)


# --- the schema -------------------------------------------------------------------------------


@functools.cache
def _validator() -> Any:
    # jsonschema is imported only by `stack deploy` (start-up time of every other command).
    import jsonschema

    schema = json.loads(SCHEMA_FILE.read_text())
    return jsonschema.Draft7Validator(schema)


def schema_errors(data: Any) -> list[str]:
    """One line per problem, `path: message`, in path order; empty when the file is valid."""
    from jsonschema.exceptions import best_match

    lines: set[str] = set()
    for error in _validator().iter_errors(data):
        if error.context:
            # oneOf/anyOf: the branch that got furthest says the most.
            error = best_match(error.context)
        lines.update(_lines(error))
    return sorted(lines)


def _lines(error: Any) -> list[str]:
    path = key_path(error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = error.schema.get("properties", {})
        patterns = error.schema.get("patternProperties", {})
        extra = [
            key
            for key in error.instance
            if key not in allowed and not any(re.search(p, str(key)) for p in patterns)
        ]
        return [
            f"{key_path((*error.absolute_path, key))}: Additional property {key} is not allowed"
            for key in extra
        ]
    return [f"{path or '(top level)'}: {error.message}"]


# --- the whole load ---------------------------------------------------------------------------


def find_file(given: str | None) -> Path:
    """-c FILE, else the first of compose.yaml, compose.yml, docker-compose.y(a)ml here."""
    if given:
        return Path(given)
    for name in DEFAULT_FILES:
        if Path(name).is_file():
            return Path(name)
    raise ComposeError(
        "no compose file given (-c FILE) and none of " + ", ".join(DEFAULT_FILES) + " here"
    )


def parse(text: str, env: Mapping[str, str], source: str = "compose file") -> dict[str, Any]:
    """The compose file's data, interpolated and checked against the schema."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ComposeError(f"{source}: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ComposeError(f"{source}: top-level object must be a mapping")
    data = interpolate(data, env)
    problems = schema_errors(data)
    if problems:
        raise ComposeError("; ".join(problems))
    if not data.get("services"):
        raise ComposeError(f"{source}: no services to deploy")
    return data


def load(path: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Read, interpolate (with `path`'s directory's .env) and check a compose file."""
    try:
        text = path.read_text()
    except OSError as err:
        raise ComposeError(f"{path}: {err.strerror}") from None
    return parse(text, environment_of(path.parent, environ), str(path))
