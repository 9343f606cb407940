"""The image catalog: berth's registry's repositories and tags, read as images.

The registry holds the names (tags) and the content; this module reads them as images and
writes new ones, only through the registry's API (berthd.common.rpc.registry): the catalog's
names are one consistent listing (`ListManifests`, every repository's manifests with their tags
and references, a page per thousand), and manifests and configs are fetched once and kept in
memory by digest (they are immutable; berthd.common.images). What the image service adds lives
under its own keys, `images/<manifest digest>` (an ImageOrigin: how an image came into the
catalog, commit, import, load or pull), read with the builder's `builds/<digest>` to show an
image's origin (berthd.common.state.images).

It also reads what others write: `cluster/node-layers/<node>` (which hosts hold an image) and
`cluster/containers/<id>` (which containers use it), through berthd.common.state.

Images are named as Docker names them: `name[:tag]` (tag `latest`), `name@digest`, a manifest
digest or image id (config digest) `sha256:<hex>`, or a unique prefix of either (at least 4 hex
digits, with or without `sha256:`). A bare hex word is first tried as a repository name, as
Docker does.
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from berth.error_details import Violation
from berthd.common.errors import FailedPrecondition, InvalidArgument, NotFound
from berthd.common.images import Content, ImageStore, ResolvedImage, created_seconds
from berthd.common.oci.digest import quoted
from berthd.common.oci.manifest import Descriptor, ImageConfig
from berthd.common.oci.reference import Reference, parse_reference
from berthd.common.pages import bad_token, decode_token, encode_token, page_size, scope_of
from berthd.common.rpc.registry import RegistryApi
from berthd.common.state.build_cache import CACHE_REPOSITORY
from berthd.common.state.containers import CONTAINERS
from berthd.common.state.images import IMAGES, ImageOrigin, origin_of
from berthd.common.state.nodes import NODE_LAYERS
from berthd.common.storage import Storage
from berthd.common.store import Store
from berthd.image import metrics
from berthd.image.model import HistoryStep, ImageDetail, ImageRow, Removal
from berthd.image.names import NamesView, Snapshot

# Listings (by their filters) whose rows are kept for their continuation pages.
LISTINGS_KEPT = 8
_ID_PREFIX = re.compile(r"(sha256:)?([0-9a-f]{4,64})")


@dataclass(frozen=True)
class Target:
    """An image named by a user: which manifest, where, and how it was named."""

    digest: str
    repository: str  # the named repository, else one holding the manifest
    tag: str | None
    by: Literal["tag", "digest", "id"]  # name:tag, name@digest, or a bare digest / id / prefix


@dataclass(frozen=True)
class ContainerUse:
    """A cluster container and the image reference it was created from."""

    id: str
    repository: str
    tag: str | None
    digest: str | None  # what the reference resolves to now (None: nothing)


# --- pure functions over images (unit-tested without servers) ----------------------------------


def parse_created(text: str | None) -> float | None:
    """An image config's `created` (RFC 3339) as seconds since the epoch; None if absent or
    unreadable (some tools write odd values; listing must not fail over them)."""
    return created_seconds(text)


def pair_history(config: ImageConfig, layers: Sequence[Descriptor]) -> list[HistoryStep]:
    """The config's history, oldest first, each step that is not `empty_layer` paired with the
    next layer (Docker's rule). Layers the history does not account for (images built without
    history) get a step of their own at the end; a step claiming a layer the manifest lacks
    gets none."""
    steps: list[HistoryStep] = []
    remaining = list(layers)
    for entry in config.history:
        empty = bool(entry.get("empty_layer"))
        layer = None if empty or not remaining else remaining.pop(0)
        steps.append(
            HistoryStep(
                layer=layer.digest if layer else "",
                created=parse_created(_text(entry.get("created"))),
                created_by=_text(entry.get("created_by")),
                size=layer.size if layer else 0,
                comment=_text(entry.get("comment")),
                empty_layer=empty,
                author=_text(entry.get("author")),
            )
        )
    steps += [HistoryStep(layer.digest, None, "", layer.size, "", False) for layer in remaining]
    return steps


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def shared_sizes(images: Mapping[str, Sequence[Descriptor]]) -> dict[str, int]:
    """For each image (by manifest digest), the bytes of its layers that another image of the
    catalog also uses. A layer listed twice in one image counts once."""
    return _shared(
        {image: {layer.digest: layer.size for layer in layers} for image, layers in images.items()}
    )


def _shared(images: Mapping[str, Mapping[str, int]]) -> dict[str, int]:
    """shared_sizes over each image's {layer digest: size}."""
    users: dict[str, int] = defaultdict(int)
    for layers in images.values():
        for digest in layers:
            users[digest] += 1
    return {
        image: sum(size for digest, size in layers.items() if users[digest] > 1)
        for image, layers in images.items()
    }


