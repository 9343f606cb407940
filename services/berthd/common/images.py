"""Images in berth's registry, read and written the same way by every service that makes them.

The image service (commit, import, load, pull, tag) and the builder both turn a config and
layers into an image, and both read an image back by name: this is that shared logic, as
containerd's `core/images` is shared by its plugins. It talks to the registry only through its
gRPC API (berthd.common.rpc.registry), keeps no state but a cache, and writes no etcd record:
how an image came to be is recorded by the service that made it (berthd.common.state.images).

Manifests and configs are immutable, so they are cached in memory by manifest digest (at most
CACHE_BYTES of them, the least recently used dropped first), read straight into memory: the
manifest with GetManifest, the config with one ReadBlob of the size its descriptor gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import grpc

from berth.client.registry import ManifestData
from berthd.common.errors import BerthError, InvalidArgument, NotFound
from berthd.common.oci import mediatypes
from berthd.common.oci.digest import digest_bytes
from berthd.common.oci.manifest import (
    Descriptor,
    ImageConfig,
    ParsedManifest,
    build_image_manifest,
    encode_json,
    parse_image_config,
    parse_manifest,
)
from berthd.common.oci.reference import parse_reference
from berthd.common.rpc.registry import RegistryApi
from berthd.common.timestamps import parse_rfc3339

log = logging.getLogger("berthd.images")

# Bytes of manifests and configs kept in memory (a small image's are about 2 KiB).
CACHE_BYTES = 64 << 20
# Manifests read at once when they must be read one at a time.
FETCH_CONCURRENCY = 8


@dataclass(frozen=True)
class Content:
    """A manifest and, for an image, its config: immutable, so cached by manifest digest.
    What a listing shows of it (id, size, created, the set of its layers) is derived once and
    kept on the object: a listing of thousands of cached images recomputes none of it."""

    digest: str
    media_type: str
    manifest: bytes
    parsed: ParsedManifest
    config_bytes: bytes = b""
    config: ImageConfig | None = None

    @property
    def is_image(self) -> bool:
        return self.config is not None

    @property
    def layers(self) -> tuple[Descriptor, ...]:
        return self.parsed.layers

    @cached_property
    def id(self) -> str:
        return self.parsed.config.digest if self.parsed.config else ""

    @cached_property
    def size(self) -> int:
        """Compressed layers plus the config, as `docker images` counts."""
        config = self.parsed.config.size if self.parsed.config else 0
        return config + sum(layer.size for layer in self.layers)

    @cached_property
    def layer_sizes(self) -> dict[str, int]:
        """{layer digest: size}, each layer once (an image may list one twice)."""
        return {layer.digest: layer.size for layer in self.layers}

    @cached_property
    def created(self) -> float | None:
        """The config's `created` in seconds since the epoch; None when absent or unreadable
        (some tools write odd values; a listing must not fail over them)."""
        return created_seconds(self.config.created if self.config else None)

    @property
    def blobs(self) -> tuple[Descriptor, ...]:
        """Layers, then the config: what an image owns besides its manifest."""
        config = (self.parsed.config,) if self.parsed.config else ()
        return (*self.layers, *config)


@dataclass(frozen=True)
class ResolvedImage:
    """An image found in the registry: where, its manifest and its config, parsed."""

    repository: str
    tag: str | None
    digest: str
    media_type: str
    manifest: bytes
    parsed: ParsedManifest
    config_bytes: bytes
    config: ImageConfig

    @classmethod
    def of(cls, repository: str, tag: str | None, content: Content) -> ResolvedImage:
        if content.config is None:
            raise InvalidArgument(
                f"{repository}@{content.digest} is a {content.media_type}, not an image",
                metadata={"digest": content.digest, "media_type": content.media_type},
            )
        return cls(
            repository=repository,
            tag=tag,
            digest=content.digest,
            media_type=content.media_type,
            manifest=content.manifest,
            parsed=content.parsed,
            config_bytes=content.config_bytes,
            config=content.config,
        )


def created_seconds(text: str | None) -> float | None:
    """An RFC 3339 time as seconds since the epoch; None if absent or unreadable."""
    if not text:
        return None
    try:
        return parse_rfc3339(text).timestamp()
    except ValueError:
        return None


def _weight(content: Content) -> int:
    return len(content.manifest) + len(content.config_bytes)


@dataclass(frozen=True)
class WrittenImage:
    digest: str  # of the manifest
    id: str  # the config's digest, as Docker names images


class ImageStore:
    """Reads and writes images through the registry's API, with a cache of their content."""

    def __init__(self, registry: RegistryApi, cache_bytes: int = CACHE_BYTES) -> None:
        self.registry = registry
        self._contents: OrderedDict[str, Content] = OrderedDict()
        self._cached_bytes = 0
        self._cache_limit = cache_bytes

    # --- reading ---------------------------------------------------------------------------

    def cached(self, digest: str) -> Content | None:
        content = self._contents.get(digest)
        if content is not None:
            self._contents.move_to_end(digest)
        return content

    async def content(self, digest: str, repository: str) -> Content:
        """A manifest (and its config, for an image) by digest, from the cache or the registry."""
        cached = self.cached(digest)
        if cached is not None:
            return cached
        return await self._keep(await self.registry.get_manifest(repository, digest), repository)

    async def contents(self, names: Sequence[tuple[str, str]]) -> dict[str, Content]:
        """Content of many manifests by (manifest digest, a repository holding it), from the
        cache, the rest read in batches (BatchGetManifests: manifests and configs together,
        a call per thousand instead of two per image). Manifests gone from their repository
        are left out. What a batch did not bring right (a config not sent, a digest that does
        not match) is read alone, as `content` does, and fails as it would."""
        found: dict[str, Content] = {}
        wanted = []
        for digest, repository in names:
            cached = self.cached(digest)
            if cached is not None:
                found[digest] = cached
            else:
                wanted.append((repository, digest))
        if not wanted:
            return found
        alone: list[tuple[str, str]] = []
        try:
            batch = await self.registry.get_manifests(wanted, include_configs=True)
        except BerthError as exc:
            if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                raise
            # A registry older than BatchGetManifests (during an upgrade): one at a time.
            batch, alone = [], [(digest, repository) for repository, digest in wanted]
        for batched in batch:
            stored = batched.manifest
            if stored is None:
                continue  # deleted since it was named
            content = self._batched(stored, batched.config, batched.repository)
            if content is None:
                alone.append((stored.digest, batched.repository))
            else:
                self._remember(content)
                found[stored.digest] = content
        limit = asyncio.Semaphore(FETCH_CONCURRENCY)

        async def fetch(digest: str, repository: str) -> None:
            async with limit:
                with contextlib.suppress(NotFound):  # deleted since it was named
                    found[digest] = await self.content(digest, repository)

        await asyncio.gather(*(fetch(digest, repository) for digest, repository in alone))
        return found

    def _batched(
        self, stored: ManifestData, config_bytes: bytes, repository: str
    ) -> Content | None:
        """Content from a batch's manifest and config, verified; None when it must be read
        alone (a digest that does not match, an image config not sent)."""
        if digest_bytes(stored.content) != stored.digest:
            return None
        try:
            parsed = parse_manifest(stored.content, stored.media_type)
        except InvalidArgument:
            return None  # read alone, it fails as it always did
        descriptor = parsed.config
        if descriptor is None or descriptor.media_type not in mediatypes.CONFIG_TYPES:
            return self._content(stored, parsed, repository, b"")
        if len(config_bytes) != descriptor.size or digest_bytes(config_bytes) != descriptor.digest:
            return None
        return self._content(stored, parsed, repository, config_bytes)

    async def _keep(self, stored: ManifestData, repository: str) -> Content:
        """Content of a manifest just fetched (its config fetched too, for an image), cached."""
        parsed = parse_manifest(stored.content, stored.media_type)
        config_bytes = b""
        if parsed.config is not None and parsed.config.media_type in mediatypes.CONFIG_TYPES:
            config = parsed.config
            config_bytes = await self.registry.read_blob(repository, config.digest, config.size)
        content = self._content(stored, parsed, repository, config_bytes)
        self._remember(content)
        return content

    def _content(
        self, stored: ManifestData, parsed: ParsedManifest, repository: str, config_bytes: bytes
    ) -> Content:
        """A manifest's Content, with its config when `config_bytes` holds a readable one."""
        digest = stored.digest
        content = Content(digest, parsed.media_type, stored.content, parsed)
        if config_bytes:
            try:
                config = parse_image_config(config_bytes)
            except InvalidArgument as e:  # listed as a non-image, never fails a whole listing
                log.warning("manifest %s in %s has a bad config: %s", digest, repository, e)
            else:
                content = Content(
                    digest, parsed.media_type, stored.content, parsed, config_bytes, config
                )
        return content

    def _remember(self, content: Content) -> None:
        self.forget(content.digest)
        self._contents[content.digest] = content
        self._cached_bytes += _weight(content)
        while self._cached_bytes > self._cache_limit and len(self._contents) > 1:
            _, dropped = self._contents.popitem(last=False)
            self._cached_bytes -= _weight(dropped)

    def forget(self, digest: str) -> None:
        """Drop a manifest's content (it left the registry)."""
        dropped = self._contents.pop(digest, None)
        if dropped is not None:
            self._cached_bytes -= _weight(dropped)

    def keep_only(self, digests: set[str]) -> None:
        """Drop cached content of manifests no longer in the registry, so the cache stays the
        registry's size."""
        for digest in [d for d in self._contents if d not in digests]:
            self.forget(digest)

    async def resolve(self, ref: str) -> ResolvedImage:
        """The image `name[:tag]` (tag `latest`) or `name@digest` names in berth's registry."""
        reference = parse_reference(ref)
        if reference.registry is not None:
            raise InvalidArgument(
                f"{ref} names an external registry; berth's images have no host "
                "(pull it first with `berth pull`)",
                reason="INVALID_REFERENCE",
                metadata={"image": ref},
            )
        repository = reference.repository
        try:
            if reference.digest:
                content = await self.content(reference.digest, repository)
            else:  # the tag's manifest, fetched once: cached content is used when it is known
                stored = await self.registry.get_manifest(repository, reference.tag or "latest")
                content = self.cached(stored.digest) or await self._keep(stored, repository)
        except NotFound:
            raise NotFound(
                f"No such image: {ref}",
                reason="IMAGE_NOT_FOUND",
                metadata={"image": ref},
                resource=("image", ref),
            ) from None
        return ResolvedImage.of(repository, None if reference.digest else reference.tag, content)

    # --- writing ---------------------------------------------------------------------------

    async def write_image(
        self, repository: str, tag: str | None, config: dict[str, Any], layers: list[Descriptor]
    ) -> WrittenImage:
        """Store a new image whose layers are already in `repository`: push its config, then
        put the manifest under `tag` (None: untagged, by digest)."""
        config_bytes = encode_json(config)
        parse_image_config(config_bytes)  # never write a config berth itself would refuse
        descriptor = await self.registry.push_bytes(
            repository, config_bytes, mediatypes.OCI_IMAGE_CONFIG
        )
        digest = await self.write_manifest(repository, tag, descriptor, layers)
        return WrittenImage(digest, descriptor.digest)

    async def write_manifest(
        self, repository: str, tag: str | None, config: Descriptor, layers: list[Descriptor]
    ) -> str:
        """Put an OCI manifest over a config and layers already in `repository` (under `tag`,
        or untagged by digest); returns its digest. Used as is where the config's bytes must
        stay as they came (a loaded image keeps its id)."""
        manifest = build_image_manifest(config, layers)
        return await self.registry.put_manifest(
            repository, tag or digest_bytes(manifest), mediatypes.OCI_IMAGE_MANIFEST, manifest
        )
