"""Read and write OCI image-layout directories, as skopeo (`oci:DIR:REF`) and umoci use them.

A layout is `oci-layout` ({"imageLayoutVersion": "1.0.0"}), `index.json` (an image index whose
entries carry their name in the `org.opencontainers.image.ref.name` annotation) and blobs under
`blobs/<algorithm>/<hex>`. Standard library only: the client must not depend on berthd.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from berth.files import atomic_write

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
LAYOUT_VERSION = "1.0.0"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"

MEDIA_TYPE_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_TYPE_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_TYPE_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
INDEX_MEDIA_TYPES = frozenset({MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_DOCKER_LIST})

_DIGEST_RE = re.compile(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$")
# One component of the image-layout ref.name grammar. ':' and '/' are excluded because
# DIR:REF splits at the last colon and a '/' after it marks the colon as part of DIR.
_REF_RE = re.compile(r"^[A-Za-z0-9]+(?:(?:[-._@+]|--)[A-Za-z0-9]+)*$")
_DESCRIPTOR_KEYS = ("mediaType", "digest", "size", "annotations", "platform")


class LayoutError(Exception):
    """The directory is not a usable OCI layout, or lacks what was asked for."""


def parse_layout_ref(text: str) -> tuple[str, str | None]:
    """Split `DIR[:REF]` into the directory and the ref name (None when absent).

    Rule: REF is the text after the LAST colon, and only if that text contains no '/'
    (otherwise the colon is part of the path, as in `./v1:2/img`). A directory whose own
    name contains a colon is therefore written with a trailing slash: `./v1:2/` is that
    directory, and `./v1:2/:latest` is its ref "latest". REF uses the ref.name grammar:
    letters and digits joined by '.', '_', '-', '+' or '@'.
    """
    if not text:
        raise LayoutError("empty layout path: expected DIR[:REF]")
    head, sep, tail = text.rpartition(":")
    if not sep or "/" in tail:
        return text, None
    if not head:
        raise LayoutError(f'"{text}" has no directory before the colon: expected DIR[:REF]')
    check_ref_name(tail)
    return head, tail


def check_ref_name(ref: str) -> None:
    if not _REF_RE.match(ref):
        raise LayoutError(
            f'invalid layout reference "{ref}": use letters and digits joined by . _ - + or @'
        )


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


@dataclass(frozen=True)
class Descriptor:
    """An OCI content descriptor. `extra` keeps fields berth does not interpret (urls,
    artifactType, ...), so rewriting index.json loses nothing."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ref_name(self) -> str | None:
        return self.annotations.get(REF_NAME_ANNOTATION)

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Descriptor:
        """Validate and convert a JSON descriptor; `where` names its place in errors."""
        if not isinstance(obj, dict):
            raise LayoutError(f"{where}: descriptor is not a JSON object")
        digest, size = obj.get("digest"), obj.get("size")
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise LayoutError(f"{where}: invalid digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise LayoutError(f"{where}: invalid size {size!r} for {digest}")
        annotations = obj.get("annotations") or {}
        if not isinstance(annotations, dict):
            raise LayoutError(f"{where}: annotations of {digest} are not an object")
        return cls(
            media_type=str(obj.get("mediaType", "")),
            digest=digest,
            size=size,
            annotations={str(k): str(v) for k, v in annotations.items()},
            platform=obj.get("platform"),
            extra={k: v for k, v in obj.items() if k not in _DESCRIPTOR_KEYS},
        )

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        obj["size"] = self.size
        obj.update(self.extra)
        if self.annotations:
            obj["annotations"] = dict(self.annotations)
        if self.platform is not None:
            obj["platform"] = self.platform
        return obj

    def with_ref_name(self, ref: str | None) -> Descriptor:
        annotations = {k: v for k, v in self.annotations.items() if k != REF_NAME_ANNOTATION}
        if ref is not None:
            annotations[REF_NAME_ANNOTATION] = ref
        return Descriptor(
            self.media_type, self.digest, self.size, annotations, self.platform, self.extra
        )


@dataclass(frozen=True)
class Manifest:
    """An image manifest or index: its descriptor, exact bytes and parsed JSON."""

    descriptor: Descriptor
    content: bytes
    data: dict[str, Any]

    @classmethod
    def parse(cls, descriptor: Descriptor, content: bytes) -> Manifest:
        """Parse manifest bytes, checking them against the descriptor's digest and size."""
        actual = compute_digest(content, descriptor.digest.partition(":")[0])
        if len(content) != descriptor.size or actual != descriptor.digest:
            raise LayoutError(f"manifest {descriptor.digest} does not match its digest or size")
        try:
            data = json.loads(content)
        except ValueError as exc:
            raise LayoutError(f"manifest {descriptor.digest} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise LayoutError(f"manifest {descriptor.digest} is not a JSON object")
        return cls(descriptor, content, data)

    @property
    def media_type(self) -> str:
        """The manifest's own mediaType field, else its descriptor's."""
        return str(self.data.get("mediaType") or self.descriptor.media_type)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_MEDIA_TYPES or "manifests" in self.data

    @property
    def config(self) -> Descriptor | None:
        config = self.data.get("config")
        return None if config is None else Descriptor.from_json(config, self._where("config"))

    @property
    def layers(self) -> list[Descriptor]:
        return self._descriptors("layers")

    @property
    def children(self) -> list[Descriptor]:
        return self._descriptors("manifests")

    def _descriptors(self, key: str) -> list[Descriptor]:
        items = self.data.get(key) or []
        if not isinstance(items, list):
            raise LayoutError(f"{self._where(key)} is not a list")
        return [Descriptor.from_json(d, self._where(f"{key}[{i}]")) for i, d in enumerate(items)]

    def _where(self, key: str) -> str:
        return f"manifest {self.descriptor.digest} {key}"


class ImageLayout:
    """An OCI image-layout directory. `open()` an existing one or `create()` one."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> ImageLayout:
        """Open an existing layout, checking oci-layout and index.json."""
        layout = cls(root)
        if not layout.root.exists():
            raise LayoutError(f"no OCI layout at {layout.root}: the directory does not exist")
        if not layout.root.is_dir():
            raise LayoutError(f"{layout.root} is not a directory, so not an OCI layout")
        layout._check_version()
        layout.read_index()
        return layout

    @classmethod
    def create(cls, root: str | os.PathLike[str]) -> ImageLayout:
        """Open the layout at root, creating it if the directory is absent or empty."""
        layout = cls(root)
        if layout.root.exists() and not layout.root.is_dir():
            raise LayoutError(f"{layout.root} exists and is not a directory")
        if (layout.root / LAYOUT_FILE).exists():
            return cls.open(root)
        # Never turn a directory holding other files into a layout by accident.
        if layout.root.is_dir() and any(layout.root.iterdir()):
            raise LayoutError(f"{layout.root} is not empty and is not an OCI layout")
        (layout.root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        layout._write_json(INDEX_FILE, {"schemaVersion": 2, "manifests": []})
        # oci-layout goes last: its presence marks a complete layout.
        layout._write_json(LAYOUT_FILE, {"imageLayoutVersion": LAYOUT_VERSION})
        return layout

    # --- reading -----------------------------------------------------------------------------

    def read_index(self) -> dict[str, Any]:
        """index.json, parsed and checked."""
        index = self._read_json(INDEX_FILE)
        if index.get("schemaVersion") != 2:
            raise LayoutError(f"{self.root / INDEX_FILE}: schemaVersion must be 2")
        if not isinstance(index.get("manifests", []), list):
            raise LayoutError(f"{self.root / INDEX_FILE}: manifests is not a list")
        return index

    def manifests(self) -> list[Descriptor]:
        """The top-level entries of index.json."""
        entries = self.read_index().get("manifests", [])
        where = str(self.root / INDEX_FILE)
        return [Descriptor.from_json(e, f"{where} manifests[{i}]") for i, e in enumerate(entries)]

    def refs(self) -> list[str]:
        """Ref names present in index.json, in index order."""
        return [d.ref_name for d in self.manifests() if d.ref_name is not None]

    def resolve(self, ref: str | None = None) -> Descriptor:
        """The index entry named ref; without ref, the only entry of the index.

        Like skopeo, the first entry with the name wins if several carry it.
        """
        entries = self.manifests()
        if ref is not None:
            for descriptor in entries:
                if descriptor.ref_name == ref:
                    return descriptor
            raise LayoutError(f'no image "{ref}" in OCI layout {self.root}; {self._refs_hint()}')
        if len(entries) == 1:
            return entries[0]
        if not entries:
            raise LayoutError(f"OCI layout {self.root} holds no images")
        raise LayoutError(
            f"OCI layout {self.root} holds {len(entries)} images, name one as "
            f"{self.root}:REF; {self._refs_hint()}"
        )

    def blob_path(self, digest: str) -> Path:
        if not _DIGEST_RE.match(digest):
            raise LayoutError(f"invalid digest {digest!r}")
        algorithm, _, hexdigest = digest.partition(":")
        return self.root / "blobs" / algorithm / hexdigest

    def has_blob(self, digest: str, size: int | None = None) -> bool:
        """Whether the blob is present (with that size, when given). Content is not rehashed."""
        try:
            actual = self.blob_path(digest).stat().st_size
        except FileNotFoundError:
            return False
        return size is None or actual == size

    def read_blob(self, digest: str) -> bytes:
        """A blob's bytes, verified against its digest. Meant for small blobs (manifests)."""
        try:
            data = self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise LayoutError(f"blob {digest} is missing from OCI layout {self.root}") from None
        if compute_digest(data, digest.partition(":")[0]) != digest:
            raise LayoutError(f"blob {digest} in OCI layout {self.root} is corrupt")
        return data

    def read_manifest(self, descriptor: Descriptor) -> Manifest:
        return Manifest.parse(descriptor, self.read_blob(descriptor.digest))

    def walk(self, descriptor: Descriptor) -> Iterator[Manifest]:
        """Every manifest reachable from descriptor, each once, children before their index:
        the order in which a registry accepts them."""
        seen: set[str] = set()

        def visit(current: Descriptor) -> Iterator[Manifest]:
            if current.digest in seen:
                return
            seen.add(current.digest)
            manifest = self.read_manifest(current)
            if manifest.is_index:
                for child in manifest.children:
                    yield from visit(child)
            yield manifest

        return visit(descriptor)

    @staticmethod
    def blobs_for(manifest: Manifest) -> list[Descriptor]:
        """What a push of this manifest needs in the repository first: an image's layers then
        its config, or an index's child manifests."""
        if manifest.is_index:
            return manifest.children
        config = manifest.config
        return manifest.layers + ([config] if config is not None else [])

    # --- writing -----------------------------------------------------------------------------

    def write_blob(self, data: bytes, digest: str | None = None) -> str:
        """Store data as a blob (atomically) and return its digest; checks digest if given."""
        algorithm = digest.partition(":")[0] if digest else "sha256"
        actual = compute_digest(data, algorithm)
        if digest is not None and actual != digest:
            raise LayoutError(f"blob content has digest {actual}, expected {digest}")
        path = self.blob_path(actual)
        if not self.has_blob(actual, len(data)):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        return actual

    def set_ref(self, descriptor: Descriptor, ref: str | None) -> None:
        """Point ref at descriptor in index.json, replacing an entry with the same ref name and
        keeping every other entry. Without a ref, an unnamed entry is added unless an entry
        already points at that digest.

        The file is replaced atomically; concurrent writers are not serialized (neither are
        skopeo's or umoci's).
        """
        if ref is not None:
            check_ref_name(ref)
        self.manifests()  # validates every entry, so the raw entries below are objects
        index = self.read_index()
        entries: list[dict[str, Any]] = index.get("manifests", [])
        new_entry = descriptor.with_ref_name(ref).to_json()

        if ref is None and any(e.get("digest") == descriptor.digest for e in entries):
            return

        def same_slot(entry: dict[str, Any]) -> bool:
            return (entry.get("annotations") or {}).get(REF_NAME_ANNOTATION) == ref

        replaced = [i for i, entry in enumerate(entries) if same_slot(entry)]
        kept = [entry for i, entry in enumerate(entries) if i not in replaced]
        position = replaced[0] if replaced else len(kept)
        kept.insert(position, new_entry)
        index["manifests"] = kept
        self._write_json(INDEX_FILE, index)

    # --- helpers -----------------------------------------------------------------------------

    def _check_version(self) -> None:
        if not (self.root / LAYOUT_FILE).exists():
            raise LayoutError(f"{self.root} is not an OCI image layout (no {LAYOUT_FILE} file)")
        version = self._read_json(LAYOUT_FILE).get("imageLayoutVersion")
        if version != LAYOUT_VERSION:
            raise LayoutError(
                f"{self.root / LAYOUT_FILE}: unsupported imageLayoutVersion {version!r} "
                f"(berth reads {LAYOUT_VERSION})"
            )

    def _read_json(self, name: str) -> dict[str, Any]:
        path = self.root / name
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise LayoutError(f"{self.root} is not an OCI image layout (no {name})") from None
        except ValueError as exc:
            raise LayoutError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise LayoutError(f"{path} is not a JSON object")
        return data

    def _write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write(self.root / name, json.dumps(data, separators=(",", ":")).encode())

    def _refs_hint(self) -> str:
        refs = self.refs()
        return f"refs present: {', '.join(refs)}" if refs else "no entry has a ref name"
