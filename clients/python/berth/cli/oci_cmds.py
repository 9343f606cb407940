"""`berth oci push` and `berth oci pull`: copy images between OCI layouts and the registry.

Manifests travel as their exact bytes, so digests are the same in the layout and the registry.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

from berth.cli.output import console, print_line
from berth.cli.progress import LayerLine, LayerProgress
from berth.cli.registry_cmds import connect_registry, connection_options
from berth.client.registry import (
    ImageReference,
    ManifestData,
    RegistryClient,
    parse_image_reference,
)
from berth.errors import BerthClientError
from berth.oci_layout import (
    Descriptor,
    ImageLayout,
    LayoutError,
    Manifest,
    compute_digest,
    parse_layout_ref,
)

LAYOUT_HELP = (
    "DIR[:REF] names an OCI image layout (as skopeo's oci:DIR:REF). REF is the text after the "
    "last colon unless it contains a '/'; write a directory whose name has a colon with a "
    "trailing slash, e.g. ./v1:2/ or ./v1:2/:latest."
)
_PUSH_STATUS = {
    "exists": "Layer already exists",
    "mounted": "Mounted from another repository",
    "pushed": "Pushed",
}

Plan = list[tuple[Descriptor, LayerLine | None]]
# Like Docker's max-concurrent-downloads: a few streams keep both ends busy (one Python stream
# alternates between receiving and hashing; several overlap them).
DEFAULT_JOBS = 3


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register `oci push` and `oci pull` on the top-level subcommands."""
    oci = commands.add_parser("oci", help="copy images between OCI layouts and the registry")
    sub = oci.add_subparsers(dest="oci_command", metavar="COMMAND", required=True)
    common = [connection_options(), _jobs_option()]

    push = sub.add_parser(
        "push", parents=common, help="push an image from an OCI layout", description=LAYOUT_HELP
    )
    push.add_argument("source", metavar="DIR[:REF]", help="layout to read")
    push.add_argument("target", metavar="REPO[:TAG]", help="destination (TAG default: latest)")
    push.set_defaults(func=cmd_push)

    pull = sub.add_parser(
        "pull", parents=common, help="pull an image into an OCI layout", description=LAYOUT_HELP
    )
    pull.add_argument("source", metavar="REPO[:TAG|@DIGEST]", help="image to pull")
    pull.add_argument(
        "dest", metavar="DIR[:REF]", help="layout to write (created if absent; REF default: TAG)"
    )
    pull.set_defaults(func=cmd_pull)


def cmd_push(args: argparse.Namespace) -> int:
    path, ref = parse_layout_ref(args.source)
    target = parse_image_reference(args.target)
    if target.digest:
        raise BerthClientError(
            "push to REPO[:TAG]: a pushed manifest is always reachable by its own digest",
            "INVALID_ARGUMENT",
        )
    tag = target.tag or "latest"
    layout = ImageLayout.open(path)
    manifests = list(layout.walk(layout.resolve(ref)))  # children first
    _check_complete(layout, manifests)
    with connect_registry(args) as client:
        print_line(f"The push refers to repository [{client.address}/{target.repository}]")

        def push(blob: Descriptor, line: LayerLine | None) -> str:
            result = client.push_blob(
                target.repository,
                layout.blob_path(blob.digest),
                blob.digest,
                blob.size,
                progress=line.update if line else None,
            )
            return _PUSH_STATUS[result.outcome]

        with LayerProgress(console(), "Pushing") as display:
            _transfer(_plan(manifests, display), push, args.jobs)
        for manifest in manifests:
            is_top = manifest is manifests[-1]
            _put_manifest(client, target.repository, tag if is_top else None, manifest)
    top = manifests[-1]
    print_line(f"{tag}: digest: {top.descriptor.digest} size: {top.descriptor.size}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    source = parse_image_reference(args.source)
    path, ref = parse_layout_ref(args.dest)
    if ref is None and not source.digest:
        ref = source.tag or "latest"
    with connect_registry(args) as client:
        print_line(f"{source.tag or source.reference}: Pulling from {source.repository}")
        manifests = _fetch_manifests(client, source)
        layout = ImageLayout.create(path)  # only now: a failed lookup leaves no empty layout

        def pull(blob: Descriptor, line: LayerLine | None) -> str:
            return _pull_blob(client, layout, source.repository, blob, line)

        with LayerProgress(console(), "Downloading") as display:
            _transfer(_plan(manifests, display), pull, args.jobs)
    # Manifests go in after every blob they reference, the index entry last.
    for manifest in manifests:
        layout.write_blob(manifest.content, manifest.descriptor.digest)
    top = manifests[-1]
    layout.set_ref(top.descriptor, ref)
    print_line(f"Digest: {top.descriptor.digest}")
    print_line(f"Status: Saved {source} to {path}{f':{ref}' if ref else ''}")
    return 0


def _jobs_option() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "-j",
        "--jobs",
        type=int,
        default=DEFAULT_JOBS,
        help=f"blobs to transfer at once (default {DEFAULT_JOBS})",
    )
    return parser


