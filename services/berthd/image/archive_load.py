"""Load docker-archive and OCI-layout tars (see archive_format) into berth's registry.

The upload is spooled to a scratch file (with a size cap), then read with tarfile for random
access: only member names and data offsets are kept, and blobs are read from the spool at
their offsets, never extracted. Member names that could point outside the archive are
refused even though nothing is written under them: such an archive is hostile or broken.

An OCI layout (skopeo `oci-archive:`, podman `--format oci-archive`, berth) is stored as it
is: blobs pushed as they are (the registry checks each against its digest as it arrives),
manifests put byte-identical, so every digest survives. An image index under a name (a
multi-platform image) is stored as well, under that name, when the archive holds every
manifest it lists; when some are missing (a save of one platform), the name goes to the one
image that is there, and the index digest is lost. A docker-archive that also carries
an index.json describing the same images (Docker 25, berth) is read the same way. An older
docker-archive (`docker save` before 25, podman, skopeo `docker-archive:`) has no manifests:
each image gets a new OCI manifest over its config, kept byte for byte (it is the image id),
and its layers as gzip blobs, each checked against the config's diff_id.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from isal import igzip, igzip_lib

from berthd.common.errors import DataLoss, InvalidArgument, ResourceExhausted
from berthd.common.oci import mediatypes
from berthd.common.oci.digest import digest_bytes, quoted
from berthd.common.oci.manifest import (
    Descriptor,
    ParsedManifest,
    parse_image_config,
    parse_manifest,
)
from berthd.common.oci.reference import validate_tag
from berthd.common.streaming import run_limited, spool_upload
from berthd.image import metrics
from berthd.image.archive_format import (
    CHUNK_SIZE,
    CONTAINERD_NAME,
    DOCKER_MANIFEST_FILE,
    GZIP_MAGIC,
    INDEX_FILE,
    REF_NAME,
    Archive,
    DockerEntry,
    Entry,
    Layer,
    blob_path,
    loaded_name,
    parse_docker_manifest,
    prepare_layer,
    user_reference,
)
from berthd.image.catalog import Catalog
from berthd.image.model import ORIGIN_LOAD, Event, ImageDetail, Report, State, Unit, ignore

DEFAULT_MAX_ARCHIVE_BYTES = 64 << 30
_MAX_INDEX_DEPTH = 4  # nested image indexes followed
DETAIL_DOCKER = "docker-archive"
# Blobs pushed to the registry at once, as pulls and pushes move them.
PARALLEL_PUSHES = 3
DETAIL_OCI = "oci-archive"

Name = tuple[str, str]  # (repository, tag) in berth's catalog


# --- the upload ---------------------------------------------------------------------------


async def spool(chunks: AsyncIterator[bytes], dest: Path, max_bytes: int) -> Path:
    """Write the upload to `dest`; a gzip-compressed archive (`docker save | gzip`) is
    decompressed, so tarfile can seek in it. Both sizes are capped at `max_bytes`."""
    too_large = f"the archive is larger than the {max_bytes}-byte limit"
    if await spool_upload(chunks, dest, max_bytes, too_large) == 0:
        raise InvalidArgument("the archive is empty")
    with open(dest, "rb") as f:
        compressed = f.read(2) == GZIP_MAGIC
    if not compressed:
        return dest
    plain = dest.with_name(dest.name + ".tar")
    await asyncio.to_thread(_gunzip_file, dest, plain, max_bytes)
    dest.unlink()
    return plain


def _gunzip_file(source: Path, dest: Path, max_bytes: int) -> None:
    total = 0
    try:
        with open(source, "rb") as f, igzip.IGzipFile(fileobj=f) as gz, open(dest, "wb") as out:
            while data := gz.read(CHUNK_SIZE):
                total += len(data)
                if total > max_bytes:
                    raise ResourceExhausted(
                        f"the decompressed archive is larger than the {max_bytes}-byte limit"
                    )
                out.write(data)
    except (igzip.BadGzipFile, igzip_lib.IsalError, EOFError) as e:
        raise InvalidArgument(f"the archive is gzip-compressed but corrupt ({e})") from e


# --- what to load -------------------------------------------------------------------------


@dataclass(frozen=True)
class LayoutImage:
    """An image manifest of an OCI layout, as stored there."""

    descriptor: Descriptor
    content: bytes
    parsed: ParsedManifest
    runnable: bool  # False for attestations and other non-images (platform unknown/unknown)


@dataclass
class Naming:
    """The names an image gets: from the archive, or else from the `reference` option."""

    where: str  # for messages: `index.json manifests[0]`, `manifest.json[1]`
    names: list[Name] = field(default_factory=list)
    bare_tag: str | None = None  # a ref.name that is only a tag: the repository is unknown


@dataclass
class Target:
    """One entry of index.json: what its names will point at (an image manifest, or an
    image index with every child present) and the images to store before it."""

    naming: Naming
    media_type: str
    content: bytes
    images: list[LayoutImage]


@dataclass(frozen=True)
class DockerImage:
    """One entry of an older docker-archive's manifest.json, read and checked."""

    config: bytes
    layers: list[Layer]


