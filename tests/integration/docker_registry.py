"""Debian's `docker-registry` (CNCF Distribution 2.8) on loopback, for tests and benchmarks.

    with run_docker_registry(tmp_path, auth="token") as remote:
        remote.address       # "127.0.0.1:PORT", plain HTTP (loopback registries need no TLS)
        remote.credentials   # what berth should send (model.Credentials)

`auth` is "none", "basic" (an htpasswd file with one bcrypt user) or "token" (Docker's token
auth: the registry trusts a self-signed certificate, and a small token server in this process
issues RS256 JWTs signed with its key, made and signed with the `openssl` CLI). The token
server accepts the user's password, or an identity (refresh) token posted OAuth2-style, and
grants whatever scopes are asked; it refuses anonymous requests, so a missing credential shows
as a 401. It records every token request in `remote.token_server.requests`.

Fixtures `docker_registry`, `docker_registry_basic` and `docker_registry_token` are defined as
`*_fixture` functions (so a test's parameter does not shadow an import): import those into a
test module, or conftest.py, to use them. Everything is stopped by pid on exit.
"""

from __future__ import annotations

import base64
import ctypes
import json
import secrets
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import pytest

from berthd.image.model import Credentials

from .conftest import free_port, spawn, stop_process, wait_until

Auth = Literal["none", "basic", "token"]
SERVICE = "berth-test-registry"
ISSUER = "berth-test-token-issuer"
USERNAME = "berth"


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered (or refused)."""

    method: str  # "GET" (password) or "POST" (identity token)
    account: str
    scopes: tuple[str, ...]
    granted: bool


@dataclass
class DockerRegistry:
    address: str
    storage: Path
    log: Path
    auth: Auth
    process: subprocess.Popen
    username: str = ""
    password: str = ""
    identity_token: str = ""  # token auth only: a refresh token the token server accepts
    token_server: TokenServer | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.username, self.password)

    def stop(self) -> None:
        stop_process(self.process)
        if self.token_server is not None:
            self.token_server.stop()


@contextmanager
def run_docker_registry(tmp: Path, auth: Auth = "none") -> Iterator[DockerRegistry]:
    """Start a docker-registry with its storage under `tmp`; stop it on exit."""
    binary = shutil.which("docker-registry")
    if binary is None:
        pytest.fail("docker-registry is not installed: run `make deps`")
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {
            "filesystem": {"rootdirectory": str(tmp / "storage")},
            "delete": {"enabled": True},
        },
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
    }
    password = secrets.token_urlsafe(12) if auth != "none" else ""
    token_server = None
    if auth == "basic":
        htpasswd = tmp / "htpasswd"
        htpasswd.write_text(f"{USERNAME}:{bcrypt(password)}\n")
        config["auth"] = {"htpasswd": {"realm": SERVICE, "path": str(htpasswd)}}
    elif auth == "token":
        token_server = TokenServer(tmp / "token", USERNAME, password)
        config["auth"] = {
            "token": {
                "realm": token_server.realm,
                "service": SERVICE,
                "issuer": ISSUER,
                "rootcertbundle": str(token_server.certificate),
            }
        }
    # JSON is YAML, which is what the registry reads.
    (tmp / "config.yml").write_text(json.dumps(config, indent=2))
    log = tmp / "docker-registry.log"
    process = spawn([binary, "serve", str(tmp / "config.yml")], log)
    remote = DockerRegistry(
        address=f"127.0.0.1:{port}",
        storage=tmp / "storage",
        log=log,
        auth=auth,
        process=process,
        username=USERNAME if auth != "none" else "",
        password=password,
        identity_token=token_server.identity_token if token_server else "",
        token_server=token_server,
    )
    try:
        try:
            wait_until(lambda: _answers(remote.url), 20, "docker-registry", process)
        except (RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"{e}:\n{log.read_text()[-3000:]}") from None
        yield remote
    finally:
        remote.stop()


def _answers(url: str) -> bool:
    """The registry is up once /v2/ answers at all (401 counts: auth is on)."""
    try:
        with urllib.request.urlopen(f"{url}/v2/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def bcrypt(password: str) -> str:
    """A bcrypt hash, the only kind docker-registry's htpasswd accepts, from glibc's libcrypt
    (Python's `crypt` module is deprecated, and htpasswd is in apache2-utils)."""
    libcrypt = ctypes.CDLL("libcrypt.so.1")
    libcrypt.crypt_gensalt.restype = ctypes.c_char_p
    libcrypt.crypt.restype = ctypes.c_char_p
    salt = libcrypt.crypt_gensalt(b"$2b$", 5, None, 0)
    hashed = libcrypt.crypt(password.encode(), salt)
    if not hashed or not hashed.startswith(b"$2b$"):
        raise RuntimeError("libcrypt could not make a bcrypt hash")
    return hashed.decode()


# --- token auth -----------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """Docker's token server protocol on 127.0.0.1, issuing JWTs the registry trusts."""

    directory: Path
    username: str
    password: str
    identity_token: str = field(default_factory=lambda: secrets.token_urlsafe(16))
    requests: list[TokenRequest] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key = self.directory / "key.pem"
        self.certificate = self.directory / "cert.pem"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                "-subj", f"/CN={ISSUER}", "-keyout", str(self.key), "-out", str(self.certificate),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        pem = self.certificate.read_text().splitlines()
        # The x5c header carries the certificate (base64 DER, which is the PEM body).
        self._x5c = "".join(line for line in pem if not line.startswith("-----"))
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def issue(self, account: str, scopes: list[str]) -> str:
        """A JWT granting every action of every scope asked for."""
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": actions.split(",")})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": ISSUER,
            "sub": account,
            "aud": SERVICE,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(8),
            "access": access,
        }
        signing_input = ".".join(_b64url(json.dumps(part).encode()) for part in (header, claims))
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            check=True,
            capture_output=True,
        ).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def answer(self, method: str, account: str, scopes: list[str], granted: bool) -> str | None:
        with self._lock:
            self.requests.append(TokenRequest(method, account, tuple(scopes), granted))
        return self.issue(account, scopes) if granted else None


