"""`berth pull`, `berth images`, `berth rmi`: images on a node agent, in Docker's words.

Also what every command that talks to a node shares: the --node option, the connection, and
Docker's way with several targets (`docker rm a b c`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable

from rich.console import Console

from berth.cli.output import (
    console,
    human_size,
    print_json,
    print_line,
    print_table,
    short_digest,
)
from berth.cli.progress import LayerLine, LayerProgress, docker_bar
from berth.cli.registry_cmds import format_options
from berth.client.node import ImageInfo, NodeClient, PullProgress
from berth.client.registry import parse_image_reference
from berth.config import resolve_service_address
from berth.errors import BerthClientError

NODE_HELP = "node agent address HOST:PORT (default: $BERTH_NODE, else the `berthd up` cluster)"
FINAL_LAYER_STATES = ("Pull complete", "Already exists")
# The node itself is away: every other target would fail the same way, so stop at once.
_UNREACHABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED")


# --- shared by the node commands -------------------------------------------------------------


def node_options() -> argparse.ArgumentParser:
    """--node on a subcommand; SUPPRESS keeps it from overwriting the global flag."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--node", metavar="ADDR", default=argparse.SUPPRESS, help=NODE_HELP)
    return parent


def connect_node(args: argparse.Namespace) -> NodeClient:
    return NodeClient(resolve_service_address("node", args.node))


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
    """Where `run` reports a pull: stderr, so stdout carries only the container's output."""
    return Console(file=sys.stderr, highlight=False, soft_wrap=True)


def image_name(image: str) -> str:
    """The name Docker reports: `busybox` is `busybox:latest`."""
    reference = parse_image_reference(image)
    return str(reference) if reference.tag or reference.digest else f"{image}:latest"


# --- pull progress ----------------------------------------------------------------------------


class PullDisplay:
    """The client's progress callback: the node's pull events as Docker's per-layer lines."""

    def __init__(self, display: LayerProgress) -> None:
        self._display = display
        self._lines: dict[str, LayerLine] = {}
        self.fetched = False  # whether any layer had to be downloaded (else "up to date")

    def __call__(self, event: PullProgress) -> None:
        if not event.layer:
            return
        line = self._lines.get(event.layer)
        if line is None:
            line = self._lines[event.layer] = self._display.add(event.layer, event.total)
        if event.state != "Already exists":
            self.fetched = True
        if event.state in FINAL_LAYER_STATES:
            line.finish(event.state)
        elif event.state == "Downloading":
            line.update(event.current, event.total)
        elif event.state == "Extracting" and event.total > 0:
            self._show(line, f"Extracting {docker_bar(event.current, event.total)}")
        else:
            self._show(line, event.state)

    def _show(self, line: LayerLine, status: str) -> None:
        # LayerLine knows only its download bar and final statuses. Docker also shows the states
        # between (Verifying Checksum, Extracting) on the live line; piped output skips them.
        self._display.set(line._task, active=False, status=status)


def pull_image(client: NodeClient, image: str, out: Console) -> ImageInfo:
    """Pull onto the node with Docker's progress lines, written to out."""
    reference = parse_image_reference(image)
    out.print(f"{reference.reference}: Pulling from {reference.repository}", markup=False)
    with LayerProgress(out, "Downloading") as display:
        progress = PullDisplay(display)
        pulled = client.pull(image, progress)
    out.print(f"Digest: {pulled.digest}", markup=False)
    outcome = "Downloaded newer image for" if progress.fetched else "Image is up to date for"
    out.print(f"Status: {outcome} {image_name(image)}", markup=False)
    return pulled


# --- parsers ----------------------------------------------------------------------------------


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `pull`, `images` and `rmi` on the top-level subcommands."""
    pull = commands.add_parser(
        "pull", parents=[node_options()], help="pull an image from the registry onto the node"
    )
    pull.add_argument("image", metavar="IMAGE", help="REPO[:TAG|@DIGEST] (TAG default: latest)")
    pull.set_defaults(func=cmd_pull)

    images = commands.add_parser(
        "images", parents=[node_options(), format_options()], help="list the node's images"
    )
    images.set_defaults(func=cmd_images)

    rmi = commands.add_parser(
        "rmi", parents=[node_options()], help="remove images from the node (shared layers stay)"
    )
    rmi.add_argument("images", nargs="+", metavar="IMAGE", help="reference or manifest digest")
    rmi.set_defaults(func=cmd_rmi)


# --- commands ---------------------------------------------------------------------------------


def cmd_pull(args: argparse.Namespace) -> int:
    reference = parse_image_reference(args.image)  # a bad name fails before connecting
    with connect_node(args) as client:
        if not reference.tag and not reference.digest:
            print_line("Using default tag: latest")
        pull_image(client, args.image, console())
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    with connect_node(args) as client:
        images = client.images()
    if args.format == "json":
        print_json(images)
    else:
        print_table(["REPOSITORY", "TAG", "IMAGE ID", "SIZE"], image_rows(images))
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    with connect_node(args) as client:

        def remove(image: str) -> None:
            deleted = client.remove_image(image)
            by_digest = "@" in image or image.startswith("sha256:")
            lines = [] if by_digest else [f"Untagged: {image_name(image)}"]
            print_line("\n".join([*lines, *(f"Deleted: {layer}" for layer in deleted)]))

        for_each(args.images, remove)
    return 0


# --- rendering --------------------------------------------------------------------------------


def image_rows(images: Iterable[ImageInfo]) -> list[list[str]]:
    """One row per reference, as Docker lists a tagged image once per tag."""
    rows = []
    for image in images:
        image_id, size = short_digest(image.config_digest), human_size(image.size)
        for repository, tag in _repository_tags(image.references):
            rows.append([repository, tag, image_id, size])
    return sorted(rows)


def _repository_tags(references: list[str]) -> list[tuple[str, str]]:
    if not references:
        return [("<none>", "<none>")]
    pairs = []
    for text in references:
        try:
            reference = parse_image_reference(text)
        except BerthClientError:  # a name this client's grammar lacks: show it, do not fail
            pairs.append((text, "<none>"))
        else:
            pairs.append((reference.repository, reference.tag or "<none>"))
    return pairs
