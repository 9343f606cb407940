"""Who may do what over the registry's HTTP API: anonymous pulls of public repositories,
Docker's bearer challenge and token endpoint over berth's tokens, role and repository limits,
and TLS off loopback. Real registry processes; berth tokens written to the test's etcd prefix as
`berth token create` would."""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import time
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
from cryptography import x509

from berth.client import RegistryClient
from berthd.common.store import Store

from .conftest import ServiceProcess, Services
from .oci_http import OCI_MANIFEST, Http, image, make_token, start_http_registry


def token_for(http: Http, *scopes: str) -> tuple[str, list[dict]]:
    """A registry token from the realm (with http's credentials), and what it grants."""
    query = "&".join(f"scope={s}" for s in scopes)
    reply = http.request("GET", f"/v2/token?service=berth&{query}")
    assert reply.status == 200, reply.body
    token = reply.json()["token"]
    assert reply.json()["access_token"] == token and reply.json()["expires_in"] > 0
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return token, claims["access"]


def publish(registry: ServiceProcess, http: Http, name: str) -> tuple[str, bytes]:
    """Push an image over HTTP and make its repository public (gRPC, as `berth registry set`)."""
    digest, manifest = http.push_image(name, "1", [os.urandom(100)])
    with RegistryClient(registry.address) as client:
        client.update_repository(name, visibility="public")
    return digest, manifest


def test_anonymous_pulls_public_repositories_only(
    oci_registry: ServiceProcess, http_admin: Http, http_anonymous: Http
) -> None:
    digest, manifest = publish(oci_registry, http_admin, "lib/open")
    http_admin.push_image("lib/secret", "1", [os.urandom(100)])
    # Straight in, no token: a public repository is pullable by anyone.
    got = http_anonymous.request("GET", "/v2/lib/open/manifests/1")
    assert got.status == 200 and got.body == manifest
    layer = json.loads(manifest)["layers"][0]["digest"]
    assert http_anonymous.request("GET", f"/v2/lib/open/blobs/{layer}").status == 200
    assert http_anonymous.request("GET", "/v2/lib/open/tags/list").json()["tags"] == ["1"]
    # The catalog shows what the caller sees.
    assert http_anonymous.request("GET", "/v2/_catalog").json()["repositories"] == ["lib/open"]
    # A private repository (and one that does not exist) is 401 with the challenge to follow.
    for name in ("lib/secret", "lib/nothing"):
        reply = http_anonymous.request("GET", f"/v2/{name}/manifests/1")
        assert reply.status == 401 and reply.codes == ["UNAUTHORIZED"]
        assert reply.headers["WWW-Authenticate"] == (
            f'Bearer realm="http://{http_anonymous.host}/v2/token",service="berth",'
            f'scope="repository:{name}:pull"'
        )
    # Docker's flow: an anonymous token grants pull of the public repository, nothing else.
    token, access = token_for(http_anonymous, "repository:lib/open:pull,push")
    assert access == [{"type": "repository", "name": "lib/open", "actions": ["pull"]}]
    assert (
        http_anonymous.bearer(token).request("GET", f"/v2/lib/open/manifests/{digest}").status
        == 200
    )
    token, access = token_for(http_anonymous, "repository:lib/secret:pull")
    assert access == []
    reply = http_anonymous.bearer(token).request("GET", "/v2/lib/secret/manifests/1")
    assert reply.status == 401 and 'error="insufficient_scope"' in reply.headers["WWW-Authenticate"]
    # Anonymous pushes nothing, public or not.
    reply = http_anonymous.request("POST", "/v2/lib/open/blobs/uploads/")
    assert reply.status == 401
    assert 'scope="repository:lib/open:pull,push"' in reply.headers["WWW-Authenticate"]


async def test_tokens_grant_what_the_role_allows(
    oci_registry: ServiceProcess, http_admin: Http, store: Store
) -> None:
    http_admin.push_image("team/app", "1", [os.urandom(100)])
    http_admin.push_image("other/app", "1", [os.urandom(100)])
    base = Http(oci_registry.http_url)
    reader = await make_token(store, "ci-reader", "reader")
    developer = await make_token(store, "team-dev", "developer", "team/*")

    # `docker login`: Basic with the berth token as the password, any user name.
    login = base.basic(reader, "whoever")
    assert login.request("GET", "/v2/").status == 200
    token, access = token_for(login, "repository:team/app:pull,push")
    assert access == [{"type": "repository", "name": "team/app", "actions": ["pull"]}]
    pull_only = base.bearer(token)
    assert pull_only.request("GET", "/v2/team/app/manifests/1").status == 200
    # A pull-only token cannot push: 401 asking for more scope, which the realm will not give.
    reply = pull_only.request("POST", "/v2/team/app/blobs/uploads/")
    assert reply.status == 401 and reply.codes == ["DENIED"]
    assert 'error="insufficient_scope"' in reply.headers["WWW-Authenticate"]
    # containerd's OAuth2 form POST: the berth token as the password grant.
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = urlencode(
        {
            "grant_type": "password",
            "username": "ci",
            "password": reader,
            "service": "berth",
            "scope": "repository:team/app:pull,push",
        }
    ).encode()
    reply = base.request("POST", "/v2/token", body, form)
    assert reply.status == 200 and reply.json()["scope"] == "repository:team/app:pull"
    assert (
        base.bearer(reply.json()["access_token"]).request("GET", "/v2/team/app/manifests/1").status
        == 200
    )
    wrong = urlencode({"grant_type": "password", "username": "ci", "password": "nope"})
    assert base.request("POST", "/v2/token", wrong.encode(), form).status == 401
    odd = urlencode({"grant_type": "client_credentials"}).encode()
    assert base.request("POST", "/token", odd, form).codes == ["UNSUPPORTED"]
    # The berth token itself as the bearer: the role decides, 403 DENIED.
    reply = base.bearer(reader).request("POST", "/v2/team/app/blobs/uploads/")
    assert reply.status == 403 and reply.codes == ["DENIED"]
    reply = base.bearer(reader).request("DELETE", "/v2/team/app/manifests/1")
    assert reply.status == 403

    # A developer limited to team/* pushes there and only there.
    dev = base.basic(developer)
    token, access = token_for(
        dev, "repository:team/app:pull,push", "repository:other/app:pull,push"
    )
    assert access == [{"type": "repository", "name": "team/app", "actions": ["pull", "push"]}]
    pusher = base.bearer(token)
    digest, _ = pusher.push_image("team/app", "2", [os.urandom(100)])
    assert http_admin.request("GET", "/v2/team/app/manifests/2").headers[
        "Docker-Content-Digest"
    ] == (digest)
    assert pusher.request("GET", "/v2/other/app/manifests/1").status == 401
    assert base.basic(developer).request("POST", "/v2/other/app/blobs/uploads/").status == 403
    # The developer's catalog shows its repositories only.
    assert dev.request("GET", "/v2/_catalog").json()["repositories"] == ["team/app"]


