"""Secrets: stored encrypted in etcd, delivered only to the node that runs a container. No gRPC.

A secret's value is sealed with AES-256-GCM (`cryptography`) under a 32-byte key that only the
cluster holds, in the file its `--secrets-key` flag names: etcd, its backups and whoever reads
them see ciphertext only. Each secret has its own random 96-bit nonce, and its name is the
associated data, so a ciphertext moved to another secret's record does not open. Keys,
relative to the store prefix (read and written by the cluster only, docs/etcd.md):

    secrets/<name>      SecretRecord (JSON): id, name, labels, who made it and when, the
                        fingerprint of the key that sealed it, the nonce and the ciphertext

A container or service names its secrets in its spec (ContainerConfig.secrets). The spec is
accepted only if they exist, and the acceptance transaction compares their records, so a
secret removed meanwhile fails the acceptance; RemoveSecret refuses a secret that a desired
container or a service names, and its delete compares that neither family changed since it
looked, so a spec accepted meanwhile fails the delete. Nodes get the values through
GetContainerSecrets, for containers placed on themselves only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import secrets
import stat
import string
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from berth.error_details import Violation
from berth.errors import InvalidArgumentError
from berthd.cluster.refs import existence_guards, resolve_ref
from berthd.common.containers import ContainerConfig, SecretReference, check_secret_name
from berthd.common.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from berthd.common.state.containers import CONTAINERS
from berthd.common.state.family import Family, known_fields
from berthd.common.store import Compare, Store

log = logging.getLogger("berthd.cluster.secrets")

KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # GCM's 96-bit nonce
CIPHER = "AES-256-GCM"
# Swarm's limit on a secret's value.
MAX_SECRET_BYTES = 500 * 1024
ATTEMPTS = 12
_ID_ALPHABET = string.ascii_lowercase + string.digits
ID_LENGTH = 25  # as Docker's secret ids


# The key and the cipher -----------------------------------------------------------------------


class SecretsKeyError(Exception):
    """The key file cannot be used (missing, wrong size, readable by others)."""


@dataclass(frozen=True)
class Sealed:
    """A value as stored: which key sealed it, the nonce, and the ciphertext with its tag."""

    key_id: str
    nonce: bytes
    ciphertext: bytes


class SecretBox:
    """AES-256-GCM under the cluster's secrets key; the secret's name is the associated data."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise SecretsKeyError(f"a secrets key is {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        # Names the key in every record it seals, so a record sealed under another key is
        # reported as such rather than as damaged. One-way: it reveals nothing of the key.
        self.key_id = hashlib.sha256(b"berth secrets key id\0" + key).hexdigest()[:16]

    @classmethod
    def from_file(cls, path: str | Path) -> SecretBox:
        """The key in `path`: exactly 32 bytes, in a file no group or other user may read."""
        path = Path(path)
        try:
            info = path.stat()
            key = path.read_bytes()
        except OSError as exc:
            raise SecretsKeyError(f"cannot read the secrets key {path}: {exc.strerror}") from None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise SecretsKeyError(
                f"the secrets key {path} is open to other users (mode "
                f"{stat.S_IMODE(info.st_mode):04o}): make it 0600 (chmod 600 {path})"
            )
        if len(key) != KEY_BYTES:
            raise SecretsKeyError(
                f"the secrets key {path} holds {len(key)} bytes, not {KEY_BYTES}: make one with "
                f"`head -c {KEY_BYTES} /dev/urandom > {path}`"
            )
        return cls(key)

    def seal(self, name: str, data: bytes) -> Sealed:
        nonce = os.urandom(NONCE_BYTES)  # random per secret: never reused under one key
        return Sealed(self.key_id, nonce, self._aead.encrypt(nonce, data, name.encode()))

    def open(self, name: str, sealed: Sealed) -> bytes:
        """The value; FailedPrecondition (SECRETS_KEY_MISMATCH) when another key sealed it,
        DataLoss (SECRET_CORRUPT) when the record was altered or belongs to another name."""
        if sealed.key_id != self.key_id:
            raise FailedPrecondition(
                f"secret {name} was sealed with another secrets key (key id {sealed.key_id}; "
                f"this cluster holds {self.key_id}): start the cluster with the key it was "
                "made with, or remove the secret and create it again",
                reason="SECRETS_KEY_MISMATCH",
                metadata={"secret": name, "key_id": sealed.key_id, "cluster_key_id": self.key_id},
                resource=("secret", name),
            )
        try:
            return self._aead.decrypt(sealed.nonce, sealed.ciphertext, name.encode())
        except InvalidTag:
            raise DataLoss(
                f"secret {name} does not decrypt: its record in etcd was altered or copied "
                "from another secret; remove it and create it again",
                reason="SECRET_CORRUPT",
                metadata={"secret": name},
                resource=("secret", name),
            ) from None


# Records --------------------------------------------------------------------------------------


@dataclass
class SecretRecord:
    """secrets/<name>: the metadata in clear, the value sealed."""

    id: str
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    created_by: str = ""
    cipher: str = CIPHER
    key_id: str = ""
    nonce: str = ""  # base64
    ciphertext: str = ""  # base64, GCM tag included

    @property
    def sealed(self) -> Sealed:
        return Sealed(self.key_id, base64.b64decode(self.nonce), base64.b64decode(self.ciphertext))

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, name: str, raw: bytes | str) -> SecretRecord:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a secret record is a JSON object")
        return cls(**{**known_fields(cls, data), "name": name})


