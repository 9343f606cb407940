"""`berth build` and `berth builder ls|prune`: Dockerfiles to images, and the build cache.

`build` prints progress like BuildKit's `--progress=plain` on stderr (each step a numbered
vertex: its header, its output with the seconds since it started, then CACHED, DONE or ERROR),
so stdout carries only what scripts want: the image id with -q, the result with --format json.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TextIO

from berth.cli.output import (
    format_options,
    human_ago,
    human_size,
    parse_duration,
    parse_label,
    print_json,
    print_line,
    print_table,
    truncate,
)
from berth.client.builder import (
    BuildCache,
    BuilderClient,
    BuildEvent,
    BuildOptions,
    BuildOutput,
    BuildProgress,
    BuildResult,
    BuildStep,
)
from berth.client.registry import parse_image_reference
from berth.config import BUILDER_HELP, resolve_service_address
from berth.dockerignore import DEFAULT_DOCKERFILE
from berth.errors import BerthClientError

STDIN = "-"
CACHE_HEADERS = ["KEY", "INSTRUCTION", "SIZE", "CREATED", "LAST USED", "USES"]
KEY_WIDTH = 12
INSTRUCTION_WIDTH = 40
PRUNE_WARNING = (
    "WARNING! This will remove all dangling build cache. Are you sure you want to continue?"
)
PRUNE_FILTER_KEYS = ("until", "unused-for")  # buildx says until; older BuildKit unused-for


# --- argument types ---------------------------------------------------------------------------


def parse_build_arg(text: str) -> tuple[str, str | None]:
    """--build-arg NAME=VALUE, or NAME alone for this shell's value (None: unset, so dropped,
    as Docker does)."""
    name, sep, value = text.partition("=")
    if not name or any(c.isspace() for c in name):
        raise argparse.ArgumentTypeError(f'invalid build arg "{text}": use NAME=VALUE or NAME')
    return (name, value) if sep else (name, os.environ.get(name))


def parse_tag(text: str) -> str:
    """-t NAME[:TAG]: a reference the image can be tagged with (no digest)."""
    try:
        reference = parse_image_reference(text)
    except BerthClientError as err:
        raise argparse.ArgumentTypeError(err.message) from None
    if reference.digest:
        raise argparse.ArgumentTypeError(f'invalid tag "{text}": a digest cannot be a tag')
    return text


def parse_prune_filter(text: str) -> timedelta:
    """--filter until=DURATION: entries unused for at least that long."""
    key, sep, value = text.partition("=")
    if not sep or key not in PRUNE_FILTER_KEYS:
        raise argparse.ArgumentTypeError(f'invalid filter "{text}": use until=DURATION, e.g. 24h')
    return timedelta(seconds=parse_duration(value))


# --- where the Dockerfile and context come from ----------------------------------------------


@dataclass(frozen=True)
class BuildSource:
    """The context directory (None: empty) and the Dockerfile: its path in the context, or its
    text when it comes from stdin or from outside the context."""

    context_dir: Path | None
    dockerfile: str
    text: str | None


def build_source(context: str, file: str | None, stdin: TextIO | None = None) -> BuildSource:
    """Resolve CONTEXT and -f as the Docker CLI does: `-` as CONTEXT is a Dockerfile on stdin
    with an empty context; -f is relative to the current directory, not to the context; a
    Dockerfile outside the context is sent as text."""
    if context == STDIN:
        if file is not None:
            raise BerthClientError(
                "-f cannot be used when the Dockerfile comes from stdin (CONTEXT -)",
                "INVALID_ARGUMENT",
            )
        return BuildSource(None, "", _read_stdin(stdin))
    root = Path(context)
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "not found"
        raise BerthClientError(
            f'unable to prepare context: path "{context}" {what}', "INVALID_ARGUMENT"
        )
    if file == STDIN:
        return BuildSource(root, "", _read_stdin(stdin))
    path = Path(file) if file else _default_dockerfile(root)
    if not path.is_file():
        raise BerthClientError(f"cannot find the Dockerfile {path}", "INVALID_ARGUMENT")
    try:
        inside = path.resolve().relative_to(root.resolve())
    except ValueError:
        return BuildSource(root, "", _non_empty(path.read_text(encoding="utf-8"), str(path)))
    return BuildSource(root, inside.as_posix(), None)


def _default_dockerfile(root: Path) -> Path:
    """CONTEXT/Dockerfile, else CONTEXT/dockerfile (the Docker CLI accepts both)."""
    path = root / DEFAULT_DOCKERFILE
    lower = root / DEFAULT_DOCKERFILE.lower()
    return lower if not path.exists() and lower.is_file() else path


def _read_stdin(stdin: TextIO | None) -> str:
    return _non_empty((stdin or sys.stdin).read(), "from stdin")


def _non_empty(text: str, where: str) -> str:
    # An empty text would read as "no text given" and send the builder looking in the context.
    if not text.strip():
        raise BerthClientError(f"the Dockerfile {where} is empty", "INVALID_ARGUMENT")
    return text


def build_options(args: argparse.Namespace, dockerfile: str) -> BuildOptions:
    return BuildOptions(
        dockerfile=dockerfile,
        build_args={name: value for name, value in args.build_arg if value is not None},
        target=args.target or "",
        tags=args.tag,
        no_cache=args.no_cache,
        labels=dict(args.label),
    )


# --- progress -----------------------------------------------------------------------------


class PlainProgress:
    """BuildKit's plain progress from the builder's events; the client's on_event callback.

    Every step is a vertex `#N` numbered in order of appearance, its output lines under it;
    the context the builder received is one (`[internal] load build context`); consecutive
    lines for people (warnings, the export) share one; `finish` adds the image to the export
    vertex from the result."""

    def __init__(self, out: TextIO, clock: Callable[[], float] = time.monotonic) -> None:
        self._out = out
        self._clock = clock
        self._count = 0
        self._steps: dict[int, int] = {}  # step number -> vertex
        self._started: dict[int, float] = {}  # step number -> when it began running
        self._context: int | None = None  # the context's vertex
        self._messages: int | None = None  # the vertex consecutive messages go to
        self._said: dict[str, str] = {}  # progress id -> the message shown last
        self._export_seconds: float | None = None
        self._last_event = clock()

    def __call__(self, event: BuildEvent) -> None:
        self._last_event = self._clock()
        if isinstance(event, BuildStep):
            self._messages = None
            self._step(event)
        elif isinstance(event, BuildOutput):
            self._output(event)
        elif isinstance(event, BuildProgress):
            if event.id == "context":
                self._messages = None
                self._context_progress(event)
            else:
                self._progress(event)

    def finish(self, result: BuildResult) -> None:
        """The export vertex: the image id and its names (after the builder's own export
        messages, if it sent some)."""
        vertex = self._messages
        if vertex is None:
            vertex = self._vertex()
            self._line(vertex, "exporting to image")
        self._line(vertex, f"writing image {result.id} done")
        for tag in result.tags:
            self._line(vertex, f"naming to {tag} done")
        seconds = self._export_seconds
        if seconds is None:
            seconds = self._clock() - self._last_event
        self._line(vertex, f"DONE {seconds:.1f}s")

    def _context_progress(self, p: BuildProgress) -> None:
        if self._context is None:
            self._context = self._vertex()
            self._line(self._context, "[internal] load build context")
        if p.state == "DONE":
            self._line(self._context, f"transferring context: {human_size(p.current)} done")
            self._line(self._context, f"DONE {p.duration or 0.0:.1f}s")

    def _progress(self, p: BuildProgress) -> None:
        """A line for people that belongs to no step: shown once per item and message."""
        if p.id == "export" and p.state == "DONE":
            self._export_seconds = p.duration
        if not p.message or self._said.get(p.id) == p.message:
            return
        self._said[p.id] = p.message
        if self._messages is None:
            self._messages = self._vertex()
        self._line(self._messages, p.message)

    def _step(self, e: BuildStep) -> None:
        vertex = self._step_vertex(e.number, e)
        if e.status == "RUNNING":
            self._started.setdefault(e.number, self._clock())
        elif e.status == "CACHED":
            self._line(vertex, "CACHED")
        elif e.status == "DONE":
            if e.layer_digest:
                self._line(vertex, f"writing layer {e.layer_digest} done")
            self._line(vertex, f"DONE {e.duration or 0.0:.1f}s")
        elif e.status == "FAILED":
            failed = e.exit_code is not None
            self._line(vertex, f"ERROR: exit code: {e.exit_code}" if failed else "ERROR")

    def _output(self, o: BuildOutput) -> None:
        self._messages = None
        vertex = self._step_vertex(o.step, None)
        now = self._clock()
        elapsed = now - self._started.setdefault(o.step, now)
        text = o.data.decode(errors="replace").removesuffix("\n")
        self._line(vertex, f"{elapsed:.3f} {text}")

    def _step_vertex(self, number: int, e: BuildStep | None) -> int:
        """The step's vertex, made (with its header) when the step first shows up."""
        vertex = self._steps.get(number)
        if vertex is None:
            vertex = self._steps[number] = self._vertex()
            if e is not None:
                where = f"{e.stage} {e.number}/{e.total}" if e.stage else f"{e.number}/{e.total}"
                self._line(vertex, f"[{where}] {e.instruction}")
        return vertex

    def _vertex(self) -> int:
        self._count += 1
        return self._count

    def _line(self, vertex: int, text: str) -> None:
        self._out.write(f"#{vertex} {text}\n")
        self._out.flush()


