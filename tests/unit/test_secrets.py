"""The cluster's secrets core without etcd: the AES-256-GCM box, the key file, the record."""

from __future__ import annotations

import base64
import os
from dataclasses import replace
from pathlib import Path

import pytest

from berthd.cluster.secrets import (
    KEY_BYTES,
    SECRETS,
    SecretBox,
    SecretRecord,
    SecretsKeyError,
)
from berthd.common.errors import DataLoss, FailedPrecondition

VALUE = b"correct horse battery staple\n\x00\xff"


def box() -> SecretBox:
    return SecretBox(os.urandom(KEY_BYTES))


def test_a_value_round_trips_and_the_ciphertext_shows_nothing_of_it() -> None:
    key = box()
    sealed = key.seal("db-pass", VALUE)
    assert key.open("db-pass", sealed) == VALUE
    assert VALUE not in sealed.ciphertext and b"horse" not in sealed.ciphertext
    assert len(sealed.nonce) == 12 and len(sealed.ciphertext) == len(VALUE) + 16  # GCM's tag
    # A fresh nonce every time: the same value never seals the same way twice.
    again = key.seal("db-pass", VALUE)
    assert again.nonce != sealed.nonce and again.ciphertext != sealed.ciphertext


def test_another_key_is_named_as_such() -> None:
    sealed = box().seal("db-pass", VALUE)
    other = box()
    with pytest.raises(FailedPrecondition, match="sealed with another secrets key") as refused:
        other.open("db-pass", sealed)
    assert refused.value.reason == "SECRETS_KEY_MISMATCH"
    # Even when the record claims the other key's id, GCM refuses it.
    with pytest.raises(DataLoss) as forged:
        other.open("db-pass", replace(sealed, key_id=other.key_id))
    assert forged.value.reason == "SECRET_CORRUPT"


def test_the_name_is_bound_to_the_value() -> None:
    key = box()
    sealed = key.seal("db-pass", VALUE)
    with pytest.raises(DataLoss, match="secret api-key does not decrypt") as moved:
        key.open("api-key", sealed)  # a ciphertext copied into another secret's record
    assert moved.value.reason == "SECRET_CORRUPT"


@pytest.mark.parametrize("part", ["ciphertext", "nonce"])
def test_a_tampered_record_fails_with_a_clear_error(part: str) -> None:
    key = box()
    sealed = key.seal("db-pass", VALUE)
    raw = bytearray(getattr(sealed, part))
    raw[0] ^= 1
    with pytest.raises(DataLoss, match="its record in etcd was altered") as tampered:
        key.open("db-pass", replace(sealed, **{part: bytes(raw)}))
    assert tampered.value.reason == "SECRET_CORRUPT"
    truncated = replace(sealed, ciphertext=sealed.ciphertext[:-1])
    with pytest.raises(DataLoss):
        key.open("db-pass", truncated)


def test_the_key_file_is_32_private_bytes(tmp_path: Path) -> None:
    path = tmp_path / "secrets.key"
    key = os.urandom(KEY_BYTES)
    path.write_bytes(key)
    path.chmod(0o600)
    assert SecretBox.from_file(path).key_id == SecretBox(key).key_id
    path.chmod(0o640)
    with pytest.raises(SecretsKeyError, match=r"open to other users \(mode 0640\): make it 0600"):
        SecretBox.from_file(path)
    path.chmod(0o600)
    path.write_bytes(key[:16])
    with pytest.raises(SecretsKeyError, match="holds 16 bytes, not 32"):
        SecretBox.from_file(path)
    with pytest.raises(SecretsKeyError, match="cannot read the secrets key"):
        SecretBox.from_file(tmp_path / "absent.key")
    with pytest.raises(SecretsKeyError, match="a secrets key is 32 bytes"):
        SecretBox(b"short")


def test_the_record_holds_only_ciphertext_and_reads_back() -> None:
    key = box()
    sealed = key.seal("db-pass", VALUE)
    record = SecretRecord(
        id="abc",
        name="db-pass",
        labels={"env": "prod"},
        created_by="user:admin",
        key_id=sealed.key_id,
        nonce=base64.b64encode(sealed.nonce).decode(),
        ciphertext=base64.b64encode(sealed.ciphertext).decode(),
    )
    raw = record.encode()
    assert b"horse" not in raw and base64.b64encode(VALUE) not in raw
    # The key names the secret, whatever the value says.
    back = SECRETS.decode("db-pass", raw.replace(b'"name":"db-pass"', b'"name":"other"'))
    assert back.name == "db-pass" and back.labels == {"env": "prod"}
    assert key.open(back.name, back.sealed) == VALUE
    assert SECRETS.key("db-pass") == "secrets/db-pass"