SECRETS: Family[SecretRecord] = Family("secret", "secrets/", SecretRecord.decode)


@dataclass(frozen=True)
class Delivered:
    """One secret as a container receives it: the reference with its defaults filled in."""

    reference: SecretReference
    secret_id: str
    data: bytes


@dataclass(frozen=True)
class SecretUser:
    kind: str  # container, service
    id: str
    name: str


# Errors ---------------------------------------------------------------------------------------


def secret_not_found(ref: str, field: str = "") -> NotFound:
    return NotFound(
        f"no such secret: {ref}",
        reason="SECRET_NOT_FOUND",
        metadata={"secret": ref},
        resource=("secret", ref),
        field=field,
    )


def key_missing() -> FailedPrecondition:
    return FailedPrecondition(
        "this cluster has no secrets key: start the cluster service with --secrets-key FILE "
        "(`berthd up` makes one)",
        reason="SECRETS_KEY_MISSING",
    )


def invalid(message: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, reason="INVALID_SECRET_SPEC", field=field)


def check_name(name: str, field: str = "name") -> None:
    try:
        check_secret_name(name)
    except InvalidArgumentError as exc:
        raise invalid(exc.message, field) from None


def check_labels(labels: dict[str, str], field: str = "labels") -> None:
    for key in labels:
        if not key or "\0" in key:
            raise invalid(f"invalid label key {key!r}: it must be non-empty text", field)


def new_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LENGTH))


# Guards for the specs that name secrets -------------------------------------------------------


async def secret_guards(
    store: Store, configs: Iterable[ContainerConfig], field: str = "spec.secrets"
) -> list[Compare]:
    """For specs being accepted (RunContainer, CreateService, UpdateService): NotFound with
    SECRET_NOT_FOUND for a secret that does not exist, else the compares that fail the
    acceptance's transaction if one of them is removed before it commits."""
    names = (ref.name for config in configs for ref in config.secrets)
    return await existence_guards(store, SECRETS, names, secret_not_found, field)


def resolve(ref: str, records: Iterable[SecretRecord]) -> SecretRecord:
    """A secret by name, full id or unique id prefix (as Docker resolves them)."""
    return resolve_ref(ref, records, "secret", secret_not_found, invalid)


# The core -------------------------------------------------------------------------------------