def hosts_holding(
    layers: Iterable[Descriptor], node_layers: Mapping[str, Mapping[str, int]]
) -> list[str]:
    """Ids of the nodes whose published layer set holds every one of `layers`, sorted."""
    wanted = {layer.digest for layer in layers}
    return sorted(node for node, held in node_layers.items() if wanted <= held.keys())


def unreferenced(blobs: Iterable[Descriptor], references: set[str]) -> list[Descriptor]:
    """The blobs (in order, once each) that no remaining manifest references."""
    seen: set[str] = set()
    result = []
    for blob in blobs:
        if blob.digest not in references and blob.digest not in seen:
            seen.add(blob.digest)
            result.append(blob)
    return result


def container_use(
    container_id: str, image: str, tags: Mapping[tuple[str, str], str]
) -> ContainerUse | None:
    """What a container's image reference (`name[:tag]` or `name@digest`, as it was created
    with) names in the catalog now; None for a reference that is not a catalog name."""
    try:
        reference = parse_reference(image)
    except InvalidArgument:
        return None
    if reference.registry is not None:
        return None
    repo, tag = reference.repository, reference.tag
    digest = reference.digest or tags.get((repo, tag or "latest"))
    return ContainerUse(container_id, repo, None if reference.digest else tag, digest)


def image_not_found(ref: str) -> NotFound:
    return NotFound(
        f"No such image: {ref}",
        reason="IMAGE_NOT_FOUND",
        metadata={"image": ref},
        resource=("image", ref),
    )


def reference_of(text: str, field: str, default_tag: str | None = "latest") -> Reference:
    """parse_reference, its error given reason INVALID_REFERENCE and the request field."""
    try:
        return parse_reference(text, default_tag)
    except InvalidArgument as e:
        raise invalid_reference(str(e), field, text) from None


def invalid_reference(message: str, field: str, text: str) -> InvalidArgument:
    return InvalidArgument(message, reason="INVALID_REFERENCE", field=field, metadata={field: text})


def catalog_name(text: str, what: str = "image name", field: str = "reference") -> Reference:
    """`name[:tag]` for a new name in the catalog (tag `latest`): no registry host, no digest."""
    reference = reference_of(text, field)
    if reference.registry is not None:
        raise invalid_reference(
            f"{what} {quoted(text)} has a registry host: berth's catalog names have no host; "
            f"`berth push SRC {text}` copies an image out to that registry",
            field,
            text,
        )
    if reference.digest is not None:
        raise invalid_reference(
            f"{what} {quoted(text)} must be name[:tag], without a digest", field, text
        )
    return reference


# --- pages of the list ------------------------------------------------------------------------


def _row_key(row: ImageRow) -> tuple[float, str, str]:
    """The list's order: newest first, then by repository and tag."""
    return (-(row.created or 0.0), row.repository, row.tag)


def _after(token: str, scope: str) -> tuple[float, str, str] | None:
    """The key of the last row of the previous page; None for a first page."""
    position = decode_token(token, scope)
    if position is None:
        return None
    try:
        created, repository, tag = position
        return (float(created), str(repository), str(tag))
    except (ValueError, TypeError):
        raise bad_token() from None


def page_of(
    rows: Sequence[ImageRow], size: int, token: str, scope: str
) -> tuple[list[ImageRow], str]:
    """The page of `rows` (in the list's order) after the token's row, and the next token."""
    limit = page_size(size)
    after = _after(token, scope)
    # Rows are sorted by their key: the page starts past the token's row, found by bisection.
    start = 0 if after is None else bisect_right(rows, after, key=_row_key)
    page = list(rows[start : start + limit])
    more = len(rows) > start + limit
    return page, encode_token(scope, *_row_key(page[-1])) if more else ""