def _transfer(plan: Plan, move: Callable[[Descriptor, LayerLine | None], str], jobs: int) -> None:
    """Run `move` on every blob, `jobs` at a time; the first failure stops the rest."""
    if jobs < 1:
        raise BerthClientError(f"--jobs must be at least 1, not {jobs}", "INVALID_ARGUMENT")

    def one(blob: Descriptor, line: LayerLine | None) -> None:
        status = move(blob, line)
        if line:
            line.finish(status)

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="transfer") as pool:
        futures = [pool.submit(one, blob, line) for blob, line in plan]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in done:
            future.result()  # re-raises the first failure


def _plan(manifests: list[Manifest], display: LayerProgress) -> Plan:
    """Distinct blobs of the image manifests, each manifest's layers then its config. Layers
    get a progress line; configs do not (as in Docker)."""
    plan: Plan = []
    seen: set[str] = set()
    for manifest in manifests:
        if manifest.is_index:
            continue
        config = manifest.config
        for blob in [*manifest.layers, *([config] if config else [])]:
            if blob.digest not in seen:
                seen.add(blob.digest)
                line = display.add(blob.digest, blob.size) if blob is not config else None
                plan.append((blob, line))
    return plan


def _check_complete(layout: ImageLayout, manifests: list[Manifest]) -> None:
    """Fail before sending anything when the layout lacks a blob (e.g. a partial skopeo copy)."""
    for manifest in manifests:
        if manifest.is_index:
            continue  # children were read by walk(), so they are present
        for blob in layout.blobs_for(manifest):
            if not layout.has_blob(blob.digest, blob.size):
                raise LayoutError(
                    f"OCI layout {layout.root} lacks blob {blob.digest} ({blob.size} bytes) "
                    f"referenced by manifest {manifest.descriptor.digest}"
                )


def _put_manifest(
    client: RegistryClient, repository: str, tag: str | None, manifest: Manifest
) -> None:
    """Store a manifest under tag, or untagged by digest; the registry must agree on the digest."""
    expected = manifest.descriptor.digest
    digest = client.put_manifest(repository, tag or expected, manifest.media_type, manifest.content)
    if digest != expected:
        raise BerthClientError(
            f"registry stored manifest {expected} as {digest}; it must keep the bytes unchanged",
            "DATA_LOSS",
        )


def _fetch_manifests(client: RegistryClient, source: ImageReference) -> list[Manifest]:
    """The manifest source names and, for an index, every child: children first, each verified."""
    result: list[Manifest] = []
    seen: set[str] = set()

    def visit(manifest: Manifest) -> None:
        for child in manifest.children if manifest.is_index else []:
            if child.digest not in seen:
                seen.add(child.digest)
                data = client.get_manifest(source.repository, child.digest)
                visit(_verified(data, child.digest, child.media_type))
        result.append(manifest)

    top = client.get_manifest(source.repository, source.reference)
    visit(_verified(top, source.digest, ""))
    return result


def _verified(data: ManifestData, expected_digest: str | None, media_type: str) -> Manifest:
    """Check the registry's manifest bytes against the digest it reported and the one asked for."""
    actual = compute_digest(data.content)
    for claimed in (data.digest, expected_digest):
        if claimed and claimed != actual:
            raise BerthClientError(
                f"manifest from the registry has digest {actual}, expected {claimed}", "DATA_LOSS"
            )
    parsed = Manifest.parse(Descriptor("", actual, len(data.content)), data.content)
    media = data.media_type or media_type or parsed.media_type
    return Manifest(Descriptor(media, actual, len(data.content)), data.content, parsed.data)


def _pull_blob(
    client: RegistryClient,
    layout: ImageLayout,
    repository: str,
    blob: Descriptor,
    line: LayerLine | None,
) -> str:
    """Download one blob into the layout unless present; returns Docker's status for it."""
    if layout.has_blob(blob.digest, blob.size):
        return "Already exists"
    dest = layout.blob_path(blob.digest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    client.pull_blob(repository, blob.digest, dest, progress=line.update if line else None)
    return "Pull complete"
