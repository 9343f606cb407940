"""Small images the integration tests build themselves and push through the registry client."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from pathlib import Path

from isal import igzip

from berth.client import RegistryClient

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def busybox_layer() -> bytes:
    """An uncompressed tar: /bin/busybox from busybox-static and a link for every applet."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for directory in ("bin", "etc", "tmp", "root"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for name in applets.stdout.split():
            if name != "busybox":
                link = tarfile.TarInfo(f"bin/{name}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
        for path, text in (
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"),
            ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ):
            data = text.encode()
            info = tarfile.TarInfo(path)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def tar_of(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar with these regular files (names as given, even hostile ones)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def push_image(
    client: RegistryClient,
    repository: str,
    tag: str,
    layer_tars: list[bytes],
    tmp: Path,
    cmd: list[str] | None = None,
    diff_ids: list[str] | None = None,
) -> str:
    """Gzip the layers, write an OCI config and manifest, push it all; returns the digest.
    The image's CMD is `cmd`, `sh` when None (`[]`: an image with no command)."""
    blobs = [igzip.compress(layer, compresslevel=1, mtime=0) for layer in layer_tars]
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["sh"] if cmd is None else cmd, "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids or [sha(t) for t in layer_tars]},
            "history": [{"created_by": "tests/integration/images.py"} for _ in layer_tars],
        }
    ).encode()
    for blob in [config, *blobs]:
        path = tmp / f"blob-{sha(blob)[7:19]}"
        path.write_bytes(blob)
        client.push_blob(repository, path, sha(blob), len(blob))
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER, "digest": sha(b), "size": len(b)} for b in blobs],
        }
    ).encode()
    return client.put_manifest(repository, tag, OCI_MANIFEST, manifest)
