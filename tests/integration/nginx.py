"""The nginx image (scripts/nginx_image.py) as a fixture: built once per session from the .deb
files `make deps` downloaded, into an OCI layout a test pushes with `berth oci push`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from scripts.nginx_image import ImageError, make_nginx_image

# What the image's own index.html says (the test changes it and looks for the change).
WELCOME = "Welcome to nginx on berth!"


@dataclass(frozen=True)
class NginxLayout:
    path: Path
    ref: str
    digest: str
    version: str

    @property
    def source(self) -> str:
        """The layout as `berth oci push` names it: DIR:REF."""
        return f"{self.path}:{self.ref}"


@pytest.fixture(scope="session")
def nginx_layout(tmp_path_factory: pytest.TempPathFactory) -> NginxLayout:
    path = tmp_path_factory.mktemp("nginx") / "layout"
    try:
        image = make_nginx_image(path, "latest")
    except ImageError as exc:
        pytest.fail(str(exc))
    return NginxLayout(path, "latest", image.digest, image.version)