def read_layout(archive: Archive) -> list[Target]:
    """Every named (or nameable) entry of index.json with the images under it."""
    index = _read_manifest(archive, INDEX_FILE, archive.entry(INDEX_FILE, "the layout's index"))
    if index.parsed.kind != "index":
        raise InvalidArgument(f"{INDEX_FILE} is an image manifest, not an image index")
    targets = []
    for i, descriptor in enumerate(index.parsed.manifests):
        where = f"{INDEX_FILE} manifests[{i}]"
        target = _layout_target(archive, descriptor, layout_naming(descriptor.annotations, where))
        if target is not None:
            targets.append(target)
    if not targets:
        raise InvalidArgument(f"the archive's {INDEX_FILE} lists no image")
    return targets


@dataclass(frozen=True)
class _Document:
    content: bytes
    parsed: ParsedManifest


def _read_manifest(archive: Archive, where: str, entry: Entry, media_type: str = "") -> _Document:
    content = archive.read(entry)
    try:
        return _Document(content, parse_manifest(content, media_type or None))
    except InvalidArgument as e:
        raise InvalidArgument(f"archive member {quoted(entry.name)} ({where}): {e}") from e


def _read_blob_manifest(archive: Archive, descriptor: Descriptor, where: str) -> _Document:
    entry = archive.entry(blob_path(descriptor.digest), f"manifest of {where}")
    document = _read_manifest(archive, where, entry, descriptor.media_type)
    if digest_bytes(document.content) != descriptor.digest:
        raise DataLoss(
            f"archive member {quoted(entry.name)} ({where}) does not match its digest "
            f"{descriptor.digest}"
        )
    return document


def _layout_target(archive: Archive, descriptor: Descriptor, naming: Naming) -> Target | None:
    """The target of one index.json entry, or None for an entry that is no image."""
    where = naming.where
    if descriptor.media_type in mediatypes.IMAGE_MANIFEST_TYPES:
        document = _read_blob_manifest(archive, descriptor, where)
        image = LayoutImage(descriptor, document.content, document.parsed, True)
        return Target(naming, descriptor.media_type, document.content, [image])
    if descriptor.media_type not in mediatypes.INDEX_TYPES:
        return None
    document = _read_blob_manifest(archive, descriptor, where)
    images, complete = _index_images(archive, document.parsed, where, 1)
    if complete:
        return Target(naming, descriptor.media_type, document.content, images)
    # Some platforms' blobs were left out (docker save of one platform of a multi-platform
    # image): the index cannot be stored, so its name goes to the one image that is here.
    runnable = [image for image in images if image.runnable]
    if len(runnable) != 1:
        raise InvalidArgument(
            f"{where} is an image index whose manifests are partly missing from the archive, "
            f"with {len(runnable)} images present; berth can only name one"
        )
    return Target(naming, runnable[0].descriptor.media_type, runnable[0].content, images)


def _index_images(
    archive: Archive, index: ParsedManifest, where: str, depth: int
) -> tuple[list[LayoutImage], bool]:
    """The images an index leads to that the archive holds, and whether it holds them all."""
    if depth > _MAX_INDEX_DEPTH:
        raise InvalidArgument(f"{where}: image indexes nested more than {_MAX_INDEX_DEPTH} deep")
    images: list[LayoutImage] = []
    complete = True
    for i, child in enumerate(index.manifests):
        child_where = f"{where} > manifests[{i}]"
        if not archive.has(blob_path(child.digest)):
            complete = False
            continue
        document = _read_blob_manifest(archive, child, child_where)
        if document.parsed.kind == "index":
            nested, nested_complete = _index_images(
                archive, document.parsed, child_where, depth + 1
            )
            images += nested
            complete = complete and nested_complete
            continue
        platform = child.platform or {}
        runnable = platform.get("os") != "unknown"
        images.append(LayoutImage(child, document.content, document.parsed, runnable))
    return images, complete


