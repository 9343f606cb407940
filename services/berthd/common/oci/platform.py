"""Which image of a multi-platform index fits this host, as OCI names platforms."""

from __future__ import annotations

import platform

from berthd.common.errors import NotFound
from berthd.common.oci.manifest import Descriptor, ParsedManifest

# platform.machine() names to OCI architecture names.
_OCI_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


def host_platform() -> tuple[str, str]:
    """(os, architecture) of this host as OCI names them."""
    machine = platform.machine()
    return "linux", _OCI_ARCH.get(machine, machine)


def pick_platform(index: ParsedManifest, what: str = "") -> Descriptor:
    """The index entry for this host's os/architecture; `what` (a reference) prefixes the
    error."""
    os_name, arch = host_platform()
    for entry in index.manifests:
        p = entry.platform or {}
        if p.get("os") == os_name and p.get("architecture") == arch:
            return entry
    offered = sorted(
        {f"{e.platform['os']}/{e.platform['architecture']}" for e in index.manifests if e.platform}
    )
    prefix = f"{what}: " if what else ""
    raise NotFound(
        f"{prefix}the image index has no {os_name}/{arch} image "
        f"(it has: {', '.join(offered) or 'none'})"
    )
