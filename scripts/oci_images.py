"""Build OCI image layouts for the demo, benchmarks and tests.

- `make_busybox_image`: a real, runnable image made with umoci from the host's busybox-static.
- `make_random_image`: N layers of incompressible bytes, written directly (no umoci), for
  measuring how fast bytes move through a registry.

Both produce OCI image layouts that `skopeo inspect oci:DIR:REF` and `umoci stat` read.

Run as a script:
    scripts/oci_images.py busybox DIR [--ref latest]
    scripts/oci_images.py random DIR --ref bench --layers 4 --layer-mb 64 [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from isal import igzip

BUSYBOX_BINARY = Path("/bin/busybox")
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
AUTHOR = "berth scripts/oci_images.py"

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"
CHUNK = 1 << 20


def _run(argv: list[str]) -> None:
    """Run a command; on failure raise with its output so the caller sees why."""
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        output = (done.stderr or done.stdout).strip()
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {output}")


# --- busybox, through umoci ----------------------------------------------------------------------


def _populate_rootfs(rootfs: Path) -> None:
    """busybox, its applet links and the few files a shell session expects."""
    if not BUSYBOX_BINARY.is_file():
        raise RuntimeError(f"{BUSYBOX_BINARY} is missing: apt-get install busybox-static")
    for name in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "proc", "sys", "dev"):
        (rootfs / name).mkdir(parents=True, exist_ok=True)
    tmp = rootfs / "tmp"
    tmp.mkdir(exist_ok=True)
    tmp.chmod(0o1777)
    shutil.copy2(BUSYBOX_BINARY, rootfs / "bin" / "busybox")
    (rootfs / "bin" / "busybox").chmod(0o755)
    # `--install -s` makes absolute links (/bin/busybox): run it inside the rootfs, where that
    # path is the copy we just made.
    _run(["chroot", str(rootfs), "/bin/busybox", "--install", "-s", "/bin"])
    (rootfs / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (rootfs / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (rootfs / "etc" / "hostname").write_text("busybox\n")


def make_busybox_image(layout_dir: Path, ref: str = "latest") -> None:
    """An OCI image layout at layout_dir, tagged `ref`, holding one layer with busybox-static.

    Needs root (umoci unpack without --rootless, chroot) and the umoci and busybox-static
    Debian packages. The image runs `sh` by default.
    """
    layout_dir = Path(layout_dir)
    image = f"{layout_dir}:{ref}"
    if not (layout_dir / "index.json").exists():
        layout_dir.parent.mkdir(parents=True, exist_ok=True)
        _run(["umoci", "init", "--layout", str(layout_dir)])
    _run(["umoci", "new", "--image", image])
    work = Path(tempfile.mkdtemp(prefix="berth-busybox-"))
    try:
        bundle = work / "bundle"
        _run(["umoci", "unpack", "--image", image, str(bundle)])
        _populate_rootfs(bundle / "rootfs")
        version = _busybox_version()
        _run(
            [
                "umoci",
                "repack",
                "--image",
                image,
                "--history.author",
                AUTHOR,
                "--history.created_by",
                f"COPY /bin/busybox (busybox-static {version}) && busybox --install -s /bin",
                str(bundle),
            ]
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # After repack: a config change made before it is silently lost (see HOST-NOTES).
    _run(
        [
            "umoci",
            "config",
            "--image",
            image,
            "--config.cmd=sh",
            f"--config.env={DEFAULT_PATH}",
            "--config.workingdir=/",
            "--os=linux",
            "--architecture=amd64",
            f"--author={AUTHOR}",
            f"--config.label=org.opencontainers.image.title=busybox {version}",
            "--history.author",
            AUTHOR,
            "--history.created_by",
            'CMD ["sh"]',
            "--history.comment",
            "default command and PATH",
        ]
    )
    # umoci keeps the manifests and configs that `config` replaced: drop them.
    _run(["umoci", "gc", "--layout", str(layout_dir)])


def _busybox_version() -> str:
    done = subprocess.run([str(BUSYBOX_BINARY)], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).splitlines()[:1]
    # "BusyBox v1.35.0 (Debian 1:1.35.0-4+b3) multi-call binary."
    words = first[0].split() if first else []
    return words[1].lstrip("v") if len(words) > 1 else "unknown"


# --- random layers, written directly ------------------------------------------------------------


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through it to `target`."""

    def __init__(self, target: Any) -> None:
        super().__init__()
        self.target = target
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        self.target.write(view)
        return view.nbytes


class _RandomReader(io.RawIOBase):
    """`size` bytes from a seeded PRNG, in chunks: incompressible and reproducible."""

    def __init__(self, rng: random.Random, size: int) -> None:
        super().__init__()
        self.rng = rng
        self.left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.left
        n = min(n, self.left, CHUNK)
        self.left -= n
        return self.rng.randbytes(n) if n else b""