# --- parsers ----------------------------------------------------------------------------------


def builder_options() -> argparse.ArgumentParser:
    """--builder on a subcommand; SUPPRESS keeps it from overwriting the global flag."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--builder", metavar="ADDR", default=argparse.SUPPRESS, help=BUILDER_HELP)
    return parent


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `build` and `builder ...` (the global --builder option is main's)."""
    common = [builder_options(), format_options()]

    build = commands.add_parser("build", parents=common, help="build an image from a Dockerfile")
    add = build.add_argument
    add(
        "-t",
        "--tag",
        action="append",
        type=parse_tag,
        default=[],
        metavar="NAME[:TAG]",
        help="name the image (repeatable)",
    )
    add(
        "-f",
        "--file",
        metavar="DOCKERFILE",
        help="the Dockerfile (default CONTEXT/Dockerfile; - for stdin)",
    )
    add(
        "--build-arg",
        action="append",
        type=parse_build_arg,
        default=[],
        metavar="NAME[=VALUE]",
        help="set a build-time variable; NAME alone passes this shell's value (repeatable)",
    )
    add("--target", metavar="STAGE", help="build this stage (default: the last)")
    add("--no-cache", action="store_true", help="build every step, ignoring the cache")
    add(
        "--label",
        action="append",
        type=parse_label,
        default=[],
        metavar="KEY=VALUE",
        help="add a label to the image (repeatable)",
    )
    add("-q", "--quiet", action="store_true", help="print only the image id")
    add(
        "context",
        metavar="CONTEXT",
        help="the build context directory; - for a Dockerfile on stdin",
    )
    build.set_defaults(func=cmd_build)

    builder = commands.add_parser("builder", help="manage the build cache")
    sub = builder.add_subparsers(dest="builder_command", metavar="COMMAND", required=True)
    ls = sub.add_parser("ls", parents=common, help="list the build cache")
    ls.add_argument("--no-trunc", action="store_true", help="do not truncate instructions")
    ls.set_defaults(func=cmd_builder_ls)
    prune = sub.add_parser("prune", parents=common, help="remove build cache")
    prune.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    prune.add_argument(
        "--filter",
        type=parse_prune_filter,
        default=None,
        metavar="until=DURATION",
        help="only entries unused for this long, e.g. until=24h",
    )
    prune.set_defaults(func=cmd_builder_prune)


