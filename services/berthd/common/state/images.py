"""Where an image came from: the image service's origin records and the builder's build records
(docs/etcd.md). Keys, relative to the store prefix:

    images/<manifest digest>    ImageOrigin: how an image came into the catalog (commit,
                                import, load, pull). Written by the image service only (and
                                deleted with the image's last copy).
    builds/<manifest digest>    BuildRecord: an image the builder built. Written by the
                                builder only.

The image service shows an image's origin from both (`origin_of`): its own record first, then
the builder's.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from berthd.common.state.family import Family, known_fields
from berthd.common.store import Store, encode

# ImageOrigin.origin of a built image (the image service's own origins are in image/model.py).
ORIGIN_BUILD = "build"


@dataclass(frozen=True)
class ImageOrigin:
    origin: str  # "commit" | "import" | "load" | "pull" | "build"
    origin_detail: str = ""  # what it came from: the pulled reference, the file name, ...
    repository: str = ""
    created_at: float = field(default_factory=time.time)

    def encode(self) -> bytes:
        return encode(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> ImageOrigin:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("an image origin is a JSON object")
        found = cls(**{"origin": "", **known_fields(cls, data)})
        return cls(
            str(found.origin or ""),
            str(found.origin_detail or ""),
            str(found.repository or ""),
            float(found.created_at or 0.0),
        )


@dataclass(frozen=True)
class BuildRecord:
    dockerfile: str = ""  # the Dockerfile's path in the build context
    created_at: float = field(default_factory=time.time)

    def encode(self) -> bytes:
        return encode(asdict(self))

    @classmethod
    def decode(cls, raw: bytes | str) -> BuildRecord:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a build record is a JSON object")
        found = cls(**known_fields(cls, data))
        return cls(str(found.dockerfile or ""), float(found.created_at or 0.0))

    def origin(self) -> ImageOrigin:
        return ImageOrigin(ORIGIN_BUILD, self.dockerfile, created_at=self.created_at)


IMAGES: Family[ImageOrigin] = Family(
    "image origin", "images/", lambda _digest, raw: ImageOrigin.decode(raw)
)
BUILDS: Family[BuildRecord] = Family(
    "build", "builds/", lambda _digest, raw: BuildRecord.decode(raw)
)


async def origin_of(store: Store, digest: str) -> ImageOrigin | None:
    """How the image with this manifest digest came to be: the image service's record, else
    the builder's; None when neither knows (pushed straight to the registry)."""
    found = await IMAGES.get(store, digest)
    if found is not None:
        return found
    built = await BUILDS.get(store, digest)
    return built.origin() if built is not None else None
