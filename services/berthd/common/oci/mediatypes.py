"""Media types of OCI image-spec and Docker schema2 content, and the sets berth accepts."""

from __future__ import annotations

OCI_IMAGE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_IMAGE_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDISTRIBUTABLE_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDISTRIBUTABLE_TAR_GZIP = f"{OCI_LAYER_NONDISTRIBUTABLE_TAR}+gzip"
OCI_LAYER_NONDISTRIBUTABLE_TAR_ZSTD = f"{OCI_LAYER_NONDISTRIBUTABLE_TAR}+zstd"
# The empty descriptor's content is `{}` (2 bytes): config of artifacts that have none.
OCI_EMPTY = "application/vnd.oci.empty.v1+json"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
# Schema 1 is only named so it can be refused with a useful message.
DOCKER_SCHEMA1_MANIFEST = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED_MANIFEST = "application/vnd.docker.distribution.manifest.v1+prettyjws"

IMAGE_MANIFEST_TYPES = frozenset({OCI_IMAGE_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_IMAGE_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = IMAGE_MANIFEST_TYPES | INDEX_TYPES
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1_MANIFEST, DOCKER_SCHEMA1_SIGNED_MANIFEST})
CONFIG_TYPES = frozenset({OCI_IMAGE_CONFIG, DOCKER_CONFIG})

_GZIP_LAYER_TYPES = frozenset(
    {
        OCI_LAYER_TAR_GZIP,
        OCI_LAYER_NONDISTRIBUTABLE_TAR_GZIP,
        DOCKER_LAYER_TAR_GZIP,
        DOCKER_FOREIGN_LAYER,
    }
)
_ZSTD_LAYER_TYPES = frozenset({OCI_LAYER_TAR_ZSTD, OCI_LAYER_NONDISTRIBUTABLE_TAR_ZSTD})
LAYER_TYPES = (
    frozenset({OCI_LAYER_TAR, OCI_LAYER_NONDISTRIBUTABLE_TAR})
    | _GZIP_LAYER_TYPES
    | _ZSTD_LAYER_TYPES
)


def is_gzip_layer(media_type: str) -> bool:
    return media_type in _GZIP_LAYER_TYPES


def is_zstd_layer(media_type: str) -> bool:
    return media_type in _ZSTD_LAYER_TYPES