@dataclass(frozen=True)
class Listing:
    """A listing's rows, computed for its first page and kept for its continuation pages
    (while the names stay at `version`), so a listing of N pages computes its rows once."""

    version: int  # the names' revision the rows were computed at
    rows: list[ImageRow]


@dataclass(frozen=True)
class Catalogued:
    """The catalog's images at one revision of the names, with what every listing derives
    from all of them (the shared bytes need every image's layers)."""

    version: int
    snapshot: Snapshot
    images: dict[str, Content]  # manifest digest -> content, images only
    shared: dict[str, int]  # manifest digest -> bytes of its layers other images use too


# --- the catalog --------------------------------------------------------------------------------


class Catalog:
    def __init__(self, store: Store, registry: RegistryApi, scratch: Path) -> None:
        self.store = store
        self.registry = registry
        # The images library over the registry's API, with its cache of manifests and configs.
        self.images = ImageStore(registry)
        # The registry's names, in memory and up to date (a watch and a marker's point read).
        self.names = NamesView(store, on_gone=self.images.forget, on_reload=self.images.keep_only)
        # Where large transient files (layers being packed or unpacked) go.
        self.scratch = scratch
        # A full scratch disk fails a load, import or transfer as STORAGE_FULL.
        self.disk = Storage("the image service's scratch directory", scratch)
        # The images of the names' latest revision a listing saw, and the rows of recent
        # listings by scope (their filters), for their continuation pages.
        self._catalogued: Catalogued | None = None
        self._listings: OrderedDict[str, Listing] = OrderedDict()
        # Rows computed (a listing's first page, or a continuation whose names changed).
        self.rows_computed = 0

    # --- reading the catalog ----------------------------------------------------------------

    async def snapshot(self) -> Snapshot:
        """The registry's manifests and tags as they are now, a copy the watch leaves alone
        (for listings and prune; a point question reads `self.names.current()`)."""
        return (await self.names.current()).copy()

    async def close(self) -> None:
        await self.names.close()

    async def content(self, digest: str, repository: str) -> Content:
        """A manifest (and its config, for an image) by digest, from the cache or the registry."""
        return await self.images.content(digest, repository)

    async def contents(self, snapshot: Snapshot) -> dict[str, Content]:
        """Content of every manifest in the snapshot: the cached, and the rest in batches (a
        first listing after a push: BatchGetManifests, not two calls per new image)."""
        return await self.images.contents(
            [(digest, snapshot.holders(digest)[0]) for digest in snapshot.manifests]
        )

    async def node_layers(self) -> dict[str, dict[str, int]]:
        """{node id: {layer digest: size}} as the node agents publish them."""
        held = await NODE_LAYERS.records(self.store)
        return {node: layers.layers for node, layers in held.items()}

    async def container_uses(self, snapshot: Snapshot) -> list[ContainerUse]:
        """Every cluster container, with the image its reference names now. A container counts
        for an image if its `name:tag` currently names the image's manifest, or it was created
        from `name@digest` of it (containers do not record the digest they were created from
        in the cluster's records, so a tag moved since counts for its new image)."""
        uses = []
        for found in await CONTAINERS.list(self.store):  # unreadable records are skipped
            desired = found.record
            use = container_use(desired.id, desired.config.image, snapshot.tags)
            if use is not None:
                uses.append(use)
        return uses

    async def target(self, ref: str, snapshot: Snapshot) -> Target:
        """Which manifest `ref` names (see the module docstring for the forms)."""
        if not ref:
            raise InvalidArgument("no image given", reason="INVALID_REFERENCE", field="image")
        id_like = _ID_PREFIX.fullmatch(ref)
        # `sha256:...` and 64 hex digits can only be a digest or an image id.
        if id_like and (id_like.group(1) or len(id_like.group(2)) == 64):
            return await self._by_id(id_like.group(2), ref, snapshot)
        try:
            reference = reference_of(ref, "image")
        except InvalidArgument:
            if id_like:
                return await self._by_id(id_like.group(2), ref, snapshot)
            raise
        if reference.registry is not None:
            raise invalid_reference(
                f"{ref} names an external registry; berth's catalog names have no host "
                "(pull it first with `berth pull`)",
                "image",
                ref,
            )
        repo = reference.repository
        if reference.digest is not None:
            if repo not in snapshot.manifests.get(reference.digest, {}):
                raise image_not_found(ref)
            return Target(reference.digest, repo, None, "digest")
        tag = reference.tag or "latest"
        digest = snapshot.tag(repo, tag)
        if digest is not None:
            return Target(digest, repo, tag, "tag")
        if id_like:
            return await self._by_id(id_like.group(2), ref, snapshot)
        raise image_not_found(ref)

    async def _by_id(self, hex_prefix: str, ref: str, snapshot: Snapshot) -> Target:
        """A manifest whose digest, or whose image's id (config digest), starts with the hex.
        An image manifest references its config first, so only the manifests whose first
        reference starts with the hex are fetched (if not cached) to tell."""
        prefix = "sha256:" + hex_prefix
        matches = set()
        candidates: dict[str, str] = {}  # manifest digest -> a repository holding it
        where: dict[str, str] = {}  # manifest digest -> the repository a match is named in
        for digest, by_repo in snapshot.manifests.items():
            if digest.startswith(prefix):
                matches.add(digest)
            elif any(refs and refs[0].startswith(prefix) for refs in by_repo.values()):
                candidates[digest] = min(by_repo)
        for digest in (*matches, *candidates):
            tagged = snapshot.tags_of(digest)
            where[digest] = tagged[0][0] if tagged else snapshot.holders(digest)[0]
        for digest, repository in candidates.items():
            try:
                content = await self.content(digest, repository)
            except NotFound:  # deleted meanwhile
                continue
            if content.is_image and content.id.startswith(prefix):
                matches.add(digest)
        if not matches:
            raise image_not_found(ref)
        if len(matches) > 1:
            shown = ", ".join(sorted(d.removeprefix("sha256:")[:12] for d in matches))
            raise FailedPrecondition(
                f"image id prefix {ref} is ambiguous: it matches {len(matches)} images "
                f"({shown}); give more digits",
                reason="AMBIGUOUS_ID",
                metadata={"prefix": ref, "matches": ",".join(sorted(matches))},
            )
        digest = matches.pop()
        return Target(digest, where[digest], None, "id")

    async def image(self, ref: str, snapshot: Snapshot | None = None) -> tuple[Target, Content]:
        """The image `ref` names, with its content; an index or artifact is refused."""
        if snapshot is None:
            snapshot = await self.names.current()
        target = await self.target(ref, snapshot)
        content = await self.content(target.digest, target.repository)
        if not content.is_image:
            what = "an image index" if content.parsed.kind == "index" else "not an image"
            raise FailedPrecondition(
                f"{ref} is {what} ({content.media_type}); name one of its images by digest",
                reason="NOT_AN_IMAGE",
                metadata={"image": ref, "digest": target.digest, "media_type": content.media_type},
            )
        return target, content

    async def resolve(self, ref: str) -> ResolvedImage:
        """Find an image by any name `inspect` takes (reference, digest, id or id prefix)."""
        target, content = await self.image(ref)
        return ResolvedImage.of(target.repository, target.tag, content)

    async def inspect(self, ref: str) -> ImageDetail:
        """Everything known about one image."""
        snapshot = await self.names.current()
        target, content = await self.image(ref, snapshot)
        assert content.config is not None
        config = content.config
        origin = await origin_of(self.store, target.digest) or ImageOrigin("")
        platform = f"{config.os}/{config.architecture}"
        if isinstance(config.raw.get("variant"), str) and config.raw["variant"]:
            platform += f"/{config.raw['variant']}"
        return ImageDetail(
            digest=target.digest,
            id=content.id,
            repo_tags=[f"{repo}:{tag}" for repo, tag in snapshot.tags_of(target.digest)],
            repo_digests=[f"{repo}@{target.digest}" for repo in snapshot.holders(target.digest)],
            media_type=content.media_type,
            manifest=content.manifest,
            config=content.config_bytes,
            layers=list(content.layers),
            diff_ids=list(config.diff_ids),
            history=pair_history(config, content.layers),
            created=parse_created(config.created),
            size=content.size,
            hosts=hosts_holding(content.layers, await self.node_layers()),
            platform=platform,
            origin=origin.origin,
            origin_detail=origin.origin_detail,
        )

    async def history(self, ref: str) -> list[HistoryStep]:
        """The image's history, newest first (docker history)."""
        _, content = await self.image(ref)
        assert content.config is not None
        return list(reversed(pair_history(content.config, content.layers)))

    async def list_page(
        self,
        reference: str = "",
        all: bool = False,
        dangling_only: bool = False,
        size: int = 0,
        token: str = "",
    ) -> tuple[list[ImageRow], str]:
        """A page of list()'s rows after the token's, and the token of the next page. A token
        belongs to the filters of the listing that returned it. A continuation page is cut
        from the rows its first page computed while the names have not changed since (the
        hosts and container counts shown are then those of the first page's moment)."""
        scope = scope_of("image.ListImages", reference, all, dangling_only)
        page_size(size)
        _after(token, scope)  # a bad token fails before the catalog is read
        wanted = _list_filter(reference)
        names = await self.names.current()
        version = self.names.applied  # of `names`: no await since current() returned
        kept = self._listings.get(scope) if token else None
        if kept is not None and kept.version == version:
            self._listings.move_to_end(scope)
            return page_of(kept.rows, size, token, scope)
        rows = await self._rows(names, version, wanted, all, dangling_only)
        self._listings[scope] = Listing(version, rows)
        self._listings.move_to_end(scope)
        while len(self._listings) > LISTINGS_KEPT:
            self._listings.popitem(last=False)
        return page_of(rows, size, token, scope)

    async def list(
        self, reference: str = "", all: bool = False, dangling_only: bool = False
    ) -> list[ImageRow]:
        """One row per tag, newest first; untagged manifests (per repository) with `all` or
        `dangling_only`. `reference` keeps one repository, or one `repo:tag`."""
        wanted = _list_filter(reference)
        names = await self.names.current()
        version = self.names.applied
        return await self._rows(names, version, wanted, all, dangling_only)

    async def _catalog(self, names: Snapshot, version: int) -> Catalogued:
        """The images of the names at `version` (the live view, copied before any await), with
        their shared bytes: computed once per revision of the names, whatever the filters."""
        kept = self._catalogued
        if kept is not None and kept.version == version:
            return kept
        snapshot = names.copy()
        images = {d: c for d, c in (await self.contents(snapshot)).items() if c.is_image}
        shared = _shared({d: c.layer_sizes for d, c in images.items()})
        kept = Catalogued(version, snapshot, images, shared)
        if self._catalogued is None or self._catalogued.version <= version:
            self._catalogued = kept
        return kept

    async def _rows(
        self,
        names: Snapshot,
        version: int,
        wanted: Reference | None,
        all: bool,
        dangling_only: bool,
    ) -> list[ImageRow]:
        """The rows of a listing, in its order. The node layers and the containers are read
        once (a point in time for the whole listing); per image only dictionary lookups."""
        self.rows_computed += 1
        catalogued = await self._catalog(names, version)
        snapshot, images, shared = catalogued.snapshot, catalogued.images, catalogued.shared
        held = [(node, layers.keys()) for node, layers in (await self.node_layers()).items()]
        users: dict[str, int] = defaultdict(int)
        for use in await self.container_uses(snapshot):
            if use.digest is not None:
                users[use.digest] += 1
        hosts: dict[str, tuple[str, ...]] = {}  # manifest digest -> nodes holding its layers

        def row(repo: str, tag: str, content: Content) -> ImageRow:
            digest = content.digest
            on = hosts.get(digest)
            if on is None:
                layers = content.layer_sizes.keys()
                on = hosts[digest] = tuple(sorted(n for n, have in held if layers <= have))
            return ImageRow(
                repository=repo,
                tag=tag,
                digest=digest,
                id=content.id,
                created=content.created,
                size=content.size,
                shared_size=shared[digest],
                hosts=on,
                containers=users[digest],
            )

        rows = []
        if not dangling_only:
            for (repo, tag), digest in snapshot.tags.items():
                if digest in images and _wanted(wanted, repo, tag):
                    rows.append(row(repo, tag, images[digest]))
        if all or dangling_only:
            for repo, digest in _dangling(snapshot, images):
                if _wanted(wanted, repo, None):
                    rows.append(row(repo, "", images[digest]))
        rows.sort(key=_row_key)
        return rows

    async def figures(self) -> tuple[int, int]:
        """(images, bytes) of the whole catalog, for the metrics: distinct image manifests,
        and the bytes of the distinct layers and configs they use."""
        snapshot = await self.snapshot()
        images = {d: c for d, c in (await self.contents(snapshot)).items() if c.is_image}
        return catalog_figures(images)

    # --- writing images -------------------------------------------------------------------

    async def write_image(
        self,
        repository: str,
        tag: str | None,
        config: dict[str, Any],
        layers: list[Descriptor],
        origin: str = "",
        origin_detail: str = "",
    ) -> ImageDetail:
        """Store a new image whose layers are already in `repository`: push its config, put
        the manifest (under `tag`, or untagged by digest) and record its origin."""
        written = await self.images.write_image(repository, tag, config, layers)
        await self.record_origin(written.digest, repository, origin, origin_detail)
        return await self.inspect(f"{repository}@{written.digest}")

    async def write_manifest(
        self,
        repository: str,
        tag: str | None,
        config: Descriptor,
        layers: list[Descriptor],
        origin: str = "",
        origin_detail: str = "",
    ) -> ImageDetail:
        """Put an OCI manifest over a config and layers already in `repository` (under `tag`,
        or untagged by digest) and record its origin. Used as is where the config's bytes
        must stay as they came (a loaded image keeps its id)."""
        digest = await self.images.write_manifest(repository, tag, config, layers)
        await self.record_origin(digest, repository, origin, origin_detail)
        return await self.inspect(f"{repository}@{digest}")

    async def record_origin(
        self, digest: str, repository: str, origin: str, origin_detail: str = ""
    ) -> None:
        """Remember how an image came into the catalog (shown by inspect)."""
        if not origin:
            return
        await IMAGES.put(self.store, digest, ImageOrigin(origin, origin_detail, repository))

    async def tag(self, source: str, target: str) -> str:
        """Name an existing image `target` (`name[:tag]`); returns the manifest digest, which
        stays the same. Its blobs are mounted into the target repository, never copied."""
        name = catalog_name(target, "target", "target")
        assert name.tag is not None
        snapshot = await self.names.current()
        found, content = await self.image(source, snapshot)
        repository = name.repository
        if repository not in snapshot.manifests.get(found.digest, {}):
            for blob in content.blobs:
                if not await self.registry.mount_blob(repository, blob.digest, found.repository):
                    raise FailedPrecondition(
                        f"blob {blob.digest} of {source} is missing from repository "
                        f"{found.repository}; the image is damaged",
                        reason="IMAGE_DAMAGED",
                        metadata={"digest": blob.digest, "repository": found.repository},
                        resource=("blob", blob.digest),
                    )
        return await self.registry.put_manifest(
            repository, name.tag, content.media_type, content.manifest
        )

    async def remove(self, ref: str, force: bool = False) -> Removal:
        """`docker rmi`: `name:tag` untags, and deletes the image when no repository has it
        tagged any more; `name@digest` deletes the manifest from that repository; a digest,
        id or id prefix deletes it from every repository with all its tags. The builder's
        cache repository keeps its copy (FAILED_PRECONDITION when only it holds the image).
        Blobs no other manifest references are reported as deleted: the registry's GC frees
        them later."""
        snapshot = await self.names.current()
        target = await self.target(ref, snapshot)
        content = await self.content(target.digest, target.repository)
        # What the removal needs, read at once (the watch changes the names as it goes on).
        plan = removal_plan(target, snapshot)
        ledger = Ledger(snapshot, [target.digest])
        if not force:
            check_unused(plan, target.digest, content.id, await self.container_uses(snapshot))
        removal, _ = await self._execute(plan, target.digest, content, ledger)
        return removal

    async def prune(self, all: bool = False) -> tuple[list[Removal], int]:
        """Delete dangling manifests (no tag in their repository), and with `all` every image
        no container uses. Returns what each removal did and the bytes of blobs no manifest
        references any more (freed by the registry's GC)."""
        snapshot = await self.snapshot()
        images = {d: c for d, c in (await self.contents(snapshot)).items() if c.is_image}
        used = {u.digest for u in await self.container_uses(snapshot) if u.digest}
        # Read once; each removal updates it (no walk of the catalog per removal).
        ledger = Ledger(snapshot, images)
        plans = [
            (digest, Plan([], [repo], whole=False))
            for repo, digest in _dangling(snapshot, images)
            if digest not in used and repo != CACHE_REPOSITORY
        ]
        if all:
            # The builder's copy in its cache repository stays: its cache records need it.
            plans += [
                (digest, Plan([], _outside_cache(snapshot.holders(digest)), whole=True))
                for digest in sorted(images)
                if digest not in used and snapshot.tags_of(digest)
            ]
        removals, reclaimed = [], 0
        for digest, plan in plans:
            # A dangling copy may already have gone with its whole image.
            plan.delete_from = [r for r in plan.delete_from if r in ledger.copies[digest]]
            if plan.delete_from:
                removal, freed = await self._execute(plan, digest, images[digest], ledger)
                removals.append(removal)
                reclaimed += freed
        metrics.observe_catalog(
            *catalog_figures({d: c for d, c in images.items() if ledger.copies[d]})
        )
        return removals, reclaimed

    async def _execute(
        self,
        plan: Plan,
        digest: str,
        content: Content,
        ledger: Ledger,
    ) -> tuple[Removal, int]:
        """Carry out a removal plan. The ledger is updated, so removals in a row report each
        freed blob once. Returns what was done and the bytes freed."""
        removal = Removal()
        for repo, tag in plan.untag:
            try:
                await self.registry.delete_tag(repo, tag)
            except NotFound:
                continue  # removed concurrently: the outcome is the same
            removal.untagged.append(f"{repo}:{tag}")
        copies = []  # repositories whose untagged copy went
        for repo in plan.delete_from:
            try:
                deleted = await self.registry.delete_manifest(repo, digest)
                removal.untagged += [f"{repo}:{tag}" for tag in deleted.deleted_tags]
                if not deleted.deleted_tags:
                    copies.append(repo)
            except NotFound:
                pass  # deleted concurrently
            ledger.deleted(repo, digest)
        if ledger.copies[digest]:
            removal.untagged += [f"{repo}@{digest}" for repo in copies]
            return removal, 0
        await IMAGES.delete(self.store, digest)
        freed = unreferenced(content.blobs, ledger.referenced(content.blobs))
        removal.deleted = [digest, *(blob.digest for blob in freed)]
        return removal, len(content.manifest) + sum(blob.size for blob in freed)