def connect_builder(args: argparse.Namespace) -> BuilderClient:
    return BuilderClient(resolve_service_address("builder", args.builder))


# --- commands ---------------------------------------------------------------------------------


def cmd_build(args: argparse.Namespace) -> int:
    source = build_source(args.context, args.file)
    options = build_options(args, source.dockerfile)
    # Quiet builds keep the progress, to show it when the build fails (as `docker build -q`).
    log = io.StringIO() if args.quiet else sys.stderr
    progress = PlainProgress(log)
    with connect_builder(args) as client:
        try:
            result = client.build(
                source.context_dir, options, dockerfile_text=source.text, on_event=progress
            )
        except BerthClientError:
            if isinstance(log, io.StringIO):
                sys.stderr.write(log.getvalue())
                sys.stderr.flush()
            raise
    progress.finish(result)
    if args.format == "json":
        print_json(result)
    elif args.quiet:
        print_line(result.id)
    return 0


def cmd_builder_ls(args: argparse.Namespace) -> int:
    with connect_builder(args) as client:
        cache = client.list_cache()
    if args.format == "json":
        print_json(cache)
    else:
        print_table(CACHE_HEADERS, cache_rows(cache, no_trunc=args.no_trunc))
    return 0


def cmd_builder_prune(args: argparse.Namespace) -> int:
    if not args.force and not confirm(PRUNE_WARNING):
        return 0
    with connect_builder(args) as client:
        report = client.prune_cache(args.filter)
    if args.format == "json":
        print_json(report)
    else:
        print_line(f"Deleted build cache entries: {report.deleted}")
        print_line(f"Total reclaimed space: {human_size(report.reclaimed_bytes)}")
    return 0


def confirm(question: str, stdin: TextIO | None = None) -> bool:
    """Docker's `[y/N]` prompt on stdout: only y or yes (any case) says yes; EOF says no."""
    sys.stdout.write(f"{question} [y/N] ")
    sys.stdout.flush()
    answer = (stdin or sys.stdin).readline()
    if not answer.endswith("\n"):
        sys.stdout.write("\n")  # EOF: end the prompt's line
    return answer.strip().lower() in ("y", "yes")


# --- rendering --------------------------------------------------------------------------------


def cache_rows(cache: BuildCache, no_trunc: bool = False) -> list[list[str]]:
    return [
        [
            e.key[:KEY_WIDTH],
            e.instruction if no_trunc else truncate(e.instruction, INSTRUCTION_WIDTH),
            human_size(e.size),
            human_ago(e.created_at),
            human_ago(e.last_used_at),
            str(e.uses),
        ]
        for e in cache.entries
    ]
