"""Containers' secrets on a node: one tmpfs per container, never the node's disk.

A container whose spec names secrets gets their values from the cluster (GetContainerSecrets,
over the node's mutual-TLS channel: the cluster gives them only to the node the container is
placed on). They are written into a tmpfs mounted for that container alone under the node's
secrets directory, which lives under /run (memory), outside the node's data directory, then
the tmpfs is remounted read-only and bind-mounted read-only at /run/secrets in the container
(berthd.node.spec). The values are never logged, nor written to a record, a status or a
bundle: config.json names only the tmpfs.

The tmpfs stays while the container exists (a restart reuses it) and is unmounted when the
container is removed, when its creation fails, and by the agent at start-up for any container
it no longer has (`sweep`). A tmpfs lost with a reboot is filled again before the next start.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import subprocess
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from berthd.common.containers import SecretReference
from berthd.common.errors import BerthError, FailedPrecondition
from berthd.common.rpc.secrets import SecretFile
from berthd.common.state.containers import SECRET_UNAVAILABLE
from berthd.node.idmap import IdMap

log = logging.getLogger("berthd.node.secrets")

# A container's secrets from the cluster, by container id.
Fetch = Callable[[str], Awaitable[list[SecretFile]]]

RUN_ROOT = Path("/run/berth")
PAGE = 4096
_ID = re.compile(r"[0-9a-f]{64}")


def run_dir(data_dir: Path) -> Path:
    """/run/berth/<hash of the data directory>: the agent's place under /run (memory), apart
    for every agent of a host (each has its own data directory)."""
    digest = hashlib.sha256(str(data_dir.absolute()).encode()).hexdigest()[:12]
    return RUN_ROOT / digest


def default_dir(data_dir: Path) -> Path:
    """/run/berth/<hash of the data directory>/secrets."""
    return run_dir(data_dir) / "secrets"


def unavailable(container: str, why: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"cannot get the secrets of container {container} from the cluster: {why}",
        reason=SECRET_UNAVAILABLE,
        metadata={"container_id": container},
    )


def _mount(*argv: str) -> None:
    result = subprocess.run(["mount", *argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise FailedPrecondition(f"cannot mount the secrets tmpfs: {result.stderr.strip()}")


def _unmount(path: Path) -> None:
    for argv in (["umount", str(path)], ["umount", "-l", str(path)]):
        if not path.is_mount():
            return
        subprocess.run(argv, capture_output=True, check=False)


class SecretMounts:
    """The secrets tmpfs of each container under `root`."""

    def __init__(self, root: Path, fetch: Fetch | None) -> None:
        self.root = root
        self.fetch = fetch

    def path(self, container_id: str) -> Path:
        if not _ID.fullmatch(container_id):
            raise ValueError(f"invalid container id {container_id!r}")
        return self.root / container_id

    def mounted(self, container_id: str) -> bool:
        return self.path(container_id).is_mount()

    async def ensure(
        self,
        container_id: str,
        name: str,
        references: Iterable[SecretReference],
        idmap: IdMap | None = None,
    ) -> Path | None:
        """The container's secrets tmpfs, mounted and filled (None when it has no secrets);
        FailedPrecondition with reason SECRET_UNAVAILABLE when the cluster does not give them.
        In a remapped container (`idmap`) the files' uid and gid are the container's, so the
        host ids are the range's."""
        wanted = list(references)
        if not wanted:
            return None
        path = self.path(container_id)
        if path.is_mount():
            return path
        if self.fetch is None:
            raise unavailable(name, "this node agent has no way to reach the cluster")
        try:
            files = await self.fetch(container_id)
        except BerthError as exc:
            raise unavailable(name, str(exc)) from None
        missing = {r.file_name for r in wanted} - {f.target for f in files}
        if missing:
            raise unavailable(name, f"the cluster sent no value for {', '.join(sorted(missing))}")
        await asyncio.to_thread(self._fill, path, files, idmap)
        log.info("secrets mounted", extra={"container": container_id, "count": len(files)})
        return path

    def _fill(self, path: Path, files: list[SecretFile], idmap: IdMap | None = None) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        size = sum(-(-len(f.data) // PAGE) * PAGE for f in files) + PAGE * (len(files) + 1)
        # Only the node's root may write it; no devices, set-uid or programs run from it.
        _mount(
            "-t", "tmpfs", "-o", f"nosuid,nodev,noexec,mode=0755,size={size}", "tmpfs", str(path)
        )
        try:
            for f in files:
                # The target is a plain file name (the model refuses '/'); O_EXCL|O_NOFOLLOW
                # even so: nothing in the tmpfs is followed or overwritten.
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(path / f.target, flags, 0o600)
                try:
                    view = memoryview(f.data)
                    while view:
                        view = view[os.write(fd, view) :]
                    if idmap is None:
                        os.fchown(fd, f.uid, f.gid)
                    else:
                        os.fchown(fd, idmap.to_host(f.uid), idmap.to_host(f.gid))
                    os.fchmod(fd, f.mode)
                finally:
                    os.close(fd)
            _mount("-o", "remount,ro,nosuid,nodev,noexec", str(path))
        except BaseException:
            self._release(path)
            raise

    def release(self, container_id: str) -> None:
        """Unmount and remove the container's tmpfs, if it has one."""
        self._release(self.path(container_id))

    def _release(self, path: Path) -> None:
        _unmount(path)
        if path.is_mount():
            log.error("cannot unmount the secrets tmpfs %s", path)
            return
        try:
            path.rmdir()  # the mount point, empty once unmounted
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the secrets mount point %s: %s", path, exc.strerror)

    def sweep(self, keep: Iterable[str]) -> None:
        """Release every tmpfs of a container not in `keep` (an agent that crashed between a
        removal and its unmount, or a record that did not load)."""
        kept = set(keep)
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if path.name not in kept and _ID.fullmatch(path.name):
                log.info("releasing stale secrets tmpfs", extra={"container": path.name})
                self._release(path)
