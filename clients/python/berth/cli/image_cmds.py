"""`berth images`, `image ...`, `history`, `tag`, `rmi`, `commit`, `import`, `save`, `load`, `pull`,
`push`, `login`, `logout`: the cluster's image catalog through the image service, in Docker's
words and output shapes.

`images`, `rmi` and `pull` also keep their single-host form, a node agent's own image cache
(config.IMAGE_RULE). Also here, what every command that talks to a node shares: the --node
option, the node pull display, and Docker's way with several targets (`docker rm a b c`).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Iterable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from berth.cli import auth
from berth.cli.output import (
    console,
    err_console,
    for_each,
    format_options,
    format_time,
    human_ago,
    human_size,
    inspect_each,
    print_json,
    print_line,
    print_table,
    short_digest,
)
from berth.client.image import (
    ARCHIVE_FORMATS,
    CommitProgress,
    ExternalReference,
    HistoryStep,
    ImageClient,
    ImageDetails,
    ImageSummary,
    ProgressEvent,
    Removal,
    TransferProgress,
    parse_external_reference,
)
from berth.client.node import ImageInfo, NodeClient, PullProgress
from berth.client.registry import parse_image_reference
from berth.config import IMAGE_SERVICE_HELP, image_cache_node, resolve_service_address
from berth.errors import BerthClientError
from berth.files import atomic_file

# rich and the progress displays are imported by the commands that show a transfer: `images`,
# `history` and the like print plain text, without them.
if TYPE_CHECKING:
    from rich.console import Console

    from berth.cli.progress import ByteProgress, LayerProgress, TransferDisplay

NODE_HELP = "act on this node agent's own image cache HOST:PORT instead of the catalog"
CREATED_BY_WIDTH = 45  # what `docker history` keeps of CREATED BY without --no-trunc
# Dockerfile instructions `commit -c` and `import -c` apply (Docker's list, less ONBUILD).
CHANGE_INSTRUCTIONS = ("CMD", "ENTRYPOINT", "ENV", "EXPOSE", "LABEL", "USER", "VOLUME", "WORKDIR")
PRUNE_WARNING = "WARNING! This will remove all dangling images."
PRUNE_ALL_WARNING = (
    "WARNING! This will remove all images without at least one container associated to them."
)
SAVE_TO_TERMINAL = "cowardly refusing to save to a terminal. Use the -o flag or redirect"
EXAMPLE_REGISTRY = "127.0.0.1:5000"
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


# --- shared by every command that talks to nodes or several targets ---------------------------


def node_options() -> argparse.ArgumentParser:
    """--node on a subcommand; SUPPRESS keeps it from overwriting the global flag."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--node", metavar="ADDR", default=argparse.SUPPRESS, help=NODE_HELP)
    return parent


def image_name(image: str) -> str:
    """The name Docker reports: `busybox` is `busybox:latest`."""
    reference = parse_external_reference(image)
    name = reference.name
    return image if name.tag or name.digest else f"{image}:latest"


# --- the image service ------------------------------------------------------------------------


def service_options() -> argparse.ArgumentParser:
    """--image-service on a subcommand; SUPPRESS keeps it from overwriting the global flag."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--image-service", metavar="ADDR", default=argparse.SUPPRESS, help=IMAGE_SERVICE_HELP
    )
    return parent


def connect_images(args: argparse.Namespace) -> ImageClient:
    address = resolve_service_address("image", args.image_service, option="--image-service")
    return ImageClient(address)


def cache_node(args: argparse.Namespace) -> str | None:
    """The node whose own cache `images`, `rmi` or `pull` act on, or None (config.IMAGE_RULE)."""
    return image_cache_node(args.image_service, args.node)


# --- argument types ---------------------------------------------------------------------------


def local_reference(text: str, what: str) -> ExternalReference:
    """A name in berth's registry; a name with a registry host is refused, naming the fix."""
    reference = parse_external_reference(text)
    if reference.host is not None:
        raise BerthClientError(
            f'{what} "{text}" names the external registry {reference.host}; {what} takes a '
            f'name in berth\'s registry (drop "{reference.host}/")',
            "INVALID_ARGUMENT",
        )
    return reference