@dataclass
class Plan:
    """What a removal does: tags to delete, repositories to delete the manifest from, and
    whether that takes it out of the catalog altogether."""

    untag: list[tuple[str, str]]
    delete_from: list[str]
    whole: bool


class Ledger:
    """What removals in a row need to know of the catalog, read once from the names: the
    repositories holding each manifest to remove (with what each copy references), and how
    many copies anywhere reference each of those digests. Each deletion updates it, so a
    removal knows what it frees without walking the catalog."""

    def __init__(self, snapshot: Snapshot, digests: Iterable[str]) -> None:
        # manifest digest -> {repository: its references there}, the copies not deleted yet
        self.copies = {d: dict(snapshot.manifests.get(d, {})) for d in digests}
        copies = [refs for by_repo in self.copies.values() for refs in by_repo.values()]
        self.users = {r: snapshot.users.get(r, 0) for refs in copies for r in refs}

    def deleted(self, repository: str, digest: str) -> None:
        references = self.copies[digest].pop(repository, None)
        for reference in set(references or ()):
            self.users[reference] -= 1

    def referenced(self, blobs: Iterable[Descriptor]) -> set[str]:
        """Those of `blobs` a remaining manifest still references."""
        return {b.digest for b in blobs if self.users.get(b.digest, 0) > 0}


