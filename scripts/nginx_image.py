"""An nginx image made from Debian's `nginx` package, offline and byte for byte reproducible.

`make deps` downloads the `nginx` and `nginx-common` .deb files into .cache/debs (it never
installs them: that would start a host nginx on port 80). This builds an OCI image layout from
those files and the host's busybox-static, with no package mirror and no root:

- layer 1, a busybox base: /bin/busybox and its applet links (the `sh` that `berth exec` runs),
  /etc/passwd and /etc/group with `www-data` and `nobody`, /tmp, /run;
- layer 2, nginx: the packages' files as dpkg would unpack them (less the manuals), the shared
  libraries `ldd` names for /usr/sbin/nginx and the loader, a configuration for a container
  (master in the foreground under CMD `nginx -g 'daemon off;'`, logs to stdout and stderr,
  pid file in /run, temp files in the package's /var/lib/nginx, port 80) and an index.html.

Every tar entry is owned by root with a fixed mtime (the nginx package's own), entries are
sorted and gzip carries no timestamp: the same .deb files and host libraries give the same
digest every time.

    scripts/nginx_image.py DIR [--ref latest] [--debs .cache/debs]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from isal import igzip

try:
    from scripts.oci_images import (
        AUTHOR,
        BUSYBOX_BINARY,
        DEFAULT_PATH,
        MEDIA_LAYER_GZIP,
        _write_blob,
        write_image,
    )
except ImportError:  # run as scripts/nginx_image.py, or imported by scripts/demo.py
    from oci_images import (  # type: ignore[no-redef]
        AUTHOR,
        BUSYBOX_BINARY,
        DEFAULT_PATH,
        MEDIA_LAYER_GZIP,
        _write_blob,
        write_image,
    )

REPO_ROOT = Path(__file__).resolve().parent.parent
DEB_CACHE = REPO_ROOT / ".cache" / "debs"
PACKAGES = ("nginx", "nginx-common")
HTML_ROOT = "usr/share/nginx/html"

PASSWD = """root:x:0:0:root:/root:/bin/sh
www-data:x:33:33:www-data:/var/www:/usr/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
"""
GROUP = "root:x:0:\nwww-data:x:33:\nnogroup:x:65534:\n"

# No `daemon off;` here: the CMD passes it with -g, as Docker's nginx image does (nginx refuses
# a directive given twice).
NGINX_CONF = """# berth's nginx image (scripts/nginx_image.py): one container, logs to its output.
user www-data;
worker_processes 1;
pid /run/nginx.pid;
error_log stderr notice;

events {
    worker_connections 256;
}

http {
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log /dev/stdout;
    sendfile on;
    keepalive_timeout 65;

    server {
        listen 80 default_server;
        server_name _;
        root /usr/share/nginx/html;
        index index.html;
    }
}
"""

INDEX_HTML = """<!DOCTYPE html>
<html>
<head><title>Welcome to nginx on berth</title></head>
<body>
<h1>Welcome to nginx on berth!</h1>
<p>nginx {version}, from Debian's nginx package, in a berth container.</p>
</body>
</html>
"""


class ImageError(RuntimeError):
    """What the image cannot be built from, said so a person can fix it."""


@dataclass(frozen=True)
class NginxImage:
    """What make_nginx_image wrote."""

    digest: str  # the manifest's
    version: str  # the nginx package's Debian version


def find_debs(cache: Path = DEB_CACHE) -> dict[str, Path]:
    """The cached .deb of each package, by package name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        debs = sorted(cache.glob(f"{package}_*.deb"))
        if not debs:
            raise ImageError(f"no {package}_*.deb in {cache}: run `make deps` (make debs)")
        if len(debs) > 1:
            raise ImageError(f"{len(debs)} {package} .deb files in {cache}: keep one")
        found[package] = debs[0]
    return found


def _deb_version(deb: Path) -> str:
    done = subprocess.run(
        ["dpkg-deb", "--field", str(deb), "Version"], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def _deb_tar(deb: Path) -> tarfile.TarFile:
    """The package's data archive, as dpkg would unpack it."""
    done = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True)
    if done.returncode != 0:
        raise ImageError(f"dpkg-deb --fsys-tarfile {deb}: {done.stderr.decode().strip()}")
    return tarfile.open(fileobj=io.BytesIO(done.stdout), mode="r:")


class Layer:
    """The entries of one layer by path, written sorted with fixed owners and mtimes."""

    def __init__(self, mtime: int) -> None:
        self.mtime = mtime
        self.entries: dict[str, tuple[tarfile.TarInfo, bytes | None]] = {}

    def _add(self, info: tarfile.TarInfo, data: bytes | None = None) -> None:
        info.name = info.name.removeprefix("./").rstrip("/")
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = self.mtime
        parent = info.name.rpartition("/")[0]
        if parent and parent not in self.entries:
            self.directory(parent)
        self.entries[info.name] = (info, data)

    def directory(self, path: str, mode: int = 0o755) -> None:
        info = tarfile.TarInfo(path)
        info.type, info.mode = tarfile.DIRTYPE, mode
        self._add(info)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        info = tarfile.TarInfo(path)
        info.size, info.mode = len(data), mode
        self._add(info, data)

    def symlink(self, path: str, target: str) -> None:
        info = tarfile.TarInfo(path)
        info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
        self._add(info)

    def add_member(self, member: tarfile.TarInfo, data: bytes | None) -> None:
        self._add(member, data)

    def tar(self) -> bytes:
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in sorted(self.entries):
                info, data = self.entries[name]
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return out.getvalue()