def layout_naming(annotations: dict[str, str], where: str) -> Naming:
    """The catalog name an index.json entry gives its image, or the bare tag its ref.name
    gives (`1`, as Docker 25 writes it), which needs a repository from elsewhere."""
    full = annotations.get(CONTAINERD_NAME)
    if full:
        return Naming(where, [loaded_name(full, f"{where} annotation {CONTAINERD_NAME}")])
    ref = annotations.get(REF_NAME)
    if not ref:
        return Naming(where)
    # The ref.name grammar allows full names (`x/y:1`); a plain component is a tag.
    if ":" in ref or "/" in ref:
        return Naming(where, [loaded_name(ref, f"{where} annotation {REF_NAME}")])
    try:
        return Naming(where, bare_tag=validate_tag(ref))
    except InvalidArgument as e:
        raise InvalidArgument(f"{where} annotation {REF_NAME}: {e}") from e


def docker_naming(entry: DockerEntry, where: str) -> Naming:
    naming = Naming(where)
    for i, text in enumerate(entry.repo_tags):
        name = loaded_name(text, f"{where}.RepoTags[{i}]")
        if name not in naming.names:
            naming.names.append(name)
    return naming


def name_unnamed(namings: list[Naming], reference: str) -> None:
    """Give the images without a name in the archive the `reference` option's name.

    A single unnamed image takes the reference as it is (tag `latest` when it has none, or
    the archive's bare tag). Several need a reference without a tag: each keeps its bare tag
    under the reference's repository, and at most one may lack a tag (it gets `latest`).
    """
    unnamed = [n for n in namings if not n.names]
    if not unnamed:
        return
    if not reference:
        raise InvalidArgument("the archive's images have no name; pass a reference")
    repository, tag = user_reference(reference)
    if len(unnamed) == 1:
        only = unnamed[0]
        only.names = [(repository, tag or only.bare_tag or "latest")]
        return
    untagged = [t for t in unnamed if t.bare_tag is None]
    if tag is not None or len(untagged) > 1:
        raise InvalidArgument(
            f"{len(unnamed)} of the archive's images have no name, and one reference can name "
            "only one of them; load them one archive at a time"
        )
    for naming in unnamed:
        naming.names = [(repository, naming.bare_tag or "latest")]


# --- storing --------------------------------------------------------------------------------


@metrics.counted(metrics.LOADS)
async def load_images(
    catalog: Catalog,
    chunks: AsyncIterator[bytes],
    reference: str = "",
    max_bytes: int = DEFAULT_MAX_ARCHIVE_BYTES,
    progress: Report = ignore,
) -> tuple[list[ImageDetail], list[str]]:
    """Store the images of an archive; returns them and the `name:tag` references that now
    name them. `reference` names images the archive leaves unnamed (see name_unnamed).
    Progress: "upload" DONE once the archive is in (the caller reports its bytes as they
    arrive), then "images" (names stored, of how many) RUNNING and DONE.

    Everything is read and checked before the first manifest is stored, so a broken archive
    leaves no image behind (blobs pushed before the error are left to garbage collection).
    """
    if reference:
        user_reference(reference)  # a bad option fails before the upload is read
    # The spool and its prepared layers go in scratch: a full disk is STORAGE_FULL.
    with catalog.disk.guard("cannot load the archive"):
        catalog.scratch.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="load-", dir=catalog.scratch))
        try:
            path = await spool(chunks, workdir / "archive", max_bytes)
            received = path.stat().st_size
            progress(Event("upload", State.DONE, received, received))
            archive = await asyncio.to_thread(Archive.open, path)
            loader = _Loader(catalog, archive, workdir, progress)
            if archive.has(DOCKER_MANIFEST_FILE):
                result = await loader.docker_archive(reference)
            elif archive.has(INDEX_FILE):
                targets = await asyncio.to_thread(read_layout, archive)
                name_unnamed([t.naming for t in targets], reference)
                result = await loader.store_layout(targets, DETAIL_OCI)
            else:
                raise InvalidArgument(
                    f"the archive is neither a docker-archive (no {DOCKER_MANIFEST_FILE}) nor an "
                    f"OCI layout (no {INDEX_FILE})",
                    reason="INVALID_ARCHIVE",
                    field="data",
                )
            stored = len(result[1])
            progress(Event("images", State.DONE, stored, stored, Unit.ITEMS))
            return result
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, True)


