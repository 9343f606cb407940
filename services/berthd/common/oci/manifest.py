"""Parse and build OCI image manifests, indexes and image configs (Docker schema2 too).

Parsing is strict about the fields berth relies on and ignores unknown fields, as the
image-spec requires. Error messages use JSON paths (`layers[2].size`) so a user can find the
offending field in their document.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from berthd.common.errors import InvalidArgument, ResourceExhausted
from berthd.common.oci import mediatypes
from berthd.common.oci.digest import parse_digest, quoted

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_MAX_SIZE = 2**63 - 1  # sizes are int64 in Go implementations
_JSON_TYPES: dict[type, str] = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}
_SCHEMA1 = "Docker schema 1 manifests are not supported; convert with skopeo"


def _path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _field_error(obj: Mapping[str, Any], key: str, path: str, expected: str) -> InvalidArgument:
    """Error for `obj[key]` not being `expected`; `path` locates `obj` in the document."""
    where = _path(path, key)
    if key not in obj:
        return InvalidArgument(f"{where} is missing; expected {expected}")
    return InvalidArgument(f"{where} must be {expected}, got {quoted(obj[key])}")


def _check_digest(value: Any, where: str) -> str:
    try:
        return parse_digest(value)
    except InvalidArgument as e:
        raise InvalidArgument(f"{where}: {e}") from e


def _string_map(obj: Mapping[str, Any], key: str, path: str) -> dict[str, str]:
    """An optional string-to-string object such as `annotations`; absent or null is empty."""
    value = obj.get(key)
    if value is None:
        return {}
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return dict(value)
    raise _field_error(obj, key, path, "an object with string values")


def _optional_str(obj: Mapping[str, Any], key: str, path: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _field_error(obj, key, path, "a string")


def _load_object(content: bytes, what: str) -> dict[str, Any]:
    def reject_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        obj = json.loads(bytes(content).decode("utf-8"), parse_constant=reject_constant)
    except UnicodeDecodeError as e:
        raise InvalidArgument(f"{what} is not valid UTF-8: bad byte at offset {e.start}") from e
    except ValueError as e:
        raise InvalidArgument(f"{what} is not valid JSON: {e}") from e
    except RecursionError as e:
        raise InvalidArgument(f"{what} is not acceptable JSON: nested too deeply") from e
    if not isinstance(obj, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {_JSON_TYPES[type(obj)]}")
    return obj


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about a blob or a child manifest."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: dict[str, Any] | None = None
    urls: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform is not None:
            d["platform"] = self.platform
        if self.urls:
            d["urls"] = list(self.urls)
        return d

    @classmethod
    def from_dict(cls, d: object, where: str) -> Descriptor:
        """Validate a JSON descriptor; `where` (e.g. `layers[2]`) prefixes every message."""
        if not isinstance(d, dict):
            raise InvalidArgument(f"{where} must be a descriptor object, got {quoted(d)}")
        media_type = d.get("mediaType")
        if not isinstance(media_type, str) or not media_type:
            raise _field_error(d, "mediaType", where, "a non-empty string")
        digest = _check_digest(d.get("digest"), f"{where}.digest")
        size = d.get("size")
        # bool is an int in Python but not in JSON; reject `"size": true`.
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= _MAX_SIZE:
            raise _field_error(d, "size", where, "a non-negative integer")
        platform = d.get("platform")
        if platform is not None and not (
            isinstance(platform, dict)
            and isinstance(platform.get("architecture"), str)
            and isinstance(platform.get("os"), str)
        ):
            expected = 'an object with string "architecture" and "os"'
            raise _field_error(d, "platform", where, expected)
        urls = d.get("urls")
        urls = [] if urls is None else urls
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise _field_error(d, "urls", where, "an array of strings")
        annotations = _string_map(d, "annotations", where)
        return cls(media_type, digest, size, annotations, platform, tuple(urls))


def _descriptor_list(obj: Mapping[str, Any], key: str) -> tuple[Descriptor, ...]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise _field_error(obj, key, "", "an array of descriptors")
    return tuple(Descriptor.from_dict(d, f"{key}[{i}]") for i, d in enumerate(value))


@dataclass(frozen=True)
class ParsedManifest:
    """An image manifest (`kind="image"`) or an index / manifest list (`kind="index"`)."""

    media_type: str
    kind: Literal["image", "index"]
    config: Descriptor | None
    layers: tuple[Descriptor, ...]
    manifests: tuple[Descriptor, ...]
    subject: Descriptor | None
    annotations: dict[str, str]
    artifact_type: str | None

    @property
    def required_blobs(self) -> tuple[Descriptor, ...]:
        """Blobs a registry must hold before accepting this manifest (none for an index)."""
        return () if self.config is None else (self.config, *self.layers)

    @property
    def children(self) -> tuple[Descriptor, ...]:
        """Manifests an index points at (empty for an image manifest)."""
        return self.manifests


def _check_supported(media_type: str) -> None:
    if media_type in mediatypes.SCHEMA1_TYPES:
        raise InvalidArgument(f"media type {quoted(media_type)}: {_SCHEMA1}")
    if media_type not in mediatypes.MANIFEST_TYPES:
        expected = ", ".join(sorted(mediatypes.MANIFEST_TYPES))
        raise InvalidArgument(
            f"unsupported manifest media type {quoted(media_type)}: expected one of {expected}"
        )


def _infer_media_type(obj: Mapping[str, Any]) -> str:
    """OCI lets manifests omit `mediaType` (umoci does); the shape then tells the kind."""
    has_manifests, has_config = "manifests" in obj, "config" in obj
    if has_manifests != has_config:
        return mediatypes.OCI_IMAGE_INDEX if has_manifests else mediatypes.OCI_IMAGE_MANIFEST
    found = 'both "config" and' if has_manifests else 'neither "config" nor'
    raise InvalidArgument(
        f'cannot tell the manifest type: no media type declared, no "mediaType" field, '
        f'and {found} "manifests"; declare the media type'
    )


def parse_manifest(content: bytes, media_type: str | None = None) -> ParsedManifest:
    """Parse a manifest; `media_type` is what the client declared (Content-Type), if anything.

    An empty `media_type` counts as undeclared, since proto3 strings default to "".
    """
    if len(content) > MAX_MANIFEST_BYTES:
        raise ResourceExhausted(
            f"manifest is {len(content)} bytes, the limit is {MAX_MANIFEST_BYTES} (4 MiB)"
        )
    if media_type:
        _check_supported(media_type)
    obj = _load_object(content, "manifest")
    version = obj.get("schemaVersion")
    if type(version) is int and version == 1:
        raise InvalidArgument(f"manifest has schemaVersion 1: {_SCHEMA1}")
    if type(version) is not int or version != 2:
        raise _field_error(obj, "schemaVersion", "manifest", "2")
    body_type = _optional_str(obj, "mediaType", "manifest")
    if media_type and body_type is not None and body_type != media_type:
        raise InvalidArgument(
            f"manifest mediaType {quoted(body_type)} does not match "
            f"the declared media type {quoted(media_type)}"
        )
    resolved = media_type or body_type or _infer_media_type(obj)
    _check_supported(resolved)
    kind: Literal["image", "index"] = (
        "image" if resolved in mediatypes.IMAGE_MANIFEST_TYPES else "index"
    )
    try:
        return _build_manifest(obj, resolved, kind)
    except InvalidArgument as e:
        noun = "image manifest" if kind == "image" else "image index"
        raise InvalidArgument(f"invalid {noun}: {e}") from e


def _build_manifest(
    obj: Mapping[str, Any], media_type: str, kind: Literal["image", "index"]
) -> ParsedManifest:
    config, layers, manifests = None, (), ()
    if kind == "image":
        if "config" not in obj:
            raise _field_error(obj, "config", "", "a descriptor")
        config = Descriptor.from_dict(obj["config"], "config")
        layers = _descriptor_list(obj, "layers")
    else:
        manifests = _descriptor_list(obj, "manifests")
    subject = obj.get("subject")
    return ParsedManifest(
        media_type=media_type,
        kind=kind,
        config=config,
        layers=layers,
        manifests=manifests,
        subject=None if subject is None else Descriptor.from_dict(subject, "subject"),
        annotations=_string_map(obj, "annotations", ""),
        artifact_type=_optional_str(obj, "artifactType", ""),
    )


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config berth uses; `raw` keeps the whole document."""

    architecture: str
    os: str
    config: dict[str, Any]
    diff_ids: tuple[str, ...]
    history: tuple[dict[str, Any], ...]
    created: str | None
    raw: dict[str, Any]