def new_name(text: str, what: str) -> str:
    """NAME[:TAG] for an image about to be named: local, and never a digest."""
    reference = local_reference(text, what)
    if reference.name.digest:
        raise BerthClientError(
            f'{what} "{text}" has a digest: name the new image NAME[:TAG]; its digest follows '
            "from its content",
            "INVALID_ARGUMENT",
        )
    return str(reference)


def parse_change(text: str) -> str:
    """-c "CMD [...]": one Dockerfile instruction of those commit and import apply."""
    instruction = text.strip().split(maxsplit=1)[0].upper() if text.strip() else ""
    if instruction not in CHANGE_INSTRUCTIONS:
        raise argparse.ArgumentTypeError(
            f'invalid change "{text}": use a Dockerfile instruction, one of '
            f"{', '.join(CHANGE_INSTRUCTIONS)} (e.g. 'CMD [\"sh\"]')"
        )
    return text.strip()


def parse_image_filter(text: str) -> tuple[str, bool]:
    key, _, value = text.partition("=")
    if key != "dangling" or value.lower() not in (*_TRUE, *_FALSE):
        raise argparse.ArgumentTypeError(
            f'invalid filter "{text}": berth images filters dangling=true or dangling=false'
        )
    return key, value.lower() in _TRUE


def add_bool_flag(
    parser: argparse.ArgumentParser, short: str, name: str, help: str, negative: str
) -> None:
    """A Docker boolean flag that defaults to true: `-x`, `--name`, `--name=true`, and
    `--name=false`, `-x=false` or `--no-name` to turn it off. The `=` forms are option strings
    of their own, so `-x VALUE` never swallows the positional argument after it."""
    dest = name.replace("-", "_")
    on = [short, f"--{name}", f"--{name}=true", f"{short}=true"]
    off = [f"--no-{name}", f"--{name}=false", f"{short}=false"]
    parser.add_argument(*on, dest=dest, action="store_true", default=True, help=help)
    parser.add_argument(*off, dest=dest, action="store_false", help=negative)


# --- node pulls -------------------------------------------------------------------------------


class PullDisplay:
    """NodeClient's progress callback: the node's pull events as Docker's per-layer lines."""

    def __init__(self, display: LayerProgress) -> None:
        from berth.cli.progress import PULL, TransferDisplay

        self._lines = TransferDisplay(display, PULL)

    @property
    def fetched(self) -> bool:
        """Whether any layer had to be downloaded (else "Image is up to date")."""
        return self._lines.copied

    def __call__(self, event: PullProgress) -> None:
        self._lines.update(event.layer, event.state, event.current, event.total)


def pull_image(client: NodeClient, image: str, out: Console) -> ImageInfo:
    """Pull onto the node with Docker's progress lines, written to out."""
    from berth.cli.progress import LayerProgress

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

