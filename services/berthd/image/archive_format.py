"""The archive formats save and load share: tar headers, the OCI layout's files, Docker's
manifest.json, names, reading a tar's members, and docker-archive layers.

Both formats berth writes are an OCI image layout in a tar: `oci-layout`, `index.json` (one
descriptor per image, named by the `org.opencontainers.image.ref.name` (tag) and
`io.containerd.image.name` (full name) annotations) and `blobs/sha256/<hex>` for manifests,
configs and layers. A docker-archive adds Docker's `manifest.json` and the legacy
`repositories` file, as Docker 25 writes them, so the same tar loads into docker, podman and
skopeo (`docker-archive:`) and still keeps manifest digests when berth loads it back.

Older docker-archives (`docker save` before 25, podman, skopeo) have only `manifest.json`,
whose entries name a config file and layer files in one of three styles: `<id>/layer.tar`,
`<hex>.tar` or `blobs/sha256/<hex>`.
"""

from __future__ import annotations

import json
import os
import posixpath
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from isal import isal_zlib

from berthd.common.errors import DataLoss, InvalidArgument
from berthd.common.oci import mediatypes
from berthd.common.oci.digest import Digester, hex_of, quoted
from berthd.common.oci.manifest import Descriptor, encode_json
from berthd.common.oci.reference import parse_reference

ArchiveFormat = Literal["docker", "oci"]
FORMATS: tuple[ArchiveFormat, ...] = ("docker", "oci")

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
DOCKER_MANIFEST_FILE = "manifest.json"
REPOSITORIES_FILE = "repositories"
BLOBS_DIR = "blobs/sha256/"
LAYOUT_CONTENT = encode_json({"imageLayoutVersion": "1.0.0"})
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"

BLOCK = 512
END_OF_ARCHIVE = bytes(2 * BLOCK)
CHUNK_SIZE = 1 << 20
# manifest.json, index.json, manifests and configs are documents, never bulk data.
MAX_DOCUMENT_BYTES = 16 << 20
_MAX_LINKS = 16  # links followed to reach one member
GZIP_MAGIC = b"\x1f\x8b"
_GZIP_WBITS = 31  # zlib's "gzip container" setting
_OTHER_COMPRESSIONS = (
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)
# Docker Hub's names as `docker save` and podman write them; `library/` is the Hub's
# namespace for official images, which Docker shows without it.
_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


# --- tar -----------------------------------------------------------------------------------


def tar_header(name: str, size: int = 0, directory: bool = False) -> bytes:
    """The header block(s) of one member, the same for the same name and size: mtime 0,
    owner 0:0 without names, mode 0644 (0755 for directories). PAX format, so names and
    sizes past ustar's limits still work (tarfile adds a pax record only when needed)."""
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    info.size = 0 if directory else size
    info.mode = 0o755 if directory else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


def tar_padding(size: int) -> bytes:
    """Zeros that fill a member's data to the next 512-byte block."""
    return bytes(-size % BLOCK)


def member_name(name: str) -> str:
    """A member name in the form the formats use (`./x` is `x`); refuses names that could
    point outside the archive's root, naming the member."""
    if name.startswith("/"):
        raise InvalidArgument(f"archive member {quoted(name)} has an absolute path; refusing it")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidArgument(f"archive member {quoted(name)} has a '..' component; refusing it")
    return "/".join(parts)


def link_target(member: str, linkname: str, symbolic: bool) -> str:
    """Where a link member points, as a member name: a symlink is relative to its directory,
    a hard link names a member. Refuses targets outside the archive."""
    if linkname.startswith("/"):
        raise InvalidArgument(
            f"archive member {quoted(member)} links to the absolute path {quoted(linkname)}"
        )
    target = posixpath.join(posixpath.dirname(member), linkname) if symbolic else linkname
    normalized = posixpath.normpath(target)
    if normalized == ".." or normalized.startswith("../"):
        raise InvalidArgument(
            f"archive member {quoted(member)} links outside the archive ({quoted(linkname)})"
        )
    return member_name(normalized)


# --- the OCI layout --------------------------------------------------------------------------


def blob_path(digest: str) -> str:
    return BLOBS_DIR + hex_of(digest)


def name_annotations(repository: str, tag: str) -> dict[str, str]:
    """How Docker 25 and containerd name an image in index.json: the tag alone (what
    `oci-archive:FILE:TAG` selects) and the full name."""
    return {CONTAINERD_NAME: f"{repository}:{tag}", REF_NAME: tag}


def index_content(manifests: list[Descriptor]) -> bytes:
    return encode_json(
        {
            "schemaVersion": 2,
            "mediaType": mediatypes.OCI_IMAGE_INDEX,
            "manifests": [d.to_dict() for d in manifests],
        }
    )


