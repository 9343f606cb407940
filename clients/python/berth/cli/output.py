"""How the CLI prints: rich tables for people, JSON for scripts, one error line for failures."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from berth.config import HOST_HELP
from berth.errors import BerthClientError, one_line

if TYPE_CHECKING:
    from rich.console import Console

FORMATS = ("table", "json")
# Piped output is for grep/awk: never wrap or cut it to a pretend terminal width.
_WIDE = 100_000


def console(wide: bool = False) -> Console:
    """A console on the current stdout. Long lines are left to the terminal to wrap (soft_wrap)
    and rich's syntax colouring is off: output should read like Docker's. `wide` renders
    tables at their natural width, as Docker does, instead of squeezing them to the terminal."""
    from rich.console import Console  # on first use: JSON output and errors need no rich

    plain = Console(file=sys.stdout, highlight=False, soft_wrap=True)
    if plain.is_terminal and not wide:
        return plain
    return Console(file=sys.stdout, highlight=False, soft_wrap=True, width=_WIDE)


def print_error(message: object) -> None:
    """The only way the CLI reports a failure: one `Error: ...` line on stderr."""
    print(f"Error: {one_line(str(message)) or 'unknown error'}", file=sys.stderr, flush=True)


def print_line(text: str = "") -> None:
    # Plain text needs no rich (its import is a good part of a short command's start-up).
    sys.stdout.write(f"{text}\n")


# A cell is one line: a tab or line break in data would break the columns.
_ONE_LINE = str.maketrans("\t\n\r\v\f", "     ")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Docker-style table: upper-case headers, no borders, three spaces between columns, widths
    in characters (as Docker's tabwriter), the header bold on a terminal; no trailing blanks,
    which only get in the way of scripts."""
    lines = [list(headers)] + [[cell.translate(_ONE_LINE) for cell in row] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    text = [
        "   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    if sys.stdout.isatty():
        text[0] = f"\033[1m{text[0]}\033[0m"
    sys.stdout.write("".join(line + "\n" for line in text))


def print_fields(fields: Sequence[tuple[str, str]]) -> None:
    """`Key:   value` lines with aligned values, for one object."""
    width = max((len(key) for key, _ in fields), default=0) + 2
    for key, value in fields:
        print_line(f"{key + ':':<{width}}{value}")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(jsonable(data), indent=2) + "\n")


def jsonable(value: Any) -> Any:
    """Dataclasses, datetimes and containers as plain JSON values."""
    import dataclasses  # here: `berth --help` imports this module and needs no dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return format_time(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC, as Docker prints times."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def human_size(size: float) -> str:
    """Decimal units with three significant digits, like Docker: 528B, 45.6kB, 12.3MB."""
    units = ("B", "kB", "MB", "GB", "TB", "PB")
    unit = 0
    while size >= 999.5 and unit < len(units) - 1:
        size /= 1000
        unit += 1
    return f"{size:.3g}{units[unit]}"


def human_ago(when: datetime | None, now: datetime | None = None) -> str:
    """Docker's relative times: "3 hours ago", "About a minute ago"; "-" when unknown."""
    if when is None:
        return "-"
    seconds = ((now or datetime.now(UTC)) - when).total_seconds()
    minutes, hours, days = seconds / 60, seconds / 3600, seconds / 86400
    if seconds < 1:
        text = "Less than a second"
    elif seconds < 2:
        text = "1 second"
    elif seconds < 60:
        text = f"{int(seconds)} seconds"
    elif minutes < 2:
        text = "About a minute"
    elif minutes < 60:
        text = f"{int(minutes)} minutes"
    elif hours < 2:
        text = "About an hour"
    elif hours < 48:
        text = f"{int(hours)} hours"
    elif days < 14:
        text = f"{int(days)} days"
    elif days < 60:
        text = f"{int(days // 7)} weeks"
    elif days < 730:
        text = f"{int(days // 30)} months"
    else:
        text = f"{int(days // 365)} years"
    return f"{text} ago"


def truncate(text: str, width: int) -> str:
    """Cut text to width characters, ending in "..." when cut, as `docker search` does."""
    text = one_line(text)
    return text if len(text) <= width else text[: width - 3] + "..."


def short_digest(digest: str) -> str:
    """The 12 hex digits Docker shows for a layer."""
    return digest.partition(":")[2][:12] or digest


# --- several targets (`docker rm a b c`) ------------------------------------------------------

# The server itself is away: every other target would fail the same way, so stop at once.
_UNREACHABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def for_each(targets: Iterable[str], action: Callable[[str], None]) -> None:
    """Run action on every target, as Docker does, even after one fails; then fail with one
    error that joins the failures, so a good target is never skipped because of a bad one."""
    failures: list[BerthClientError] = []
    for target in targets:
        try:
            action(target)
        except BerthClientError as err:
            if err.code in _UNREACHABLE:
                raise
            failures.append(err)
    if len(failures) == 1:
        raise failures[0]
    if failures:
        raise BerthClientError("; ".join(err.message for err in failures), failures[0].code)


def err_console() -> Console:
    """Where progress goes when stdout carries data (an id, an archive, a container's output)."""
    from rich.console import Console

    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def inspect_each(targets: Iterable[str], describe: Callable[[str], Any]) -> None:
    """Docker's inspect: a JSON array whatever --format says, and what was found prints even
    when some target was not (the error follows)."""
    found: list[Any] = []
    try:
        for_each(targets, lambda target: found.append(describe(target)))
    finally:
        if found:
            print_json(found)


def print_listing(
    args: argparse.Namespace,
    items: Sequence[Any],
    headers: Sequence[str],
    rows: Callable[[Sequence[Any]], Sequence[Sequence[str]]],
    quiet: Callable[[Any], str],
) -> None:
    """An `ls`: JSON with --format json, one `quiet(item)` per line with -q, else the table."""
    if args.format == "json":
        print_json(items)
    elif args.quiet:
        for item in items:
            print_line(quiet(item))
    else:
        print_table(headers, rows(items))


# Parser pieces every command module shares (here, not in a command module, so importing them
# loads no gRPC client).


def format_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--format",
        choices=FORMATS,
        default=argparse.SUPPRESS,
        help="table for people (default), json for scripts",
    )
    return parent


def parse_label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f'invalid label "{text}": expected KEY=VALUE')
    return key.strip(), value


def host_options() -> argparse.ArgumentParser:
    """--host on a subcommand; SUPPRESS keeps it from overwriting the global flag."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--host", metavar="ADDR", default=argparse.SUPPRESS, help=HOST_HELP)
    return parent


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """Seconds in "30s", "10m", "1h", "1h30m", "1.5d" or bare "90"; fractions round up."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    if not text or not re.fullmatch(rf"(?:{_DURATION_RE.pattern})+", text):
        raise argparse.ArgumentTypeError(
            f'invalid duration "{text}": use numbers with units ms, s, m, h, d (30s, 10m, 1h30m)'
        )
    total = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_RE.findall(text))
    return math.ceil(total)