Builder = Callable[[argparse.ArgumentParser], None]


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the top-level image commands and `image ...` (Docker's `docker image` aliases)."""
    data = [service_options(), format_options()]
    cached = [node_options(), *data]
    top_level: list[tuple[str, str, list[argparse.ArgumentParser], Builder]] = [
        ("images", "list images", cached, _images_parser),
        ("history", "show the history of an image", data, _history_parser),
        ("tag", "give an image another name", data, _tag_parser),
        ("rmi", "remove images (layers other images use stay)", cached, _rmi_parser),
        ("commit", "make an image from a container's changes", data, _commit_parser),
        ("import", "make an image from a root filesystem tarball", data, _import_parser),
        ("save", "write images to a tar archive", [service_options()], _save_parser),
        ("load", "read images from a tar archive", data, _load_parser),
        ("pull", "copy an image from an external registry", cached, _pull_parser),
        ("push", "copy an image to an external registry", data, _push_parser),
        ("login", "log in to the cluster (a token) or an external registry", [], _login_parser),
        ("logout", "forget the cluster token or a registry's credentials", [], _logout_parser),
    ]
    for name, help, parents, build in top_level:
        build(commands.add_parser(name, parents=parents, help=help, description=help))

    image = commands.add_parser("image", help="manage images (as `docker image`)")
    sub = image.add_subparsers(dest="image_command", metavar="COMMAND", required=True)
    grouped: list[tuple[str, list[str], str, list[argparse.ArgumentParser], Builder]] = [
        ("ls", ["list"], "list images", cached, _images_parser),
        ("inspect", [], "show images in detail, as JSON", data, _inspect_parser),
        ("history", [], "show the history of an image", data, _history_parser),
        ("tag", [], "give an image another name", data, _tag_parser),
        ("rm", ["remove"], "remove images", cached, _rmi_parser),
        ("prune", [], "remove dangling images", data, _prune_parser),
        ("save", [], "write images to a tar archive", [service_options()], _save_parser),
        ("load", [], "read images from a tar archive", data, _load_parser),
        ("import", [], "make an image from a root filesystem tarball", data, _import_parser),
        ("push", [], "copy an image to an external registry", data, _push_parser),
        ("pull", [], "copy an image from an external registry", cached, _pull_parser),
    ]
    for name, aliases, help, parents, build in grouped:
        build(sub.add_parser(name, aliases=aliases, parents=parents, help=help, description=help))


def _images_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("reference", nargs="?", default="", metavar="REPOSITORY[:TAG]")
    p.add_argument("-a", "--all", action="store_true", help="also untagged images")
    p.add_argument("-q", "--quiet", action="store_true", help="only image ids")
    p.add_argument("--digests", action="store_true", help="show manifest digests")
    p.add_argument("--no-trunc", action="store_true", help="full image ids")
    p.add_argument(
        "-f",
        "--filter",
        action="append",
        type=parse_image_filter,
        default=[],
        metavar="dangling=true|false",
        help="only untagged images, or only tagged ones",
    )
    p.set_defaults(func=cmd_images)


def _inspect_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", metavar="IMAGE", help="reference, digest or id prefix")
    p.set_defaults(func=cmd_inspect)


def _history_parser(p: argparse.ArgumentParser) -> None:
    add_bool_flag(
        p, "-H", "human", "sizes and times for people (default)", "bytes and RFC 3339 times"
    )
    p.add_argument("--no-trunc", action="store_true", help="full digests and commands")
    p.add_argument("-q", "--quiet", action="store_true", help="only the IMAGE column")
    p.add_argument("image", metavar="IMAGE")
    p.set_defaults(func=cmd_history)


def _tag_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE_IMAGE[:TAG]")
    p.add_argument("target", metavar="TARGET_IMAGE[:TAG]")
    p.set_defaults(func=cmd_tag)


def _rmi_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--force", action="store_true", help="even if containers use it")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="reference, digest or id prefix")
    p.set_defaults(func=cmd_rmi)


def _prune_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-a", "--all", action="store_true", help="also images no container uses")
    p.add_argument("-f", "--force", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_prune)


def _add_change_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-c",
        "--change",
        action="append",
        type=parse_change,
        default=[],
        metavar="INSTRUCTION",
        help=f"apply a Dockerfile instruction ({', '.join(CHANGE_INSTRUCTIONS)}); repeatable",
    )
    p.add_argument("-m", "--message", default="", help="commit message for the history")


def _commit_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-a", "--author", default="", help='author, e.g. "Jo <jo@example.com>"')
    _add_change_options(p)
    add_bool_flag(
        p, "-p", "pause", "pause the container while committing (default)", "do not pause it"
    )
    p.add_argument("container", metavar="CONTAINER", help="id, id prefix or name")
    p.add_argument("reference", nargs="?", default="", metavar="REPOSITORY[:TAG]")
    p.set_defaults(func=cmd_commit)


def _import_parser(p: argparse.ArgumentParser) -> None:
    _add_change_options(p)
    p.add_argument("file", metavar="FILE|-", help="tarball (plain, gzip, bzip2, xz); - for stdin")
    p.add_argument("reference", nargs="?", default="", metavar="REPOSITORY[:TAG]")
    p.set_defaults(func=cmd_import)