def _write_blob(blobs: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blobs / digest.removeprefix("sha256:")
    if not path.exists():
        tmp = blobs / f".tmp-{os.getpid()}-{path.name}"
        tmp.write_bytes(data)
        tmp.replace(path)
    return digest, len(data)


def _write_random_layer(
    blobs: Path, rng: random.Random, index: int, layer_bytes: int
) -> tuple[str, int, str]:
    """One tar+gzip layer holding one file of random bytes: (digest, size, diff_id)."""
    tmp = blobs / f".tmp-{os.getpid()}-layer-{index}"
    with open(tmp, "wb") as raw:
        compressed = _HashingWriter(raw)
        # mtime=0: the same seed gives the same blob, byte for byte.
        with igzip.IGzipFile(fileobj=compressed, mode="wb", compresslevel=1, mtime=0) as gz:
            uncompressed = _HashingWriter(gz)
            with tarfile.open(fileobj=uncompressed, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                directory = tarfile.TarInfo("random")
                directory.type = tarfile.DIRTYPE
                directory.mode = 0o755
                tar.addfile(directory)
                member = tarfile.TarInfo(f"random/layer-{index:03d}.bin")
                member.size = layer_bytes
                member.mode = 0o644
                tar.addfile(member, _RandomReader(rng, layer_bytes))
    digest = "sha256:" + compressed.sha256.hexdigest()
    tmp.replace(blobs / digest.removeprefix("sha256:"))
    return digest, compressed.size, "sha256:" + uncompressed.sha256.hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def make_random_image(
    layout_dir: Path, ref: str, layers: int, layer_bytes: int, seed: int = 0
) -> None:
    """An OCI image layout at layout_dir, tagged `ref`, with `layers` random tar+gzip layers.

    Each layer is a tar holding one file of `layer_bytes` PRNG bytes (seeded: reproducible),
    so each compressed blob is about `layer_bytes` long. An existing layout keeps its other
    tags; a manifest already tagged `ref` is replaced.
    """
    if layers < 1 or layer_bytes < 0:
        raise ValueError("need layers >= 1 and layer_bytes >= 0")
    layout_dir = Path(layout_dir)
    blobs = layout_dir / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (layout_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))

    rng = random.Random(seed)
    created = datetime.fromtimestamp(0, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    layer_descriptors = []
    diff_ids = []
    history = []
    for index in range(layers):
        digest, size, diff_id = _write_random_layer(blobs, rng, index, layer_bytes)
        layer_descriptors.append({"mediaType": MEDIA_LAYER_GZIP, "digest": digest, "size": size})
        diff_ids.append(diff_id)
        history.append(
            {
                "created": created,
                "author": AUTHOR,
                "created_by": f"random layer {index} ({layer_bytes} bytes, seed {seed})",
            }
        )
    config = {
        "created": created,
        "author": AUTHOR,
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": [DEFAULT_PATH], "Cmd": ["sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    }
    write_image(layout_dir, ref, config, layer_descriptors)


def write_image(layout_dir: Path, ref: str, config: dict, layers: list[dict]) -> str:
    """Write the config and a manifest of `layers` (descriptors of blobs already in the layout)
    and tag it `ref` in index.json: an existing layout keeps its other tags, a manifest already
    tagged `ref` is replaced. Returns the manifest's digest."""
    blobs = layout_dir / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (layout_dir / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    config_digest, config_size = _write_blob(blobs, _canonical(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layers,
    }
    manifest_digest, manifest_size = _write_blob(blobs, _canonical(manifest))

    index_path = layout_dir / "index.json"
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": []}
    if index_path.exists():
        index = json.loads(index_path.read_text())
    kept = [
        entry
        for entry in index.get("manifests", [])
        if (entry.get("annotations") or {}).get(REF_NAME) != ref
    ]
    kept.append(
        {
            "mediaType": MEDIA_MANIFEST,
            "digest": manifest_digest,
            "size": manifest_size,
            "annotations": {REF_NAME: ref},
        }
    )
    index["manifests"] = kept
    tmp = layout_dir / f".index.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.replace(index_path)
    return manifest_digest


# --- CLI -----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    busybox = commands.add_parser("busybox", help="a runnable busybox image, built with umoci")
    busybox.add_argument("dir", type=Path, help="OCI layout directory (created if missing)")
    busybox.add_argument("--ref", default="latest", help="tag inside the layout")
    rand = commands.add_parser("random", help="an image of random, incompressible layers")
    rand.add_argument("dir", type=Path, help="OCI layout directory (created if missing)")
    rand.add_argument("--ref", default="latest", help="tag inside the layout")
    rand.add_argument("--layers", type=int, default=4)
    rand.add_argument("--layer-mb", type=float, default=64, help="MiB of data per layer")
    rand.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "busybox":
            make_busybox_image(args.dir, args.ref)
        else:
            layer_bytes = int(args.layer_mb * 1024 * 1024)
            make_random_image(args.dir, args.ref, args.layers, layer_bytes, args.seed)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"oci_images: {exc}", file=sys.stderr)
        return 1
    print(f"{args.dir}:{args.ref}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