def removal_plan(target: Target, snapshot: Snapshot) -> Plan:
    """See Catalog.remove for the rules. The builder's copy in its cache repository is never
    part of a plan: its cache records name it (as `docker rmi` leaves BuildKit's cache
    alone), and naming only that copy is refused."""
    holders = snapshot.holders(target.digest)
    visible = _outside_cache(holders)
    if target.repository == CACHE_REPOSITORY or not visible:
        raise in_build_cache(target.digest)
    # Whole: nothing of it stays, not even the cache's copy.
    whole = visible == holders
    if target.by == "tag":
        assert target.tag is not None
        others = [
            t for t in snapshot.tags_of(target.digest) if t != (target.repository, target.tag)
        ]
        untag = [(target.repository, target.tag)]
        if others:
            return Plan(untag, [], whole=False)
        return Plan(untag, visible, whole=whole)
    if target.by == "digest":
        return Plan([], [target.repository], whole=holders == [target.repository])
    return Plan([], visible, whole=whole)


def in_build_cache(digest: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"image {digest} is held only by the builder's cache ({CACHE_REPOSITORY}), whose "
        "records use it; `berth builder prune` removes it",
        reason="IMAGE_IN_BUILD_CACHE",
        metadata={"image": digest, "repository": CACHE_REPOSITORY},
        resource=("image", digest),
    )


