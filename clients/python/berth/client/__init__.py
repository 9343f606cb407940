"""Typed clients for berth's gRPC services."""

from berth.client.registry import (
    BlobInfo,
    DeletedManifest,
    GcReport,
    ImageReference,
    ManifestData,
    PushResult,
    RegistryClient,
    RepositoryInfo,
    TagInfo,
    parse_image_reference,
)

__all__ = [
    "BlobInfo",
    "DeletedManifest",
    "GcReport",
    "ImageReference",
    "ManifestData",
    "PushResult",
    "RegistryClient",
    "RepositoryInfo",
    "TagInfo",
    "parse_image_reference",
]
