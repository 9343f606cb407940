"""`berth search` and `berth registry ...`: browse and curate the registry's repositories."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from datetime import datetime

from berth.cli import webhook_cmds
from berth.cli.output import (  # format_options, parse_*: re-exported for the others
    err_console,
    format_options,
    format_time,
    human_ago,
    human_size,
    jsonable,
    parse_duration,
    parse_label,
    print_fields,
    print_json,
    print_line,
    print_table,
    truncate,
)
from berth.client.registry import (
    GcProgress,
    GcReport,
    RegistryClient,
    RepositoryInfo,
    TagInfo,
    parse_image_reference,
)
from berth.config import resolve_service_address
from berth.enums.registry import VISIBILITIES
from berth.errors import BerthClientError

DESCRIPTION_WIDTH = 45  # what `docker search` keeps without --no-trunc


# --- argument types ---------------------------------------------------------------------------


def parse_grace(text: str) -> int:
    """A grace period: 0 keeps no unreferenced blob for its age (omit --grace for the
    server's default)."""
    return parse_duration(text)


def repository_name(text: str) -> str:
    try:
        reference = parse_image_reference(text)
    except BerthClientError as err:
        raise argparse.ArgumentTypeError(err.message) from None
    if reference.tag or reference.digest:
        raise argparse.ArgumentTypeError(f'expected a repository name without tag: "{text}"')
    return reference.repository


# --- options shared with other command modules -----------------------------------------------


def connection_options() -> argparse.ArgumentParser:
    """--registry on a subcommand; SUPPRESS keeps it from overwriting the global flag."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--registry",
        metavar="ADDR",
        default=argparse.SUPPRESS,
        help="registry address HOST:PORT (default: $BERTH_REGISTRY, else the `berthd up` cluster)",
    )
    return parent


def connect_registry(args: argparse.Namespace) -> RegistryClient:
    return RegistryClient(resolve_service_address("registry", args.registry))


# --- parsers ----------------------------------------------------------------------------------


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `search` and `registry ...` on the top-level subcommands."""
    common = [connection_options(), format_options()]

    search = commands.add_parser(
        "search", parents=common, help="find repositories by name, description or label"
    )
    search.add_argument("term", nargs="?", default="", help="text to match (empty: everything)")
    search.add_argument(
        "--label",
        action="append",
        type=parse_label,
        default=[],
        metavar="KEY=VALUE",
        help="only repositories with this label (repeatable)",
    )
    search.add_argument("--limit", type=_positive_int, default=25, help="at most N results")
    search.add_argument("--no-trunc", action="store_true", help="do not truncate descriptions")
    search.set_defaults(func=cmd_search)

    registry = commands.add_parser("registry", help="manage the registry's repositories")
    sub = registry.add_subparsers(dest="registry_command", metavar="COMMAND", required=True)

    ls = sub.add_parser("ls", parents=common, help="list repositories")
    ls.add_argument("--no-trunc", action="store_true", help="do not truncate descriptions")
    ls.set_defaults(func=cmd_ls)

    tags = sub.add_parser("tags", parents=common, help="list a repository's tags")
    tags.add_argument("repository", type=repository_name, metavar="REPO")
    tags.set_defaults(func=cmd_tags)

    inspect = sub.add_parser("inspect", parents=common, help="show a repository and its tags")
    inspect.add_argument("repository", type=repository_name, metavar="REPO")
    inspect.set_defaults(func=cmd_inspect)

    set_ = sub.add_parser(
        "set", parents=common, help="set a repository's description, labels or visibility"
    )
    set_.add_argument("repository", type=repository_name, metavar="REPO")
    set_.add_argument("--description", metavar="TEXT", help="new description")
    set_.add_argument(
        "--label",
        action="append",
        type=parse_label,
        default=[],
        metavar="KEY=VALUE",
        help="add or change a label (repeatable)",
    )
    set_.add_argument(
        "--replace-labels",
        action="store_true",
        help="make the given labels the only ones (none given: remove all)",
    )
    set_.add_argument(
        "--visibility",
        choices=VISIBILITIES.names,
        help="private: only those granted access can pull and find it (the default); "
        "public: anyone can, without logging in",
    )
    set_.set_defaults(func=cmd_set)

    gc = sub.add_parser("gc", parents=common, help="delete blobs that no manifest references")
    gc.add_argument("--dry-run", action="store_true", help="report, delete nothing")
    gc.add_argument(
        "--grace",
        type=parse_grace,
        metavar="DURATION",
        help="keep unreferenced blobs younger than this, e.g. 30s, 10m, 1h; 0 keeps none "
        "(default: the server's, 1h)",
    )
    gc.set_defaults(func=cmd_gc)

    webhook_cmds.add_commands(sub, common)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive number, got "{text}"')
    return value


# --- commands ---------------------------------------------------------------------------------


def cmd_search(args: argparse.Namespace) -> int:
    with connect_registry(args) as client:
        results = client.search(args.term, labels=dict(args.label), limit=args.limit)
    _print_repositories(results, args, visibility=False)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with connect_registry(args) as client:
        repositories = list(client.iter_repositories())
    _print_repositories(repositories, args, visibility=True)
    return 0


def cmd_tags(args: argparse.Namespace) -> int:
    with connect_registry(args) as client:
        tags = list(client.iter_tags(args.repository))
    if args.format == "json":
        print_json(tags)
    else:
        _print_tags(tags)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    with connect_registry(args) as client:
        repository = client.get_repository(args.repository)
        tags = list(client.iter_tags(args.repository))
    if args.format == "json":
        print_json({**jsonable(repository), "tags": tags})
        return 0
    _print_repository(repository)
    if tags:
        print_line()
        _print_tags(tags)
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    if (
        args.description is None
        and not args.label
        and not args.replace_labels
        and args.visibility is None
    ):
        raise BerthClientError(
            "nothing to change: pass --description, --label, --replace-labels or --visibility",
            "INVALID_ARGUMENT",
        )
    with connect_registry(args) as client:
        repository = client.update_repository(
            args.repository,
            description=args.description,
            labels=dict(args.label),
            replace_labels=args.replace_labels,
            visibility=args.visibility,
        )
    if args.format == "json":
        print_json(repository)
    else:
        _print_repository(repository)
    return 0


GC_STAGES = {"mark": "Marking manifests", "sweep": "Sweeping blobs"}


def cmd_gc(args: argparse.Namespace) -> int:
    # The stages' progress goes to stderr on a terminal: stdout keeps only the report.
    show = args.format != "json"
    from berth.cli.progress import StageProgress  # here: it imports rich, which only gc shows

    with connect_registry(args) as client, StageProgress(err_console(), GC_STAGES) as stages:

        def progress(event: GcProgress) -> None:
            stages.update(event.stage, event.current, event.total, event.done)

        report = client.garbage_collect(
            dry_run=args.dry_run, grace_seconds=args.grace, progress=progress if show else None
        )
    if args.format == "json":
        print_json({**jsonable(report), "dry_run": args.dry_run})
    else:
        _print_gc(report, args.dry_run)
    return 0


# --- rendering --------------------------------------------------------------------------------


def _print_repositories(
    repositories: list[RepositoryInfo], args: argparse.Namespace, *, visibility: bool
) -> None:
    """`search` keeps `docker search`'s columns; `registry ls` adds each one's visibility."""
    if args.format == "json":
        print_json(repositories)
        return
    width = None if args.no_trunc else DESCRIPTION_WIDTH
    rows = [
        [
            r.name,
            *([r.visibility] if visibility else []),
            r.description if width is None else truncate(r.description, width),
            str(r.tag_count),
            human_ago(r.last_push_at),
        ]
        for r in repositories
    ]
    headers = ["NAME", *(["VISIBILITY"] if visibility else []), "DESCRIPTION", "TAGS", "LAST PUSH"]
    print_table(headers, rows)


def _print_tags(tags: Iterable[TagInfo]) -> None:
    rows = [[t.name, t.digest, human_ago(t.pushed_at)] for t in tags]
    print_table(["TAG", "DIGEST", "PUSHED"], rows)


def _print_repository(repository: RepositoryInfo) -> None:
    def when(value: datetime | None) -> str:
        return "-" if value is None else f"{format_time(value)} ({human_ago(value)})"

    labels = ", ".join(f"{k}={v}" for k, v in sorted(repository.labels.items()))
    print_fields(
        [
            ("Name", repository.name),
            ("Visibility", repository.visibility),
            ("Description", repository.description or "-"),
            ("Labels", labels or "-"),
            ("Tags", str(repository.tag_count)),
            ("Created", when(repository.created_at)),
            ("Last push", when(repository.last_push_at)),
        ]
    )


def _print_gc(report: GcReport, dry_run: bool) -> None:
    verb = "would delete" if dry_run else "deleted"
    if report.deleted:
        print_line("Blobs that would be deleted:" if dry_run else "Deleted blobs:")
        for blob in report.deleted:
            print_line(f"{verb}: {blob.digest} ({human_size(blob.size)})")
        print_line()
    total = "Total space that would be reclaimed" if dry_run else "Total reclaimed space"
    print_line(f"{total}: {human_size(report.reclaimed_bytes)}")
    print_line(
        f"Kept {report.blobs_marked} referenced blobs and {report.blobs_young} unreferenced "
        "blobs younger than the grace period"
    )