def _busybox_layer(layer: Layer) -> None:
    if not BUSYBOX_BINARY.is_file():
        raise ImageError(f"{BUSYBOX_BINARY} is missing: apt-get install busybox-static")
    applets = subprocess.run(
        [str(BUSYBOX_BINARY), "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    for directory in ("bin", "etc", "root", "proc", "sys", "dev", "run"):
        layer.directory(directory, 0o700 if directory == "root" else 0o755)
    layer.directory("tmp", 0o1777)
    layer.file("bin/busybox", BUSYBOX_BINARY.read_bytes(), 0o755)
    for name in applets:
        if name != "busybox":
            layer.symlink(f"bin/{name}", "busybox")
    layer.file("etc/passwd", PASSWD.encode())
    layer.file("etc/group", GROUP.encode())


def _shared_libraries(binary: Path) -> list[Path]:
    """The libraries and loader `ldd` resolves for binary, by the paths it names."""
    done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ImageError(f"ldd {binary}: {(done.stderr or done.stdout).strip()}")
    paths = []
    for line in done.stdout.splitlines():
        if "not found" in line:
            raise ImageError(f"a library nginx needs is not on this host: {line.strip()}")
        match = re.search(r"(/\S+) \(0x", line)
        if match:
            paths.append(Path(match.group(1)))
    return paths


def _nginx_layer(layer: Layer, debs: dict[str, Path], version: str, work: Path) -> None:
    for deb in debs.values():
        with _deb_tar(deb) as tar:
            for member in tar.getmembers():
                name = member.name.removeprefix("./")
                if not name or name.startswith(("usr/share/man/", "usr/share/doc/")):
                    continue
                extracted = tar.extractfile(member) if member.isfile() else None
                layer.add_member(member, extracted.read() if extracted else None)
    # ldd runs the loader on the package's binary: extract it alone to a scratch file.
    nginx = work / "nginx"
    _, data = layer.entries["usr/sbin/nginx"]
    assert data is not None
    nginx.write_bytes(data)
    nginx.chmod(0o755)
    # The host's copies, under the names ldd gives (the files behind their symlinks).
    for library in _shared_libraries(nginx):
        layer.file(str(library).lstrip("/"), library.resolve().read_bytes(), 0o755)
    layer.file("etc/nginx/nginx.conf", NGINX_CONF.encode())
    layer.file(f"{HTML_ROOT}/index.html", INDEX_HTML.format(version=version).encode())


def _write_layer(blobs: Path, tar: bytes) -> tuple[dict, str]:
    """Gzip (no timestamp) and store one layer: its descriptor and its diff_id."""
    compressed = igzip.compress(tar, compresslevel=1, mtime=0)
    digest, size = _write_blob(blobs, compressed)
    descriptor = {"mediaType": MEDIA_LAYER_GZIP, "digest": digest, "size": size}
    return descriptor, "sha256:" + hashlib.sha256(tar).hexdigest()


def make_nginx_image(layout_dir: Path, ref: str = "latest", cache: Path = DEB_CACHE) -> NginxImage:
    """An OCI image layout at layout_dir, tagged `ref`: nginx from the cached .deb files."""
    debs = find_debs(cache)
    version = _deb_version(debs["nginx"])
    with _deb_tar(debs["nginx"]) as tar:
        mtime = max(member.mtime for member in tar.getmembers())
    created = datetime.fromtimestamp(mtime, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    layout_dir = Path(layout_dir)
    blobs = layout_dir / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    base, web = Layer(mtime), Layer(mtime)
    _busybox_layer(base)
    scratch = layout_dir / f".nginx-build-{ref}"
    scratch.mkdir(exist_ok=True)
    try:
        _nginx_layer(web, debs, version, scratch)
    finally:
        for path in scratch.iterdir():
            path.unlink()
        scratch.rmdir()
    written = [_write_layer(blobs, layer.tar()) for layer in (base, web)]
    layers, diff_ids = [d for d, _ in written], [i for _, i in written]
    cmd = ["nginx", "-g", "daemon off;"]
    config = {
        "created": created,
        "author": AUTHOR,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": [DEFAULT_PATH, f"NGINX_VERSION={version}"],
            "Cmd": cmd,
            "ExposedPorts": {"80/tcp": {}},
            # nginx's graceful stop, as Docker's nginx image.
            "StopSignal": "SIGQUIT",
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": f"nginx {version}",
                "org.opencontainers.image.description": "nginx from Debian's nginx package",
            },
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {
                "created": created,
                "author": AUTHOR,
                "created_by": "COPY /bin/busybox (busybox-static), its applet links, /etc/passwd",
            },
            {
                "created": created,
                "author": AUTHOR,
                "created_by": (
                    f"COPY {' '.join(d.name for d in debs.values())}, the libraries ldd names,"
                    " nginx.conf and index.html"
                ),
            },
            {
                "created": created,
                "author": AUTHOR,
                "created_by": f"CMD {json.dumps(cmd)} EXPOSE 80/tcp",
                "empty_layer": True,
            },
        ],
    }
    return NginxImage(write_image(layout_dir, ref, config, layers), version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="OCI layout directory (created if missing)")
    parser.add_argument("--ref", default="latest", help="tag inside the layout")
    parser.add_argument("--debs", type=Path, default=DEB_CACHE, help="where the .deb files are")
    args = parser.parse_args(argv)
    try:
        image = make_nginx_image(args.dir, args.ref, args.debs)
    except (ImageError, OSError, subprocess.CalledProcessError) as exc:
        print(f"nginx_image: {exc}", file=sys.stderr)
        return 1
    print(f"{args.dir}:{args.ref} {image.digest} (nginx {image.version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
