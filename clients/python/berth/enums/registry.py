"""Tables for the registry's enums (berth.registry.v1)."""

from __future__ import annotations

from berth.enums import EnumTable
from berth.registry.v1 import registry_pb2 as pb

# Harbor's and Docker Hub's words; the zero value means "leave it" in an update, so it has no
# name.
VISIBILITIES = EnumTable(
    pb.Visibility, {pb.VISIBILITY_PRIVATE: "private", pb.VISIBILITY_PUBLIC: "public"}
)
TABLES = (VISIBILITIES,)