def parse_image_config(content: bytes) -> ImageConfig:
    obj = _load_object(content, "image config")
    try:
        return _build_image_config(obj)
    except InvalidArgument as e:
        raise InvalidArgument(f"invalid image config: {e}") from e


def _build_image_config(obj: dict[str, Any]) -> ImageConfig:
    for key in ("architecture", "os"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise _field_error(obj, key, "", "a non-empty string")
    config = obj.get("config")
    if config is not None and not isinstance(config, dict):
        raise _field_error(obj, "config", "", "an object")
    rootfs = obj.get("rootfs")
    if not isinstance(rootfs, dict):
        raise _field_error(obj, "rootfs", "", 'an object with "type" and "diff_ids"')
    if rootfs.get("type") != "layers":
        raise _field_error(rootfs, "type", "rootfs", '"layers"')
    diff_ids = rootfs.get("diff_ids")
    if not isinstance(diff_ids, list):
        raise _field_error(rootfs, "diff_ids", "rootfs", "an array of digests")
    history = obj.get("history")
    history = [] if history is None else history
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise _field_error(obj, "history", "", "an array of objects")
    return ImageConfig(
        architecture=obj["architecture"],
        os=obj["os"],
        config=config or {},
        diff_ids=tuple(_check_digest(d, f"rootfs.diff_ids[{i}]") for i, d in enumerate(diff_ids)),
        history=tuple(history),
        created=_optional_str(obj, "created", ""),
        raw=obj,
    )


def check_config_matches(config: ImageConfig, manifest: ParsedManifest) -> None:
    """Each layer must have its diff_id (digest of the uncompressed tar), in the same order."""
    if manifest.kind != "image":
        raise InvalidArgument(
            f"manifest of type {quoted(manifest.media_type)} is an index and has no image config"
        )
    if len(config.diff_ids) != len(manifest.layers):
        raise InvalidArgument(
            f"image config has {len(config.diff_ids)} rootfs.diff_ids but the manifest has "
            f"{len(manifest.layers)} layers; they must correspond one to one"
        )


def encode_json(obj: Any) -> bytes:
    """The JSON berth writes: insertion order, compact, UTF-8. Digests are over these bytes,
    so the output must stay byte-stable for the same input."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def build_image_manifest(
    config: Descriptor, layers: list[Descriptor], annotations: dict[str, str] | None = None
) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mediatypes.OCI_IMAGE_MANIFEST,
        "config": config.to_dict(),
        "layers": [layer.to_dict() for layer in layers],
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    content = encode_json(doc)
    # Never write a manifest berth itself would refuse (bad digest, negative size, ...).
    parse_manifest(content, mediatypes.OCI_IMAGE_MANIFEST)
    return content


# Docker's layer types name the same bytes as OCI's: an image berth writes lists them as OCI's
# (as skopeo converts them), whatever its parent used.
_OCI_LAYER_TYPES = {
    mediatypes.DOCKER_LAYER_TAR_GZIP: mediatypes.OCI_LAYER_TAR_GZIP,
    mediatypes.DOCKER_FOREIGN_LAYER: mediatypes.OCI_LAYER_NONDISTRIBUTABLE_TAR_GZIP,
}


def as_oci_layer(layer: Descriptor) -> Descriptor:
    """`layer` as an OCI manifest lists it: only a Docker media type changes."""
    media_type = _OCI_LAYER_TYPES.get(layer.media_type)
    return layer if media_type is None else dataclasses.replace(layer, media_type=media_type)