def _save_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.add_argument(
        "--format",
        dest="archive_format",
        choices=list(ARCHIVE_FORMATS),
        default="docker-archive",
        help="docker-archive (default, as docker save) or oci-archive",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.set_defaults(func=cmd_save)


def _load_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", metavar="FILE", help="read FILE instead of stdin")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument("--reference", default="", metavar="NAME[:TAG]", help="name for unnamed images")
    p.set_defaults(func=cmd_load)


def _pull_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the registry")
    p.add_argument(
        "--as",
        dest="as_name",
        default="",
        metavar="NAME[:TAG]",
        help="name in berth's registry (default: the name without its host)",
    )
    p.add_argument("image", metavar="NAME", help="HOST[:PORT]/REPO[:TAG|@DIGEST]")
    p.set_defaults(func=cmd_pull)


def _push_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--insecure", action="store_true", help="plain HTTP to the registry")
    p.add_argument("image", metavar="IMAGE", help="an image in berth's registry, or HOST/NAME")
    p.add_argument("destination", nargs="?", metavar="DESTINATION", help="HOST[:PORT]/REPO[:TAG]")
    p.set_defaults(func=cmd_push)


def _login_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("-u", "--username", default="", help="user name")
    p.add_argument("-p", "--password", default=None, help="password (prefer --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument(
        "--token", default=None, help="the cluster: a berth token (prefer --token-stdin)"
    )
    p.add_argument(
        "--token-stdin", action="store_true", help="the cluster: read a berth token from stdin"
    )
    p.add_argument(
        "server",
        nargs="?",
        metavar="SERVER",
        help="an external registry HOST[:PORT]; without it, log in to the berth cluster",
    )
    p.set_defaults(func=cmd_login)


def _logout_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "server",
        nargs="?",
        metavar="SERVER",
        help="an external registry HOST[:PORT]; without it, forget the cluster token",
    )
    p.set_defaults(func=cmd_logout)


# --- the catalog ------------------------------------------------------------------------------


def cmd_images(args: argparse.Namespace) -> int:
    node = cache_node(args)
    if node is not None:
        return _node_images(args, node)
    dangling = {value for _, value in args.filter}
    if len(dangling) > 1:
        raise BerthClientError(
            "dangling=true and dangling=false exclude each other", "INVALID_ARGUMENT"
        )
    reference = str(local_reference(args.reference, "images")) if args.reference else ""
    with connect_images(args) as client:
        images = client.images(reference, all=args.all, dangling=True in dangling)
    if False in dangling:
        images = [i for i in images if i.tag]
    if args.quiet:
        _print_lines(i.id if args.no_trunc else short_digest(i.id) for i in images)
    elif args.format == "json":
        print_json(images)
    else:
        headers = ["REPOSITORY", "TAG", *(["DIGEST"] if args.digests else []), "IMAGE ID"]
        print_table(
            [*headers, "CREATED", "SIZE"], catalog_rows(images, args.digests, args.no_trunc)
        )
    return 0


def _node_images(args: argparse.Namespace, node: str) -> int:
    catalog_only = [
        flag
        for flag, given in [
            ("REPOSITORY", args.reference),
            ("-a", args.all),
            ("--digests", args.digests),
            ("--filter", args.filter),
        ]
        if given
    ]
    if catalog_only:
        raise BerthClientError(
            f"{', '.join(catalog_only)}: only for the image catalog; a node's cache "
            "(--node, BERTH_NODE) lists everything it holds",
            "INVALID_ARGUMENT",
        )
    with NodeClient(node) as client:
        images = client.images()
    rows = image_rows(images, args.no_trunc)
    if args.quiet:
        _print_lines(row[2] for row in rows)
    elif args.format == "json":
        print_json(images)
    else:
        print_table(["REPOSITORY", "TAG", "IMAGE ID", "SIZE"], rows)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    with connect_images(args) as client:
        inspect_each(args.images, lambda i: docker_image(client.inspect(i)))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    with connect_images(args) as client:
        steps = client.history(args.image)
    if args.quiet:
        _print_lines(history_id(s, args.no_trunc) for s in steps)
    elif args.format == "json":
        print_json(steps)
    else:
        headers = ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"]
        print_table(headers, history_rows(steps, args.human, args.no_trunc))
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    local_reference(args.source, "tag")
    target = new_name(args.target, "tag")
    with connect_images(args) as client:
        client.tag(args.source, target)
    return 0


def cmd_rmi(args: argparse.Namespace) -> int:
    node = cache_node(args)
    if node is not None:
        return _node_rmi(args, node)
    removals: list[Removal] = []
    with connect_images(args) as client:

        def remove(image: str) -> None:
            removal = client.remove(image, args.force)
            if args.format == "json":
                removals.append(removal)
            else:
                _print_lines(removal_lines(removal))

        try:
            for_each(args.images, remove)
        finally:
            if removals:
                print_json([r._asdict() for r in removals])
    return 0