def check_unused(plan: Plan, digest: str, image_id: str, uses: Iterable[ContainerUse]) -> None:
    """Refuse (like Docker) a removal that takes away the name or the image a container was
    created from; the error names every such container (one precondition violation each)."""
    untagged = set(plan.untag)
    users = []
    for use in uses:
        names_tag = use.tag is not None and (use.repository, use.tag) in untagged
        loses_image = use.digest == digest and (plan.whole or use.repository in plan.delete_from)
        if names_tag or loses_image:
            users.append(use)
    if not users:
        return
    if plan.untag:
        repo, tag = plan.untag[0]
        what = f'remove repository reference "{repo}:{tag}" (must force)'
    else:
        what = f"delete {image_id.removeprefix('sha256:')[:12]} (must be forced)"
    raise FailedPrecondition(
        f"conflict: unable to {what} - image is being used by container {users[0].id[:12]}",
        reason="IMAGE_IN_USE",
        metadata={"image": digest, "containers": ",".join(u.id for u in users)},
        resource=("image", digest),
        violations=[
            Violation(
                "IMAGE_IN_USE",
                f"container/{use.id}",
                f"container {use.id[:12]} was created from "
                + (f"{use.repository}:{use.tag}" if use.tag else f"{use.repository}@{digest}"),
            )
            for use in users
        ],
    )