# --- Docker's manifest.json ----------------------------------------------------------------


@dataclass(frozen=True)
class DockerEntry:
    """One image of a docker-archive's manifest.json: member names of its config and layers
    (bottom first), and its names as written (`docker.io/library/x:1`, `x:1`)."""

    config: str
    repo_tags: tuple[str, ...]
    layers: tuple[str, ...]


def parse_docker_manifest(content: bytes) -> list[DockerEntry]:
    """Parse manifest.json; member names are normalized and checked like member names."""
    try:
        doc = json.loads(content)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidArgument(f"{DOCKER_MANIFEST_FILE} is not valid JSON: {e}") from e
    if not isinstance(doc, list) or not doc:
        raise InvalidArgument(f"{DOCKER_MANIFEST_FILE} must be a non-empty array of images")
    return [_docker_entry(item, f"{DOCKER_MANIFEST_FILE}[{i}]") for i, item in enumerate(doc)]


def _docker_entry(item: Any, where: str) -> DockerEntry:
    if not isinstance(item, dict):
        raise InvalidArgument(f"{where} must be an object, got {quoted(item)}")
    config = item.get("Config")
    if not isinstance(config, str) or not config:
        raise InvalidArgument(f"{where}.Config must be a member name, got {quoted(config)}")
    tags = item.get("RepoTags") or []
    layers = item.get("Layers")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidArgument(f"{where}.RepoTags must be an array of names, got {quoted(tags)}")
    if not isinstance(layers, list) or not all(isinstance(x, str) and x for x in layers):
        raise InvalidArgument(
            f"{where}.Layers must be an array of member names, got {quoted(layers)}"
        )
    return DockerEntry(member_name(config), tuple(tags), tuple(member_name(x) for x in layers))


# --- names ----------------------------------------------------------------------------------


def loaded_name(text: str, where: str) -> tuple[str, str]:
    """The (repository, tag) an archive's image name gets in berth's catalog.

    `docker.io/library/x:1`, `library/x:1` and `localhost/x:1` (podman's local images) are
    `x:1`. Another registry's host is dropped too (`quay.io/a/b:1` is `a/b:1`): a loaded
    image lives in berth's registry, whose names have no host, so the name it had there is
    the closest one it can keep. No tag means `latest`. `where` prefixes every error.
    """
    try:
        ref = parse_reference(text)
    except InvalidArgument as e:
        raise InvalidArgument(f"{where}: {e}") from e
    if ref.tag is None:
        raise InvalidArgument(f"{where}: {quoted(text)} names a digest; a tag is needed here")
    repository = ref.repository
    if ref.registry is None or ref.registry in _HUB_HOSTS:
        repository = repository.removeprefix("library/")
    return repository, ref.tag


def user_reference(text: str) -> tuple[str, str | None]:
    """The `reference` option of a load: `name[:tag]` without a host; tag None when absent."""
    ref = parse_reference(text, default_tag=None)
    if ref.registry is not None or ref.digest is not None:
        raise InvalidArgument(
            f"invalid reference {quoted(text)}: give name[:tag] in berth's catalog, without a "
            "registry host or digest"
        )
    return ref.repository, ref.tag


# --- reading a tar ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """Where a member's bytes are in the spool file (links already followed)."""

    name: str
    offset: int
    size: int


