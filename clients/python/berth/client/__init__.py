"""Typed clients for berth's gRPC services.

Names are loaded on first use (PEP 562), so that a program using one client does not import
every service's generated stubs: the CLI starts faster that way.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it.
_EXPORTS = {
    "AccessClient": "berth.client.access",
    "Identity": "berth.client.access",
    "TokenInfo": "berth.client.access",
    "BlobInfo": "berth.client.registry",
    "BuildOptions": "berth.client.builder",
    "BuildResult": "berth.client.builder",
    "BuilderClient": "berth.client.builder",
    "ClusterClient": "berth.client.cluster",
    "ClusterContainer": "berth.client.cluster",
    "CommitProgress": "berth.client.image",
    "ContainerConfig": "berth.containers",
    "ContainerInfo": "berth.client.node",
    "Credentials": "berth.client.image",
    "DeletedManifest": "berth.client.registry",
    "EndpointInfo": "berth.client.cluster",
    "Event": "berth.client.cluster",
    "ExternalReference": "berth.client.image",
    "GcReport": "berth.client.registry",
    "HistoryStep": "berth.client.image",
    "ImageClient": "berth.client.image",
    "ImageDetails": "berth.client.image",
    "ImageInfo": "berth.client.node",
    "ImageReference": "berth.client.registry",
    "ImageSummary": "berth.client.image",
    "JoinClient": "berth.client.join",
    "JoinInfo": "berth.client.join",
    "JoinTokenInfo": "berth.client.join",
    "Layer": "berth.client.image",
    "LoadResult": "berth.client.image",
    "ManifestData": "berth.client.registry",
    "ManifestInfo": "berth.client.registry",
    "MountSpec": "berth.containers",
    "NodeClient": "berth.client.node",
    "NodeInfo": "berth.client.cluster",
    "Placement": "berth.client.cluster",
    "ProcessSession": "berth.client.sessions",
    "PruneResult": "berth.client.image",
    "PullResult": "berth.client.image",
    "PushResult": "berth.client.registry",
    "PushedImage": "berth.client.image",
    "RegistryClient": "berth.client.registry",
    "Removal": "berth.client.image",
    "RepositoryInfo": "berth.client.registry",
    "SecretClient": "berth.client.secrets",
    "SecretInfo": "berth.client.secrets",
    "SecretReference": "berth.containers",
    "ServiceInfo": "berth.client.cluster",
    "TagInfo": "berth.client.registry",
    "TransferProgress": "berth.client.image",
    "parse_external_reference": "berth.client.image",
    "parse_image_reference": "berth.client.registry",
}
__all__ = [
    "AccessClient",
    "BlobInfo",
    "BuildOptions",
    "BuildResult",
    "BuilderClient",
    "ClusterClient",
    "ClusterContainer",
    "CommitProgress",
    "ContainerConfig",
    "ContainerInfo",
    "Credentials",
    "DeletedManifest",
    "EndpointInfo",
    "Event",
    "ExternalReference",
    "GcReport",
    "HistoryStep",
    "Identity",
    "ImageClient",
    "ImageDetails",
    "ImageInfo",
    "ImageReference",
    "ImageSummary",
    "JoinClient",
    "JoinInfo",
    "JoinTokenInfo",
    "Layer",
    "LoadResult",
    "ManifestData",
    "ManifestInfo",
    "MountSpec",
    "NodeClient",
    "NodeInfo",
    "Placement",
    "ProcessSession",
    "PruneResult",
    "PullResult",
    "PushResult",
    "PushedImage",
    "RegistryClient",
    "Removal",
    "RepositoryInfo",
    "SecretClient",
    "SecretInfo",
    "SecretReference",
    "ServiceInfo",
    "TagInfo",
    "TokenInfo",
    "TransferProgress",
    "parse_external_reference",
    "parse_image_reference",
]

if TYPE_CHECKING:  # for type checkers and editors: the eager imports
    from berth.client.builder import BuilderClient, BuildOptions, BuildResult
    from berth.client.cluster import (
        ClusterClient,
        ClusterContainer,
        EndpointInfo,
        Event,
        NodeInfo,
        Placement,
        ServiceInfo,
    )
    from berth.client.image import (
        CommitProgress,
        Credentials,
        ExternalReference,
        HistoryStep,
        ImageClient,
        ImageDetails,
        ImageSummary,
        Layer,
        LoadResult,
        PruneResult,
        PullResult,
        PushedImage,
        Removal,
        TransferProgress,
        parse_external_reference,
    )
    from berth.client.join import JoinClient, JoinInfo, JoinTokenInfo
    from berth.client.node import ContainerInfo, ImageInfo, NodeClient
    from berth.client.registry import (
        BlobInfo,
        DeletedManifest,
        GcReport,
        ImageReference,
        ManifestData,
        ManifestInfo,
        PushResult,
        RegistryClient,
        RepositoryInfo,
        TagInfo,
        parse_image_reference,
    )
    from berth.client.secrets import SecretClient, SecretInfo
    from berth.client.sessions import ProcessSession
    from berth.containers import ContainerConfig, MountSpec, SecretReference


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
