"""Registry webhooks against a real registry process and a receiver on loopback: signed push
events from both APIs, a repository filter, and events queued in etcd while the receiver is
down, delivered once it returns, across a registry restart too (docs/deploy-pipeline.md)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from berth.client import RegistryClient
from berth.client.webhooks import WebhookClient
from berthd.registry.webhooks import CONTENT_TYPE, SIGNATURE_HEADER, verify

from .conftest import ServiceProcess, Services, free_port, wait_until
from .oci_http import OCI_MANIFEST, Http, image, make_token, sha

SECRET = "s3cret"
# Retries every 0.2 s, at most 1 s apart: the test waits seconds, not minutes.
FAST_RETRIES = ("--webhook-first-retry=0.2", "--webhook-max-retry=1")


class Receiver:
    """An HTTP server on loopback that records what is POSTed to it; stop and start again on
    the same port."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[tuple[dict[str, str], bytes]] = []
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((dict(self.headers), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def events(self) -> list[dict]:
        return [e for _, body in self.received for e in json.loads(body)["events"]]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(free_port())
    yield r
    r.stop()


def start_registry(services: Services, tmp_path: Path) -> ServiceProcess:
    return services.start(
        "registry",
        f"--data-dir={tmp_path / 'registry-data'}",
        "--http-listen=127.0.0.1:0",
        *FAST_RETRIES,
    )


def push_grpc(registry: ServiceProcess, repository: str, tag: str) -> str:
    manifest, blobs = image([os.urandom(64)])
    with RegistryClient(registry.address) as client:
        for blob in blobs:
            client.push_blob(repository, io.BytesIO(blob), sha(blob), len(blob))
        return client.put_manifest(repository, tag, OCI_MANIFEST, manifest)


def berth(registry: ServiceProcess, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "berth", "--registry", registry.address, *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result


async def test_signed_push_events_from_both_apis(
    services: Services, tmp_path: Path, receiver: Receiver, store
) -> None:
    registry = start_registry(services, tmp_path)
    receiver.start()
    added = berth(
        registry,
        "registry",
        "webhook",
        "add",
        receiver.url,
        "--events",
        "push,delete",
        "--repo",
        "hooks/*",
        "--secret",
        SECRET,
    )
    hook_id = added.stdout.strip()
    listing = berth(registry, "registry", "webhook", "ls")
    assert hook_id in listing.stdout and "***" in listing.stdout
    assert SECRET not in listing.stdout
    assert SECRET not in berth(registry, "registry", "webhook", "ls", "--format", "json").stdout

    grpc_digest = push_grpc(registry, "hooks/app", "v1")
    http = Http(registry.http_url).bearer(await make_token(store, "admin", "admin"))
    manifest, blobs = image([os.urandom(64)])
    for blob in blobs:
        http.upload("hooks/web", blob)
    http_digest = http.put_manifest("hooks/web", "prod", manifest, OCI_MANIFEST)
    push_grpc(registry, "other/app", "v1")  # outside --repo: never sent

    wait_until(lambda: len(receiver.received) >= 2, 30, "two webhook deliveries")
    for headers, body in receiver.received:
        assert headers["Content-Type"] == CONTENT_TYPE
        assert verify(SECRET, body, headers[SIGNATURE_HEADER])
    events = {e["target"]["repository"]: e for e in receiver.events()}
    assert set(events) == {"hooks/app", "hooks/web"}
    app, web = events["hooks/app"], events["hooks/web"]
    assert app["action"] == web["action"] == "push"
    assert (app["target"]["tag"], app["target"]["digest"]) == ("v1", grpc_digest)
    assert (web["target"]["tag"], web["target"]["digest"]) == ("prod", http_digest)
    assert web["target"]["mediaType"] == OCI_MANIFEST
    assert web["target"]["url"] == f"{registry.http_url}/v2/hooks/web/manifests/{http_digest}"
    assert app["source"]["instanceID"] and app["id"] != web["id"]
    # The actor is the caller, through either API (the HTTP one by its bearer token).
    assert "admin" in app["actor"]["name"] and "admin" in web["actor"]["name"]

    # A delete is an event too.
    with RegistryClient(registry.address) as client:
        client.delete_tag("hooks/app", "v1")
    wait_until(lambda: len(receiver.received) >= 3, 30, "the delete's delivery")
    deleted = receiver.events()[-1]
    assert deleted["action"] == "delete"
    assert deleted["target"] == {"repository": "hooks/app", "tag": "v1"}
    with WebhookClient(registry.address) as hooks:
        log = hooks.deliveries(hook_id)
    assert [d.status for d in log] == ["delivered"] * 3
    assert all(d.attempts == 1 and d.last_status_code == 200 for d in log)


def test_events_wait_for_the_receiver_across_a_registry_restart(
    services: Services, tmp_path: Path, receiver: Receiver
) -> None:
    registry = start_registry(services, tmp_path)
    with WebhookClient(registry.address) as hooks:
        hook_id = hooks.create(receiver.url, ["push"]).id
    digest = push_grpc(registry, "down/app", "v1")

    def failed_twice() -> bool:
        with WebhookClient(registry.address) as hooks:
            log = hooks.deliveries(hook_id)
        return len(log) == 1 and log[0].attempts >= 2

    wait_until(failed_twice, 30, "two failed attempts")
    pending = berth(registry, "registry", "webhook", "deliveries", hook_id, "--format", "json")
    (entry,) = json.loads(pending.stdout)
    assert entry["status"] == "pending" and entry["digest"] == digest
    assert entry["last_status_code"] == 0 and entry["last_error"]
    table = berth(registry, "registry", "webhook", "deliveries", hook_id).stdout
    assert "pending" in table and "down/app:v1" in table

    # The registry goes away with the event still queued; another process finds it in etcd.
    registry.stop()
    registry = start_registry(services, tmp_path)
    receiver.start()
    wait_until(lambda: receiver.received, 30, "the queued delivery")
    (event,) = receiver.events()
    assert (event["action"], event["target"]["digest"]) == ("push", digest)
    assert SIGNATURE_HEADER not in receiver.received[0][0]  # no secret, no signature

    def delivered() -> bool:
        with WebhookClient(registry.address) as hooks:
            return hooks.deliveries(hook_id)[0].status == "delivered"

    wait_until(delivered, 15, "the log entry")
    with WebhookClient(registry.address) as hooks:
        (done,) = hooks.deliveries(hook_id)
    assert done.attempts >= 3 and done.last_status_code == 200 and not done.last_error