class SecretCore:
    """Create, list and remove secrets, and deliver them to nodes. `box` is None when the
    cluster has no key: then nothing can be sealed or opened, but listing and removing work."""

    def __init__(self, store: Store, box: SecretBox | None) -> None:
        self.store = store
        self.box = box

    async def create(
        self, name: str, data: bytes, labels: dict[str, str], created_by: str
    ) -> SecretRecord:
        check_name(name)
        if not data:
            raise invalid("a secret's data must not be empty", "data")
        if len(data) > MAX_SECRET_BYTES:
            raise invalid(
                f"a secret's data is at most {MAX_SECRET_BYTES // 1024} KiB, got {len(data)} bytes",
                "data",
            )
        check_labels(labels)
        if self.box is None:
            raise key_missing()
        sealed = self.box.seal(name, data)
        record = SecretRecord(
            id=new_id(),
            name=name,
            labels=dict(labels),
            created_by=created_by,
            key_id=sealed.key_id,
            nonce=base64.b64encode(sealed.nonce).decode(),
            ciphertext=base64.b64encode(sealed.ciphertext).decode(),
        )
        ok, _ = await self.store.txn(
            [SECRETS.absent(self.store, name)], [SECRETS.op_put(self.store, name, record)]
        )
        if not ok:
            raise AlreadyExists(
                f'the secret name "{name}" is already in use',
                reason="SECRET_NAME_IN_USE",
                metadata={"name": name},
                resource=("secret", name),
            )
        log.info("secret created", extra={"secret": name, "principal": created_by})
        return record

    async def list(self, labels: dict[str, str] | None = None) -> list[SecretRecord]:
        """Every secret (with all of `labels`), by name."""
        wanted = (labels or {}).items()
        records = [v.record for v in await SECRETS.list(self.store)]
        return sorted((r for r in records if wanted <= r.labels.items()), key=lambda r: r.name)

    async def users(self, name: str) -> tuple[list[SecretUser], list[Compare]]:
        """The containers and services whose specs name secret `name`, and compares that
        hold while nobody adds one (read at one revision per family)."""
        # services.py imports this module (for secret_guards): import it where it is needed.
        from berthd.cluster.services import SERVICES, ServiceRecord

        containers, container_revision = await CONTAINERS.snapshot(self.store)
        services, service_revision = await self.store.snapshot(SERVICES)
        found = [
            SecretUser("container", v.id, v.record.name)
            for v in containers
            if any(ref.name == name for ref in v.record.config.secrets)
        ]
        for entry in services:
            try:
                service = ServiceRecord.from_json(entry.value)
            except (ValueError, TypeError, KeyError, InvalidArgument) as exc:
                log.warning("ignoring unreadable service record %s: %s", entry.key, exc)
                continue
            if any(ref.name == name for ref in service.template.secrets):
                found.append(SecretUser("service", service.id, service.name))
        compares = [
            self.store.unchanged_since(CONTAINERS.prefix, container_revision),
            self.store.unchanged_since(SERVICES, service_revision),
        ]
        return found, compares

    async def remove(self, ref: str) -> SecretRecord:
        """Delete a secret that no container or service names (Docker's rule)."""
        for _ in range(ATTEMPTS):
            found = resolve(ref, await self.list())
            versioned = await SECRETS.read(self.store, found.name)
            if versioned is None:
                raise secret_not_found(ref, "secret")
            users, unchanged = await self.users(found.name)
            if users:
                raise in_use(found.name, users)
            ok, _ = await self.store.txn(
                [SECRETS.unchanged(self.store, found.name, versioned.mod_revision), *unchanged],
                [SECRETS.op_delete(self.store, found.name)],
            )
            if ok:
                log.info("secret removed", extra={"secret": found.name})
                return versioned.record
        raise Aborted(f"secret {ref} is changing concurrently; try again")

    async def container_secrets(self, container_id: str, caller: str) -> list[Delivered]:
        """The values of a container's secrets, for the node it is placed on: `caller` (the
        principal's name) must be `node:<that node's id>`, whoever else asks."""
        if not re.fullmatch(r"[0-9a-f]{64}", container_id):
            raise InvalidArgument(
                f"container id {container_id!r} is not a full id (64 hex characters)",
                field="container_id",
            )
        desired = await CONTAINERS.get(self.store, container_id)
        if desired is None:
            raise NotFound(
                f"no such container: {container_id}",
                reason="CONTAINER_NOT_FOUND",
                metadata={"container": container_id},
                resource=("container", container_id),
            )
        if caller != f"node:{desired.node}":
            raise PermissionDenied(
                f"only node {desired.node}, where container {desired.name} is placed, receives "
                f"its secrets; {caller} may not",
                reason="NOT_THE_CONTAINERS_NODE",
                metadata={"container_id": desired.id, "node_id": desired.node},
            )
        delivered = []
        for ref in desired.config.secrets:
            if self.box is None:
                raise key_missing()
            record = await SECRETS.get(self.store, ref.name)
            if record is None:
                raise secret_not_found(ref.name)
            data = self.box.open(ref.name, record.sealed)
            filled = replace(ref, target=ref.file_name, mode=ref.file_mode)
            delivered.append(Delivered(filled, record.id, data))
        log.info(
            "secrets delivered",
            extra={"container": desired.id, "node": desired.node, "count": len(delivered)},
        )
        return delivered


def in_use(name: str, users: list[SecretUser]) -> FailedPrecondition:
    shown = ", ".join(f"{u.kind} {u.name}" for u in users[:5])
    more = f" and {len(users) - 5} more" if len(users) > 5 else ""
    return FailedPrecondition(
        f"secret {name} is in use by {shown}{more}: remove them first",
        reason="SECRET_IN_USE",
        metadata={"secret": name, "users": len(users)},
        resource=("secret", name),
        violations=[Violation("SECRET_IN_USE", f"{u.kind}/{u.name}", u.id) for u in users],
    )
