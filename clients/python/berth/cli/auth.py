"""Credentials for external registries: what `berth login` stores and `pull`/`push` send, and
the cluster token `berth login --token` stores (read by berth.tls for every call).

Stored in Docker's config.json shape, `{"auths": {"HOST": {"auth": base64("user:pass")}}}`, in
$BERTH_AUTH_FILE, else $XDG_CONFIG_HOME/berth/auth.json, else ~/.config/berth/auth.json, mode
0600, written atomically. Lookups fall back to Docker's own config ($DOCKER_CONFIG/config.json,
else ~/.docker/config.json), which berth only reads; credential helpers (credsStore) are not run.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Any

from berth.client.image import Credentials
from berth.config import auth_file
from berth.errors import BerthClientError
from berth.files import atomic_write
from berth.reference import is_registry_host

# Docker Hub goes by several names; Docker's own config files use the index's.
_HUB = "index.docker.io"
_HUB_ALIASES = {"docker.io", "registry-1.docker.io", _HUB}


def docker_config_file() -> Path:
    if explicit := os.environ.get("DOCKER_CONFIG"):
        return Path(explicit).expanduser() / "config.json"
    return Path.home() / ".docker" / "config.json"


CLUSTER_KEY = "berth"


def save_cluster_token(token: str, principal: str) -> Path:
    """Store the token every berth call sends (`authorization: Bearer`)."""
    path = auth_file()
    data = _read(path)
    data[CLUSTER_KEY] = {"token": token, "principal": principal}
    _write(path, data)
    return path


def remove_cluster_token() -> str | None:
    """Forget the cluster token; the principal it stood for, or None when there was none."""
    path = auth_file()
    data = _read(path)
    entry = data.pop(CLUSTER_KEY, None)
    if entry is None:
        return None
    _write(path, data)
    return str(entry.get("principal", "")) if isinstance(entry, dict) else ""


def registry_host(server: str) -> str:
    """SERVER as `login` takes it and config files key it: HOST[:PORT], after dropping a scheme
    and a path as Docker accepts them (`https://index.docker.io/v1/`)."""
    text = server.strip()
    for scheme in ("https://", "http://"):
        text = text.removeprefix(scheme)
    host = text.split("/", 1)[0].lower()
    if not is_registry_host(host):
        raise BerthClientError(
            f'invalid registry "{server}": expected HOST[:PORT]', "INVALID_ARGUMENT"
        )
    return _HUB if host in _HUB_ALIASES else host


def save_credentials(server: str, username: str, password: str) -> str:
    """Store credentials for server in auth_file(); returns the host they are stored for."""
    host = registry_host(server)
    path = auth_file()
    data = _read(path)
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    data.setdefault("auths", {})[host] = {"auth": token}
    _write(path, data)
    return host


def remove_credentials(server: str) -> bool:
    """Forget server's credentials; False when berth had none stored for it."""
    host = registry_host(server)
    path = auth_file()
    data = _read(path)
    auths = data.get("auths", {})
    key = next((k for k in auths if _key_host(k) == host), None)
    if key is None:
        return False
    del auths[key]
    _write(path, data)
    return True


def lookup(host: str) -> Credentials | None:
    """The credentials for a registry host: berth's file first, then Docker's config."""
    wanted = registry_host(host)
    for path in (auth_file(), docker_config_file()):
        auths = _read(path).get("auths", {})
        for key, entry in auths.items():
            if _key_host(key) == wanted and isinstance(entry, dict):
                found = _credentials(entry, path, key)
                if found is not None:
                    return found
    return None


def _key_host(key: str) -> str:
    try:
        return registry_host(key)
    except BerthClientError:
        return ""  # a key this client cannot read names no host it will ever look up


def _credentials(entry: dict[str, Any], path: Path, key: str) -> Credentials | None:
    """One `auths` entry: `auth` (base64 user:pass), or username/password fields, and an
    optional identity token; None when it holds nothing usable (e.g. a helper's placeholder)."""
    username, password = entry.get("username", ""), entry.get("password", "")
    if auth := entry.get("auth"):
        try:
            username, sep, password = base64.b64decode(auth, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            sep = ""
        if not sep:
            raise BerthClientError(
                f'{path}: the "auth" of {key} is not base64 of USER:PASSWORD; '
                f"log in again with `berth login {key}`",
                "FAILED_PRECONDITION",
            )
    identity_token = entry.get("identitytoken", "")
    if not (username or password or identity_token):
        return None
    return Credentials(str(username), str(password), str(identity_token))


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise BerthClientError(f"cannot read {path}: {exc}", "FAILED_PRECONDITION") from exc
    if not isinstance(data, dict) or not isinstance(data.get("auths", {}), dict):
        raise BerthClientError(
            f'{path} is not a credentials file: expected {{"auths": {{...}}}}',
            "FAILED_PRECONDITION",
        )
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # atomic_write creates its file 0644 less the umask: a umask of 077 makes it 0600 from the
    # first byte, so the secret is never readable by others, not even for a moment.
    previous = os.umask(0o077)
    try:
        atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())
    finally:
        os.umask(previous)