async def test_bad_credentials(
    oci_registry: ServiceProcess, http_anonymous: Http, store: Store
) -> None:
    for auth in ("Basic bm90LWEtdG9rZW4=", "Bearer berth_0123456789abcdef_" + "x" * 43):
        reply = http_anonymous.with_auth(auth).request("GET", "/v2/token?scope=repository:a/b:pull")
        assert reply.status == 401 and reply.codes == ["UNAUTHORIZED"]
    for auth in ("Bearer not.a.token", "Digest abc", "Basic !!!"):
        reply = http_anonymous.with_auth(auth).request("GET", "/v2/")
        assert reply.status == 401 and reply.codes == ["UNAUTHORIZED"], auth
        assert reply.headers["WWW-Authenticate"].startswith("Bearer realm=")
    # A token of another registry (another key) is refused.
    token = await make_token(store, "someone", "admin")
    good, _ = token_for(http_anonymous.basic(token), "repository:a/b:pull")
    header, payload, _ = good.split(".")
    forged = f"{header}.{payload}.{base64.urlsafe_b64encode(b'x' * 32).decode().rstrip('=')}"
    assert http_anonymous.bearer(forged).request("GET", "/v2/").status == 401


def test_tls_beyond_loopback(services: Services, tmp_path: Path, admin_token: str) -> None:
    """Listening on every interface, the API speaks TLS with the cluster CA's certificate (the
    test still only talks to loopback)."""
    registry = start_http_registry(services, tmp_path / "tls", listen="0.0.0.0:0")
    assert registry.http_url.startswith("https://127.0.0.1:")
    ca = Path(os.environ["BERTH_TLS_CA"])
    secure = Http(registry.http_url, ca=ca)
    reply = secure.request("GET", "/v2/")
    assert reply.status == 401
    assert f'realm="https://{secure.host}/v2/token"' in reply.headers["WWW-Authenticate"]
    manifest, blobs = image([os.urandom(10)])
    admin = secure.bearer(admin_token)
    for blob in blobs:
        admin.upload("tls/app", blob)
    admin.put_manifest("tls/app", "1", manifest, OCI_MANIFEST)
    assert admin.request("GET", "/v2/tls/app/manifests/1").body == manifest
    # A client certificate of the cluster CA is a credential too (here the test's user:admin).
    assert secure.request("GET", "/v2/tls/app/manifests/1").status == 401
    cert = (Path(os.environ["BERTH_TLS_CERT"]), Path(os.environ["BERTH_TLS_KEY"]))
    with_cert = Http(registry.http_url, ca=ca, cert=cert)
    assert with_cert.request("GET", "/v2/").status == 200
    assert with_cert.request("GET", "/v2/tls/app/manifests/1").body == manifest


async def test_a_damaged_token_key_stops_the_registry_with_one_line(
    services: Services, tmp_path: Path, store: Store
) -> None:
    await store.put("registry/http-token-key", b"not hex at all")
    with pytest.raises(RuntimeError) as failed:
        start_http_registry(services, tmp_path)
    assert "registry/http-token-key in etcd is not 64 hex digits: delete it" in str(failed.value)
    assert "Traceback" not in str(failed.value)


def served_serial(url: str, ca: Path) -> int:
    """The serial number of the certificate the HTTPS listener serves now."""
    host, port = urlsplit(url).netloc.rsplit(":", 1)
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_the_tls_listener_takes_the_renewed_certificate(
    services: Services, tmp_path: Path, admin_token: str
) -> None:
    """A 30 s certificate is renewed at two thirds of its life; new HTTPS connections get the
    new one, with no restart."""
    registry = services.start(
        "registry",
        f"--data-dir={tmp_path / 'registry-data'}",
        "--http-listen=0.0.0.0:0",
        "--tls-lifetime=30",
    )
    ca = Path(os.environ["BERTH_TLS_CA"])
    first = served_serial(registry.http_url, ca)
    deadline = time.monotonic() + 40
    while served_serial(registry.http_url, ca) == first:
        assert time.monotonic() < deadline, "the HTTPS certificate was not renewed"
        time.sleep(1)
    reply = Http(registry.http_url, ca=ca).bearer(admin_token).request("GET", "/v2/")
    assert reply.status == 200