def _node_rmi(args: argparse.Namespace, node: str) -> int:
    if args.force:
        raise BerthClientError(
            "-f is for the image catalog; a node's cache (--node, BERTH_NODE) keeps images "
            "its containers use",
            "INVALID_ARGUMENT",
        )
    with NodeClient(node) as client:

        def remove(image: str) -> None:
            deleted = client.remove_image(image)
            by_digest = "@" in image or image.startswith("sha256:")
            lines = [] if by_digest else [f"Untagged: {image_name(image)}"]
            _print_lines([*lines, *(f"Deleted: {layer}" for layer in deleted)])

        for_each(args.images, remove)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    if not args.force and not confirm(PRUNE_ALL_WARNING if args.all else PRUNE_WARNING):
        return 0
    with connect_images(args) as client:
        result = client.prune(all=args.all)
    if args.format == "json":
        removed = [r._asdict() for r in result.removed]
        print_json({"removed": removed, "reclaimed_bytes": result.reclaimed_bytes})
        return 0
    # Docker's prune report starts its lines in lower case: "untagged: x:1".
    lines = [line[0].lower() + line[1:] for r in result.removed for line in removal_lines(r)]
    if lines:
        _print_lines(["Deleted Images:", *lines, ""])
    print_line(f"Total reclaimed space: {human_size(result.reclaimed_bytes)}")
    return 0


# --- making images ----------------------------------------------------------------------------


def cmd_commit(args: argparse.Namespace) -> int:
    reference = new_name(args.reference, "commit") if args.reference else ""
    out = err_console()

    def stage(event: CommitProgress) -> None:
        # Each stage (resolve, export, write) says what it does while it runs.
        if event.message and event.state == "running":
            out.print(event.message, markup=False)

    show = out.is_terminal and args.format != "json"
    with connect_images(args) as client:
        image = client.commit(
            args.container,
            reference,
            author=args.author,
            message=args.message,
            pause=args.pause,
            changes=args.change,
            progress=stage if show else None,
        )
    _print_image(image, args)
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    reference = new_name(args.reference, "import") if args.reference else ""
    source: str | BinaryIO = args.file
    if args.file == "-":
        source = _stdin("import - reads the tarball from stdin, which is a terminal: pipe one in")
    name = "-" if args.file == "-" else Path(args.file).name  # no directories in the history
    with connect_images(args) as client, _bar(args, "Importing") as bar:
        image = client.import_image(
            source, reference, args.message, args.change, name, _received(bar)
        )
    _print_image(image, args)
    return 0


def _print_image(image: ImageDetails, args: argparse.Namespace) -> None:
    if args.format == "json":
        print_json(docker_image(image))
    else:
        print_line(image.id)


# --- archives ---------------------------------------------------------------------------------


def cmd_save(args: argparse.Namespace) -> int:
    if args.output is None and sys.stdout.isatty():
        raise BerthClientError(SAVE_TO_TERMINAL, "INVALID_ARGUMENT")
    from berth.cli.progress import ByteProgress

    with connect_images(args) as client, ByteProgress(err_console(), "Saving") as bar:
        if args.output is None:
            client.save(args.images, args.archive_format, sys.stdout.buffer, bar.update)
        else:
            with atomic_file(Path(args.output)) as out:
                client.save(args.images, args.archive_format, out, bar.update)
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    reference = new_name(args.reference, "--reference") if args.reference else ""
    source: str | BinaryIO = args.input or _stdin(
        "requested load from stdin, but stdin is a terminal: use -i FILE or redirect"
    )
    with connect_images(args) as client, _bar(args, "Loading") as bar:
        result = client.load(source, reference, _received(bar))
    if args.format == "json":
        images = [docker_image(i) for i in result.images]
        print_json({"references": result.references, "images": images})
        return 0
    unnamed = [f"Loaded image ID: {i.id}" for i in result.images if not i.repo_tags]
    _print_lines([*(f"Loaded image: {r}" for r in result.references), *unnamed])
    return 0


def _received(bar: ByteProgress) -> Callable[[ProgressEvent], None]:
    """The service's progress of an upload on the bar: the bytes it received so far."""

    def show(event: ProgressEvent) -> None:
        if event.id == "upload":
            bar.update(event.current, event.total)

    return show


