"""Tables for the image service's enums (berth.image.v1); its progress is
berth.enums.progress."""

from __future__ import annotations

from berth.enums import EnumTable
from berth.image.v1 import image_pb2 as pb

# skopeo's transport names; the zero value means docker-archive.
ARCHIVE_FORMATS = EnumTable(
    pb.ArchiveFormat,
    {pb.ARCHIVE_FORMAT_DOCKER: "docker-archive", pb.ARCHIVE_FORMAT_OCI: "oci-archive"},
    unspecified="docker-archive",
)
TABLES = (ARCHIVE_FORMATS,)
