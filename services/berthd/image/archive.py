"""Save images as a tar archive and load archives back: `docker save` and `docker load` for
the cluster's catalog.

Two formats, both read and written: a docker-archive (what `docker save`, `podman save` and
skopeo `docker-archive:` make) and an OCI image layout in a tar (skopeo `oci-archive:`,
podman `--format oci-archive`). What berth writes is an OCI layout either way; its
docker-archive adds Docker's manifest.json as Docker 25 does, so both keep manifest digests
through a save and load. archive_format holds the formats, archive_save and archive_load the
two directions.
"""

from __future__ import annotations

from berthd.image.archive_format import FORMATS, ArchiveFormat
from berthd.image.archive_load import DEFAULT_MAX_ARCHIVE_BYTES, load_images
from berthd.image.archive_save import SavePlan, plan_save, save_images

__all__ = [
    "DEFAULT_MAX_ARCHIVE_BYTES",
    "FORMATS",
    "ArchiveFormat",
    "SavePlan",
    "load_images",
    "plan_save",
    "save_images",
]