class _Loader:
    def __init__(
        self, catalog: Catalog, archive: Archive, workdir: Path, progress: Report = ignore
    ) -> None:
        self.catalog = catalog
        self.archive = archive
        self.workdir = workdir
        self.progress = progress
        self._pushed: set[tuple[str, str]] = set()  # (repository, blob digest)

    def stored(self, done: int, total: int) -> None:
        """Report `done` of `total` names stored."""
        self.progress(Event("images", State.RUNNING, done, total, Unit.ITEMS))

    # --- OCI layouts

    async def store_layout(
        self, targets: list[Target], detail: str
    ) -> tuple[list[ImageDetail], list[str]]:
        placed = [
            (repository, tag, target)
            for target in targets
            for repository, tag in target.naming.names
        ]
        pushes = {
            (repository, blob.digest): functools.partial(
                self._push_blob, repository, blob, f"{what} of {image.descriptor.digest}"
            )
            for repository, _, target in placed
            for image in target.images
            for what, blob in _blobs(image)
        }
        self.stored(0, len(placed))
        await run_limited(pushes.values(), PARALLEL_PUSHES)
        loaded: dict[str, str] = {}  # image digest -> a repository holding it
        for done, (repository, tag, target) in enumerate(placed, 1):
            for image in target.images:
                digest = image.descriptor.digest
                # Byte-identical, so every digest stays what the archive says.
                await self._put_manifest(
                    repository, digest, image.descriptor.media_type, image.content
                )
                await self.catalog.record_origin(digest, repository, ORIGIN_LOAD, detail)
                if image.runnable:
                    loaded.setdefault(digest, repository)
            await self._put_manifest(repository, tag, target.media_type, target.content)
            self.stored(done, len(placed))
        details = [await self.catalog.inspect(f"{r}@{d}") for d, r in loaded.items()]
        return details, [f"{repository}:{tag}" for repository, tag, _ in placed]

    async def _put_manifest(
        self, repository: str, reference: str, media_type: str, content: bytes
    ) -> None:
        await self.catalog.registry.put_manifest(repository, reference, media_type, content)

    async def _push_blob(self, repository: str, blob: Descriptor, what: str) -> None:
        entry = await asyncio.to_thread(self.archive.entry, blob_path(blob.digest), what)
        if entry.size != blob.size:
            raise DataLoss(
                f"archive member {quoted(entry.name)} ({what}) is {entry.size} bytes, but its "
                f"descriptor says {blob.size}"
            )
        await self._push_member(repository, entry, blob.digest, what)

    async def _push_member(self, repository: str, entry: Entry, digest: str, what: str) -> None:
        if (repository, digest) in self._pushed:
            return
        try:
            # Sent from where it lies in the spool; the registry hashes what arrives and
            # refuses a mismatch (DATA_LOSS).
            await self.catalog.registry.push_blob(
                repository, self.archive.path, digest, entry.size, start=entry.offset
            )
        except DataLoss as e:
            raise DataLoss(
                f"archive member {quoted(entry.name)} ({what}) does not match its digest {digest}",
                reason="DIGEST_MISMATCH",
                metadata={"member": entry.name, "expected": digest, **e.details.metadata},
            ) from e
        self._pushed.add((repository, digest))

    # --- docker-archives

    async def docker_archive(self, reference: str) -> tuple[list[ImageDetail], list[str]]:
        manifest = self.archive.entry(DOCKER_MANIFEST_FILE, "the image list")
        entries = parse_docker_manifest(await asyncio.to_thread(self.archive.read, manifest))
        namings = [
            docker_naming(entry, f"{DOCKER_MANIFEST_FILE}[{i}]") for i, entry in enumerate(entries)
        ]
        targets = await asyncio.to_thread(self._docker_layout, entries, namings)
        if targets is not None:
            name_unnamed([t.naming for t in targets], reference)
            return await self.store_layout(targets, DETAIL_DOCKER)
        name_unnamed(namings, reference)  # names settle before anything is read
        layers: dict[str, Layer] = {}  # by member, for layers several images share
        images = [
            await self._read_docker_image(entry, naming.where, layers)
            for entry, naming in zip(entries, namings, strict=True)
        ]
        configs: dict[tuple[str, str], Descriptor] = {}
        total = sum(len(naming.names) for naming in namings)
        self.stored(0, total)
        for image, naming in zip(images, namings, strict=True):
            for repository, _ in naming.names:
                pushed = await self.catalog.registry.push_bytes(
                    repository, image.config, mediatypes.OCI_IMAGE_CONFIG
                )
                configs[repository, pushed.digest] = pushed
                for layer in image.layers:
                    await self._push_layer(repository, layer)
        details: dict[str, ImageDetail] = {}
        done = 0
        for image, naming in zip(images, namings, strict=True):
            for repository, tag in naming.names:
                config = configs[repository, digest_bytes(image.config)]
                layer_descriptors = [layer.descriptor for layer in image.layers]
                detail = await self.catalog.write_manifest(
                    repository, tag, config, layer_descriptors, ORIGIN_LOAD, DETAIL_DOCKER
                )
                details.setdefault(detail.digest, detail)
                done += 1
                self.stored(done, total)
        references = [f"{r}:{t}" for naming in namings for r, t in naming.names]
        return list(details.values()), references

    def _docker_layout(
        self, entries: list[DockerEntry], namings: list[Naming]
    ) -> list[Target] | None:
        """The index.json targets, also named by manifest.json, if index.json describes the
        same images (Docker 25, berth); None to read manifest.json alone."""
        if not self.archive.has(INDEX_FILE):
            return None
        targets = read_layout(self.archive)
        by_config = {
            image.parsed.config.digest: target
            for target in targets
            for image in target.images
            if image.parsed.config is not None
        }
        matched = []
        for entry, naming in zip(entries, namings, strict=True):
            config = self.archive.entry(entry.config, f"config of {naming.where}")
            target = by_config.get(digest_bytes(self.archive.read(config)))
            if target is None:
                return None
            matched.append((target, naming))
        for target, naming in matched:
            target.naming.names += [n for n in naming.names if n not in target.naming.names]
        return targets

    async def _read_docker_image(
        self, entry: DockerEntry, where: str, layers: dict[str, Layer]
    ) -> DockerImage:
        """Read an image's config and layers, checking each layer against its diff_id."""
        config_entry = self.archive.entry(entry.config, f"config of {where}")
        config_bytes = await asyncio.to_thread(self.archive.read, config_entry)
        try:
            config = parse_image_config(config_bytes)
        except InvalidArgument as e:
            raise InvalidArgument(f"archive member {quoted(config_entry.name)}: {e}") from e
        if len(config.diff_ids) != len(entry.layers):
            raise InvalidArgument(
                f"{where} lists {len(entry.layers)} layers but its config "
                f"{quoted(config_entry.name)} has {len(config.diff_ids)} diff_ids"
            )
        image = DockerImage(config_bytes, [])
        for i, (name, diff_id) in enumerate(zip(entry.layers, config.diff_ids, strict=True)):
            member = self.archive.entry(name, f"layer {i} of {where}")
            layer = layers.get(member.name)
            if layer is None:
                layer = await asyncio.to_thread(prepare_layer, self.archive, member, self.workdir)
                layers[member.name] = layer
            if layer.diff_id != diff_id:
                raise DataLoss(
                    f"archive member {quoted(member.name)} (layer {i} of {where}) "
                    f"uncompresses to {layer.diff_id}, but the config's diff_id is {diff_id}"
                )
            image.layers.append(layer)
        return image

    async def _push_layer(self, repository: str, layer: Layer) -> None:
        digest, size = layer.descriptor.digest, layer.descriptor.size
        if layer.member is not None:
            await self._push_member(repository, layer.member, digest, "layer")
        elif (repository, digest) not in self._pushed:
            assert layer.path is not None  # a layer is a member or a file
            await self.catalog.registry.push_blob(repository, layer.path, digest, size)
            self._pushed.add((repository, digest))


def _blobs(image: LayoutImage) -> list[tuple[str, Descriptor]]:
    """An image's config and layers, each with what it is (for messages)."""
    assert image.parsed.config is not None  # only image manifests become LayoutImages
    return [("config", image.parsed.config), *(("layer", x) for x in image.parsed.layers)]