def _bar(args: argparse.Namespace, description: str) -> ByteProgress:
    """The upload bar, on stderr when that is a terminal; none with -q or --format json."""
    from rich.console import Console

    from berth.cli.progress import ByteProgress

    quiet = getattr(args, "quiet", False) or args.format == "json"
    out = Console(file=sys.stderr, force_terminal=False) if quiet else err_console()
    return ByteProgress(out, description)


# --- external registries ----------------------------------------------------------------------


def cmd_pull(args: argparse.Namespace) -> int:
    reference = parse_external_reference(args.image)  # a bad name fails before connecting
    if reference.host is None:
        return _pull_local(args, reference)
    if args.node:
        raise BerthClientError(
            f"a node pulls only from berth's registry; drop --node to copy {args.image} into "
            "berth's registry, from which every node can run it",
            "INVALID_ARGUMENT",
        )
    as_name = new_name(args.as_name, "--as") if args.as_name else ""
    credentials = auth.lookup(reference.host)
    with connect_images(args) as client:
        if args.format == "json":
            result = client.pull(args.image, credentials, args.insecure, as_name)
            print_json(
                {"local_reference": result.local_reference, "image": docker_image(result.image)}
            )
            return 0
        out = console()
        name = reference.name
        if not name.tag and not name.digest:
            print_line("Using default tag: latest")
        # As Docker: "newer" when the local name now names another image, not only when bytes
        # were copied (a pull under a new name copies nothing, yet the name is new).
        before = _digest_named(client, image_name(as_name or str(name)))
        print_line(f"{name.reference}: Pulling from {name.repository}")
        from berth.cli.progress import PULL, LayerProgress, TransferDisplay

        with LayerProgress(out, "Downloading") as display:
            lines = TransferDisplay(display, PULL)
            result = client.pull(args.image, credentials, args.insecure, as_name, _feed(lines))
    newer = lines.copied or before != result.image.digest
    outcome = "Downloaded newer image for" if newer else "Image is up to date for"
    _print_lines(
        [
            f"Digest: {result.image.digest}",
            f"Status: {outcome} {image_name(args.image)}",
            result.local_reference,
        ]
    )
    return 0


def _digest_named(client: ImageClient, name: str) -> str | None:
    """The manifest digest `name` names in berth's catalog now, or None."""
    try:
        return client.inspect(name).digest
    except BerthClientError as err:
        if err.code == "NOT_FOUND":
            return None
        raise


def _pull_local(args: argparse.Namespace, reference: ExternalReference) -> int:
    """A name without a host: berth's registry already serves it to every node. Single-host
    mode pre-pulls it onto the node; otherwise say whether the catalog has it."""
    if args.as_name or args.insecure:
        raise BerthClientError(
            "--as and --insecure are for pulls from an external registry: name its host, "
            f"e.g. {EXAMPLE_REGISTRY}/{args.image}",
            "INVALID_ARGUMENT",
        )
    node = cache_node(args)
    if node is not None:
        with NodeClient(node) as node_client:
            if not reference.name.tag and not reference.name.digest:
                print_line("Using default tag: latest")
            pull_image(node_client, args.image, console())
        return 0
    with connect_images(args) as client:
        try:
            image = client.inspect(args.image)
        except BerthClientError as err:
            if err.code != "NOT_FOUND":
                raise
            raise BerthClientError(
                f"{image_name(args.image)} is not in berth's registry; pull it from an external "
                f"registry by naming its host, e.g. {EXAMPLE_REGISTRY}/{args.image}",
                "NOT_FOUND",
            ) from None
    if args.format == "json":
        print_json({"local_reference": image_name(args.image), "image": docker_image(image)})
        return 0
    _print_lines(
        [f"Digest: {image.digest}", f"Status: Image is up to date for {image_name(args.image)}"]
    )
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    source, destination = push_names(args.image, args.destination)
    credentials = auth.lookup(str(destination.host))
    tag = destination.name.tag or "latest"
    with connect_images(args) as client:
        if args.format == "json":
            result = client.push(source, str(destination), credentials, args.insecure)
        else:
            repository = f"{destination.host}/{destination.name.repository}"
            print_line(f"The push refers to repository [{repository}]")
            from berth.cli.progress import PUSH, LayerProgress, TransferDisplay

            with LayerProgress(console(), "Pushing") as display:
                lines = TransferDisplay(display, PUSH)
                result = client.push(
                    source, str(destination), credentials, args.insecure, _feed(lines)
                )
    if args.format == "json":
        print_json({"destination": str(destination), "digest": result.digest, "size": result.size})
    else:
        print_line(f"{tag}: digest: {result.digest} size: {result.size}")
    return 0