def catalog_figures(images: Mapping[str, Content]) -> tuple[int, int]:
    """(distinct images, bytes of the distinct blobs they use)."""
    sizes = {blob.digest: blob.size for c in images.values() for blob in c.blobs}
    return len(images), sum(sizes.values())


def _outside_cache(repositories: list[str]) -> list[str]:
    return [r for r in repositories if r != CACHE_REPOSITORY]


def _dangling(snapshot: Snapshot, images: Mapping[str, Content]) -> list[tuple[str, str]]:
    """(repository, digest) of image manifests with no tag in their repository, except those
    an index in the same repository lists (they are part of a multi-platform image)."""
    tagged = {(repo, digest) for (repo, _), digest in snapshot.tags.items()}
    children = {
        (repo, child)
        for by_repo in snapshot.manifests.values()
        for repo, references in by_repo.items()
        for child in references
    }
    return sorted(
        (repo, digest)
        for digest, by_repo in snapshot.manifests.items()
        if digest in images
        for repo in by_repo
        if (repo, digest) not in tagged and (repo, digest) not in children
    )


def _list_filter(reference: str) -> Reference | None:
    if not reference:
        return None
    parsed = reference_of(reference, "reference", default_tag=None)
    if parsed.registry is not None or parsed.digest is not None:
        raise invalid_reference(
            f"list filter {quoted(reference)} must be a repository or repo:tag",
            "reference",
            reference,
        )
    return parsed


def _wanted(wanted: Reference | None, repo: str, tag: str | None) -> bool:
    if wanted is None:
        return True
    return wanted.repository == repo and (wanted.tag is None or wanted.tag == tag)
