"""Typed clients for berth's gRPC services."""

from berth.client.cluster import (
    ClusterClient,
    ClusterContainer,
    EndpointInfo,
    Event,
    NodeInfo,
    Placement,
    ServiceInfo,
)
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
    "ClusterClient",
    "ClusterContainer",
    "ContainerInfo",
    "DeletedManifest",
    "EndpointInfo",
    "Event",
    "GcReport",
    "ImageInfo",
    "ImageReference",
    "ManifestData",
    "NodeClient",
    "NodeInfo",
    "Placement",
    "PushResult",
    "RegistryClient",
    "RepositoryInfo",
    "RunOptions",
    "ServiceInfo",
    "TagInfo",
    "parse_image_reference",
]