def push_names(image: str, destination: str | None) -> tuple[str, ExternalReference]:
    """(image in berth's registry, external destination with its tag) of `push IMAGE [DEST]`."""
    if destination is None:
        target = parse_external_reference(image)
        if target.host is None:
            raise BerthClientError(
                f"{image_name(image)} is in berth's registry already, from which every node runs "
                f"it; to copy it to another registry, name that registry: berth push {image} "
                f"{EXAMPLE_REGISTRY}/{image}",
                "INVALID_ARGUMENT",
            )
        source = str(target.name)
    else:
        source = str(local_reference(image, "push").name)
        target = parse_external_reference(destination)
        if target.host is None:
            raise BerthClientError(
                f'the destination "{destination}" names no registry host: use '
                f"HOST[:PORT]/NAME[:TAG], e.g. {EXAMPLE_REGISTRY}/{destination}",
                "INVALID_ARGUMENT",
            )
    if target.name.digest:
        raise BerthClientError(
            "push to NAME[:TAG]: a pushed manifest is always reachable by its own digest",
            "INVALID_ARGUMENT",
        )
    if not target.name.tag:
        # The destination keeps the image's tag, as `docker tag x:1 host/x` then push would not,
        # but as a copy is expected to: an image named by id or digest goes to latest.
        kept = parse_external_reference(source).name.tag
        tag = kept if kept and not source.startswith("sha256:") else "latest"
        target = replace(target, name=replace(target.name, tag=tag))
    return source, target


def _feed(lines: TransferDisplay) -> Callable[[TransferProgress], None]:
    def feed(event: TransferProgress) -> None:
        # Docker shows layers only; a mount names the repository it came from, as Docker does.
        if event.config:
            return
        state = f"Mounted from {event.mounted_from}" if event.mounted_from else event.state
        lines.update(event.digest, state, event.current, event.total)

    return feed


def cmd_login(args: argparse.Namespace) -> int:
    if args.server is None:
        if args.username or args.password is not None or args.password_stdin:
            raise BerthClientError(
                "the berth cluster takes a token (--token-stdin), not a user name and password; "
                "name the registry HOST to log in to an external registry",
                "INVALID_ARGUMENT",
            )
        from berth.cli.access_cmds import cluster_login

        return cluster_login(args)
    if args.token is not None or args.token_stdin:
        raise BerthClientError(
            "--token and --token-stdin log in to the berth cluster: drop SERVER",
            "INVALID_ARGUMENT",
        )
    if args.password is not None and args.password_stdin:
        raise BerthClientError(
            "--password and --password-stdin are mutually exclusive", "INVALID_ARGUMENT"
        )
    host = auth.registry_host(args.server)
    username, password = args.username, args.password
    if args.password_stdin:
        if not username:
            raise BerthClientError(
                "Must provide --username with --password-stdin", "INVALID_ARGUMENT"
            )
        password = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    elif password is not None:
        print(
            "WARNING! Using --password via the CLI is insecure. Use --password-stdin.",
            file=sys.stderr,
        )
    else:
        if not (sys.stdin and sys.stdin.isatty()):
            raise BerthClientError(
                "Cannot perform an interactive login from a non TTY device: pass -u and "
                "--password-stdin",
                "INVALID_ARGUMENT",
            )
        username = username or input("Username: ").strip()
        password = getpass.getpass("Password: ")
    if not username or not password:
        raise BerthClientError("login needs a username and a password", "INVALID_ARGUMENT")
    stored = auth.save_credentials(host, username, password)
    # No RPC checks credentials without moving an image: say what was done, not more.
    print_line(f"Credentials saved for {stored} (checked at the next pull or push)")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    if args.server is None:
        from berth.cli.access_cmds import cluster_logout

        return cluster_logout()
    host = auth.registry_host(args.server)
    if auth.remove_credentials(host):
        print_line(f"Removing login credentials for {host}")
    else:
        print_line(f"Not logged in to {host}")
    return 0