def _handler_for(server: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            query = parse_qs(urlsplit(self.path).query)
            scopes = [s for value in query.get("scope", []) for s in value.split()]
            expected = f"{server.username}:{server.password}".encode()
            granted = self.headers.get("Authorization", "") == (
                "Basic " + base64.b64encode(expected).decode()
            )
            self._reply(server.answer("GET", server.username if granted else "", scopes, granted))

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode())
            scopes = " ".join(form.get("scope", [])).split()
            granted = form.get("grant_type") == ["refresh_token"] and form.get("refresh_token") == [
                server.identity_token
            ]
            self._reply(server.answer("POST", server.username if granted else "", scopes, granted))

        def _reply(self, token: str | None) -> None:
            if token is None:
                body = b'{"details":"incorrect username or password"}'
                self.send_response(401)
            else:
                body = json.dumps(
                    {"token": token, "access_token": token, "expires_in": 300}
                ).encode()
                self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep the test output clean

    return Handler


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(name="docker_registry")
def docker_registry_fixture(tmp_path: Path) -> Iterator[DockerRegistry]:
    """A docker-registry without auth."""
    with run_docker_registry(tmp_path / "docker-registry") as remote:
        yield remote


@pytest.fixture(name="docker_registry_basic")
def docker_registry_basic_fixture(tmp_path: Path) -> Iterator[DockerRegistry]:
    """A docker-registry with htpasswd (basic) auth."""
    with run_docker_registry(tmp_path / "docker-registry-basic", auth="basic") as remote:
        yield remote


@pytest.fixture(name="docker_registry_token")
def docker_registry_token_fixture(tmp_path: Path) -> Iterator[DockerRegistry]:
    """A docker-registry with token auth and its token server."""
    with run_docker_registry(tmp_path / "docker-registry-token", auth="token") as remote:
        yield remote
