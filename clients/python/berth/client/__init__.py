"""Typed clients for berth's gRPC services."""

from berth.client.node import ContainerInfo, ImageInfo, NodeClient, RunOptions
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
    "ContainerInfo",
    "DeletedManifest",
    "GcReport",
    "ImageInfo",
    "ImageReference",
    "ManifestData",
    "NodeClient",
    "PushResult",
    "RegistryClient",
    "RepositoryInfo",
    "RunOptions",
    "TagInfo",
    "parse_image_reference",
]
