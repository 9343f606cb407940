"""Save images as one tar stream: a docker-archive or an OCI layout (see archive_format).

The whole archive is planned before its first byte: every reference is resolved (an unknown
one fails before anything is sent), blobs shared between the images are listed once, and
each member's header is built here, so the total size is known up front. Members are sorted
by name and their headers fixed (mtime 0, owner 0:0), so the same images always give the same
bytes. Layers stream from berth's registry one at a time, straight into the archive (hashed
on the way: a blob that does not match its digest fails the save, whose client writes the file
atomically), so memory stays bounded whatever the image's size.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from berthd.common.errors import InvalidArgument
from berthd.common.images import ResolvedImage
from berthd.common.oci.digest import hex_of, quoted
from berthd.common.oci.manifest import Descriptor, encode_json
from berthd.image.archive_format import (
    BLOBS_DIR,
    DOCKER_MANIFEST_FILE,
    END_OF_ARCHIVE,
    FORMATS,
    INDEX_FILE,
    LAYOUT_CONTENT,
    LAYOUT_FILE,
    REPOSITORIES_FILE,
    ArchiveFormat,
    blob_path,
    index_content,
    name_annotations,
    tar_header,
    tar_padding,
)
from berthd.image.catalog import Catalog

CHUNK_SIZE = 1 << 20


@dataclass(frozen=True)
class Member:
    """One member of the archive: a directory, a small file held in memory (`data`), or a
    blob streamed from `repository` in berth's registry."""

    name: str
    size: int = 0
    data: bytes | None = None
    repository: str = ""
    digest: str = ""
    directory: bool = False

    @property
    def header(self) -> bytes:
        return tar_header(self.name, self.size, self.directory)

    @property
    def archived_size(self) -> int:
        return len(self.header) + self.size + len(tar_padding(self.size))


@dataclass(frozen=True)
class SavePlan:
    members: tuple[Member, ...]
    total_size: int  # every byte of the archive, end-of-archive blocks included


@dataclass
class _DockerImage:
    """One entry of manifest.json."""

    config: str
    layers: list[str]
    repo_tags: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {"Config": self.config, "RepoTags": self.repo_tags, "Layers": self.layers}


@dataclass
class _Docker:
    """manifest.json and the legacy repositories file, built image by image."""

    images: dict[str, _DockerImage] = field(default_factory=dict)  # by manifest digest
    repositories: dict[str, dict[str, str]] = field(default_factory=dict)

    def add(self, image: ResolvedImage, config: Descriptor) -> None:
        layers = image.parsed.layers
        entry = self.images.setdefault(
            image.digest,
            _DockerImage(blob_path(config.digest), [blob_path(x.digest) for x in layers]),
        )
        if image.tag is None:
            return
        name = f"{image.repository}:{image.tag}"
        if name not in entry.repo_tags:
            entry.repo_tags.append(name)
        if layers:
            # The legacy file maps each tag to its top layer's id.
            self.repositories.setdefault(image.repository, {})[image.tag] = hex_of(
                layers[-1].digest
            )

    def files(self) -> list[Member]:
        manifest = encode_json([entry.to_json() for entry in self.images.values()])
        repositories = encode_json(self.repositories)
        return [
            Member(DOCKER_MANIFEST_FILE, len(manifest), manifest),
            Member(REPOSITORIES_FILE, len(repositories), repositories),
        ]


def plan_save(images: Sequence[ResolvedImage], fmt: ArchiveFormat) -> SavePlan:
    """Every member of the archive of `images` (as resolved, in the order asked) and its
    total size. An image named by tag is named in the archive; one named by digest is not."""
    if fmt not in FORMATS:
        raise InvalidArgument(f"unknown archive format {quoted(fmt)}: expected docker or oci")
    blobs: dict[str, Member] = {}
    index: list[Descriptor] = []
    docker = _Docker()
    for image in images:
        config = image.parsed.config
        assert config is not None  # resolve() only returns images
        blobs[image.digest] = _blob_in_memory(image.digest, image.manifest)
        blobs[config.digest] = _blob_in_memory(config.digest, image.config_bytes)
        for layer in image.parsed.layers:
            blobs.setdefault(
                layer.digest,
                Member(blob_path(layer.digest), layer.size, None, image.repository, layer.digest),
            )
        annotations = {} if image.tag is None else name_annotations(image.repository, image.tag)
        descriptor = Descriptor(image.media_type, image.digest, len(image.manifest), annotations)
        if descriptor not in index:  # the same image asked for twice
            index.append(descriptor)
        docker.add(image, config)
    index_bytes = index_content(index)
    members = [
        Member("blobs/", directory=True),
        Member(BLOBS_DIR, directory=True),
        *blobs.values(),
        Member(INDEX_FILE, len(index_bytes), index_bytes),
        Member(LAYOUT_FILE, len(LAYOUT_CONTENT), LAYOUT_CONTENT),
        *(docker.files() if fmt == "docker" else []),
    ]
    members.sort(key=lambda m: m.name)
    total = sum(m.archived_size for m in members) + len(END_OF_ARCHIVE)
    return SavePlan(tuple(members), total)


def _blob_in_memory(digest: str, data: bytes) -> Member:
    return Member(blob_path(digest), len(data), data)


async def save_images(
    catalog: Catalog, refs: list[str], fmt: ArchiveFormat
) -> tuple[int, AsyncIterator[bytes]]:
    """The archive's total size, and its bytes in ~1 MiB chunks. Raises (NotFound,
    InvalidArgument, ...) before returning if any reference does not name an image."""
    if not refs:
        raise InvalidArgument("name at least one image to save")
    images = [await catalog.resolve(ref) for ref in refs]
    plan = plan_save(images, fmt)
    return plan.total_size, _stream(catalog, plan)


async def _stream(catalog: Catalog, plan: SavePlan) -> AsyncIterator[bytes]:
    out = _Chunker()
    for member in plan.members:
        for chunk in out.add(member.header):
            yield chunk
        if member.data is not None:
            for chunk in out.add(member.data):
                yield chunk
        elif not member.directory:
            blob = catalog.registry.stream_blob(member.repository, member.digest, member.size)
            async with aclosing(blob) as data:
                async for piece in data:
                    for chunk in out.add(piece):
                        yield chunk
        for chunk in out.add(tar_padding(member.size)):
            yield chunk
    for chunk in out.add(END_OF_ARCHIVE):
        yield chunk
    if out.pending:
        yield out.flush()


class _Chunker:
    """Cuts a byte stream into CHUNK_SIZE pieces (the last one shorter)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def add(self, data: bytes) -> list[bytes]:
        self._buffer += data
        chunks = []
        while len(self._buffer) >= CHUNK_SIZE:
            chunks.append(bytes(self._buffer[:CHUNK_SIZE]))
            del self._buffer[:CHUNK_SIZE]
        return chunks

    def flush(self) -> bytes:
        data = bytes(self._buffer)
        self._buffer.clear()
        return data