# --- rendering --------------------------------------------------------------------------------


def catalog_rows(
    images: Iterable[ImageSummary],
    digests: bool = False,
    no_trunc: bool = False,
    now: datetime | None = None,
) -> list[list[str]]:
    """`docker images` rows, in the service's order (newest first); an image without a tag
    shows `<none>` for it, and its repository, as Docker shows images pulled by digest."""
    rows = []
    for i in images:
        row = [i.repository or "<none>", i.tag or "<none>"]
        if digests:
            row.append(i.digest or "<none>")
        row += [i.id if no_trunc else short_digest(i.id), human_ago(i.created, now)]
        rows.append([*row, human_size(i.size)])
    return rows


def history_id(step: HistoryStep, no_trunc: bool = False) -> str:
    """The IMAGE column: berth shows the layer a step added (short, as Docker shows ids), and
    `<missing>` for a step that added none: intermediate images have no id of their own."""
    if not step.layer:
        return "<missing>"
    return step.layer if no_trunc else short_digest(step.layer)


def history_rows(
    steps: Iterable[HistoryStep],
    human: bool = True,
    no_trunc: bool = False,
    now: datetime | None = None,
) -> list[list[str]]:
    rows = []
    for s in steps:
        created_by = s.created_by.replace("\t", " ")
        if not no_trunc and len(created_by) > CREATED_BY_WIDTH:
            created_by = created_by[: CREATED_BY_WIDTH - 1] + "…"  # Docker's Ellipsis
        if human:
            created, size = human_ago(s.created, now), human_size(s.size)
        else:
            created = format_time(s.created) if s.created else "-"
            size = str(s.size)
        rows.append([history_id(s, no_trunc), created, created_by, size, s.comment])
    return rows


def removal_lines(removal: Removal) -> list[str]:
    return [
        *(f"Untagged: {reference}" for reference in removal.untagged),
        *(f"Deleted: {digest}" for digest in removal.deleted),
    ]


def docker_image(image: ImageDetails) -> dict[str, Any]:
    """An image in the shape of `docker image inspect`, plus where berth keeps it."""
    config = image.config
    os_name, _, architecture = image.platform.partition("/")
    last_comment = image.history[-1].comment if image.history else ""
    return {
        "Id": image.id,
        "RepoTags": image.repo_tags,
        "RepoDigests": image.repo_digests,
        "Parent": "",
        "Comment": last_comment,
        "Created": format_time(image.created) if image.created else config.get("created", ""),
        "Author": config.get("author", ""),
        "Config": config.get("config", {}),
        "Architecture": config.get("architecture", architecture),
        "Os": config.get("os", os_name),
        "Size": image.size,
        "RootFS": {"Type": "layers", "Layers": image.diff_ids},
        "Hosts": image.hosts,
        "Origin": {"Type": image.origin, "Detail": image.origin_detail},
    }


def image_rows(images: Iterable[ImageInfo], no_trunc: bool = False) -> list[list[str]]:
    """A node's cache: one row per reference, as Docker lists a tagged image once per tag."""
    rows = []
    for image in images:
        image_id = image.config_digest if no_trunc else short_digest(image.config_digest)
        size = human_size(image.size)
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


def _print_lines(lines: Iterable[str]) -> None:
    for line in lines:
        print_line(line)


# --- files and prompts ------------------------------------------------------------------------


def confirm(warning: str) -> bool:
    """Docker's prompt on stdout; only y or yes on stdin agrees (no stdin: no)."""
    sys.stdout.write(f"{warning}\nAre you sure you want to continue? [y/N] ")
    sys.stdout.flush()
    try:
        answer = sys.stdin.readline() if sys.stdin is not None else ""
    except (OSError, ValueError):
        answer = ""
    if not answer.endswith("\n"):
        sys.stdout.write("\n")  # end the prompt's line when nothing was typed
    return answer.strip().lower() in ("y", "yes")


def _stdin(refusal: str) -> BinaryIO:
    """stdin for an archive; a terminal is refused, since nobody types a tarball."""
    if sys.stdin is None or sys.stdin.isatty():
        raise BerthClientError(refusal, "INVALID_ARGUMENT")
    return sys.stdin.buffer