class Archive:
    """A spooled tar's members by name. Every read opens the file itself, so reads may run in
    several threads at once."""

    def __init__(self, path: Path, members: dict[str, tarfile.TarInfo]) -> None:
        self.path = path
        self._members = members

    @classmethod
    def open(cls, path: Path) -> Archive:
        size = path.stat().st_size
        try:
            with tarfile.open(path, "r:") as tar:
                infos = tar.getmembers()
        except tarfile.TarError as e:
            problem = "is truncated" if "unexpected end" in str(e) else "is not a tar file"
            raise InvalidArgument(f"the archive {problem} ({e})") from e
        members: dict[str, tarfile.TarInfo] = {}
        for info in infos:
            name = member_name(info.name)
            if info.isreg() and info.offset_data + info.size > size:
                raise InvalidArgument(
                    f"the archive is truncated: member {quoted(info.name)} ends past its end"
                )
            members[name] = info  # a later member of the same name wins, as in tar
        return cls(path, members)

    def has(self, name: str) -> bool:
        return name in self._members

    def entry(self, name: str, what: str) -> Entry:
        """Member `name`, needed as `what` (said in errors), with links followed."""
        current = name
        for _ in range(_MAX_LINKS):
            info = self._members.get(current)
            if info is None:
                raise InvalidArgument(f"the archive has no member {quoted(current)} ({what})")
            if info.issym() or info.islnk():
                current = link_target(current, info.linkname, info.issym())
                continue
            if not info.isreg() or info.issparse():
                raise InvalidArgument(
                    f"archive member {quoted(current)} ({what}) is not a regular file"
                )
            return Entry(current, info.offset_data, info.size)
        raise InvalidArgument(f"archive member {quoted(name)} ({what}): too many links")

    def read(self, entry: Entry, limit: int = MAX_DOCUMENT_BYTES) -> bytes:
        if entry.size > limit:
            raise InvalidArgument(
                f"archive member {quoted(entry.name)} is {entry.size} bytes, too large for a "
                f"document of its kind (the limit is {limit})"
            )
        with self.open_at(entry) as f:
            return f.read(entry.size)

    def head(self, entry: Entry, size: int) -> bytes:
        with self.open_at(entry) as f:
            return f.read(min(size, entry.size))

    def chunks(self, entry: Entry) -> Iterator[bytes]:
        with self.open_at(entry) as f:
            left = entry.size
            while left > 0:
                data = f.read(min(CHUNK_SIZE, left))
                if not data:
                    raise InvalidArgument(f"the archive is truncated in {quoted(entry.name)}")
                left -= len(data)
                yield data

    def open_at(self, entry: Entry) -> BinaryIO:
        """The spool file, positioned at the member's first byte."""
        f = open(self.path, "rb")  # noqa: SIM115 - the caller closes it
        f.seek(entry.offset)
        return f


# --- docker-archive layers ----------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """A docker-archive layer as the gzip blob berth stores: the member as it is (`member`),
    or compressed into the file `path`."""

    descriptor: Descriptor
    diff_id: str  # sha256 of the uncompressed tar
    member: Entry | None = None
    path: Path | None = None


def prepare_layer(archive: Archive, entry: Entry, workdir: Path) -> Layer:
    """Read a layer member once: a gzip member is kept as it is, a plain tar is compressed
    (ISA-L level 1) into a file in `workdir`; either way its diff_id is computed."""
    head = archive.head(entry, 8)
    if head.startswith(GZIP_MAGIC):
        digest, diff_id = _gunzip_digests(archive.chunks(entry), entry.name)
        return Layer(Descriptor(mediatypes.OCI_LAYER_TAR_GZIP, digest, entry.size), diff_id, entry)
    for magic, kind in _OTHER_COMPRESSIONS:
        if head.startswith(magic):
            raise InvalidArgument(
                f"archive member {quoted(entry.name)} is a {kind}-compressed layer; "
                "docker-archive layers must be plain or gzip tars"
            )
    fd, name = tempfile.mkstemp(suffix=".tar.gz", dir=workdir)
    compressed, raw = Digester(), Digester()
    compressor = isal_zlib.compressobj(1, isal_zlib.DEFLATED, _GZIP_WBITS)
    with os.fdopen(fd, "wb") as out:
        for chunk in archive.chunks(entry):
            raw.update(chunk)
            data = compressor.compress(chunk)
            compressed.update(data)
            out.write(data)
        data = compressor.flush()
        compressed.update(data)
        out.write(data)
    descriptor = Descriptor(mediatypes.OCI_LAYER_TAR_GZIP, compressed.digest, compressed.size)
    return Layer(descriptor, raw.digest, path=Path(name))


def _gunzip_digests(chunks: Iterator[bytes], name: str) -> tuple[str, str]:
    """The digests of a gzip stream and of what it uncompresses to. Several gzip members
    in a row (pigz writes them) are one stream, as gzip(1) reads them."""
    compressed, raw = Digester(), Digester()
    decompressor = isal_zlib.decompressobj(_GZIP_WBITS)
    in_member = False  # a gzip member has begun and not ended
    try:
        for chunk in chunks:
            compressed.update(chunk)
            pending = chunk
            while pending:
                in_member = True
                # Bounded output per call: a small chunk may inflate to a lot.
                raw.update(decompressor.decompress(pending, CHUNK_SIZE))
                if decompressor.eof:
                    pending = decompressor.unused_data
                    decompressor = isal_zlib.decompressobj(_GZIP_WBITS)
                    in_member = False
                else:
                    pending = decompressor.unconsumed_tail
        # Output the bound held back after the last input.
        while in_member and (data := decompressor.decompress(b"", CHUNK_SIZE)):
            raw.update(data)
    except isal_zlib.error as e:
        raise DataLoss(f"archive member {quoted(name)} is not a valid gzip stream ({e})") from e
    if in_member and not decompressor.eof:
        raise DataLoss(f"archive member {quoted(name)} is a truncated gzip stream")
    return compressed.digest, raw.digest
