"""A small HTTP client for the registry's OCI Distribution API (http.client: every request
exactly as written, no redirects or retries), tokens, and the registry fixture that serves it."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from berthd.common.security.tokens import TOKENS, new_token
from berthd.common.store import Store

from .conftest import ServiceProcess, Services

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)

    @property
    def codes(self) -> list[str]:
        return [e["code"] for e in self.json()["errors"]]


class Http:
    """Requests to one registry, with an optional Authorization header."""

    def __init__(
        self,
        base_url: str,
        authorization: str = "",
        ca: Path | None = None,
        cert: tuple[Path, Path] | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        self.base_url = base_url
        self.host = parts.netloc
        self.tls = parts.scheme == "https"
        self.authorization = authorization
        self.ca = ca
        self.cert = cert  # a client certificate and its key, over TLS

    def with_auth(self, authorization: str) -> Http:
        return Http(self.base_url, authorization, self.ca, self.cert)

    def bearer(self, token: str) -> Http:
        return self.with_auth(f"Bearer {token}")

    def basic(self, password: str, user: str = "anyone") -> Http:
        return self.with_auth("Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        if self.tls:
            context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
            if self.cert:
                context.load_cert_chain(*self.cert)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, timeout=60, context=context
            )
        else:
            conn = http.client.HTTPConnection(self.host, timeout=60)
        try:
            sent = dict(headers or {})
            if self.authorization:
                sent.setdefault("Authorization", self.authorization)
            conn.request(method, path, body=body, headers=sent)
            reply = conn.getresponse()
            return Reply(reply.status, reply.headers, reply.read())
        finally:
            conn.close()

    # The usual flows, each checking its own status.

    def upload(self, name: str, data: bytes) -> str:
        """A monolithic push: POST ?digest= with the whole blob."""
        digest = sha(data)
        reply = self.request("POST", f"/v2/{name}/blobs/uploads/?digest={digest}", data)
        assert reply.status == 201, reply.body
        assert reply.headers["Docker-Content-Digest"] == digest
        return digest

    def put_manifest(self, name: str, reference: str, manifest: bytes, media_type: str) -> str:
        reply = self.request(
            "PUT", f"/v2/{name}/manifests/{reference}", manifest, {"Content-Type": media_type}
        )
        assert reply.status == 201, reply.body
        return reply.headers["Docker-Content-Digest"]

    def push_image(self, name: str, tag: str, layers: list[bytes]) -> tuple[str, bytes]:
        """Config and layers, then the manifest under `tag`: (digest, manifest)."""
        manifest, blobs = image(layers)
        for blob in blobs:
            self.upload(name, blob)
        return self.put_manifest(name, tag, manifest, OCI_MANIFEST), manifest


def image(layers: list[bytes], media_type: str = OCI_MANIFEST) -> tuple[bytes, list[bytes]]:
    """An image manifest for these layer blobs: (manifest, [config, *layers])."""
    config = json.dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    ).encode()
    docker = media_type == DOCKER_MANIFEST
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json"
                if docker
                else OCI_CONFIG,
                "digest": sha(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip"
                    if docker
                    else OCI_LAYER,
                    "digest": sha(layer),
                    "size": len(layer),
                }
                for layer in layers
            ],
        }
    ).encode()
    return manifest, [config, *layers]


async def make_token(store: Store, name: str, role: str, *repositories: str) -> str:
    """A berth token, written to the test's etcd prefix as `berth token create` would."""
    record, token = new_token(name, role, list(repositories), 0, "user:admin")
    await TOKENS.put(store, record.id, record)
    return token


def start_http_registry(services: Services, tmp_path: Path, listen: str = "127.0.0.1:0"):
    return services.start(
        "registry", f"--data-dir={tmp_path / 'registry-data'}", f"--http-listen={listen}"
    )


@pytest.fixture
def oci_registry(services: Services, tmp_path: Path) -> ServiceProcess:
    """A registry serving gRPC and the OCI HTTP API (plain HTTP on loopback)."""
    registry = start_http_registry(services, tmp_path)
    assert registry.http_url.startswith("http://127.0.0.1:")
    return registry


@pytest.fixture
async def admin_token(store: Store) -> str:
    return await make_token(store, "admin", "admin")


@pytest.fixture
def http_anonymous(oci_registry: ServiceProcess) -> Iterator[Http]:
    yield Http(oci_registry.http_url)


@pytest.fixture
def http_admin(oci_registry: ServiceProcess, admin_token: str) -> Http:
    """Requests with an admin's berth token as the bearer (no token endpoint round trip)."""
    return Http(oci_registry.http_url).bearer(admin_token)
