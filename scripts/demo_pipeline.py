"""`make demo`'s push-to-deploy story (issue 17, docs/deploy-pipeline.md): the web service
follows a tag with a health check and `--update-failure-action rollback`; a push of a new
version rolls it by itself, a push of a broken one is rolled back by itself, and a webhook
receiver on loopback gets the registry's signed push events.

A mixin of scripts/demo.py's Demo: it uses its `heading`, `berth`, `run_quiet`, `replicas`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import shlex
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

REPO = "demo/web"
FOLLOWED = f"{REPO}:prod"
PAGE = "/usr/share/nginx/html/version.txt"
# The replicas' health: their page answers. Version 3 has no page, so it never turns healthy.
HEALTH_CMD = "wget -q -O /dev/null http://localhost/version.txt"
SECRET = "demo-webhook-secret"
SIGNATURE = "X-Berth-Signature-256"
ROLLOUT_TIMEOUT = 120.0
BUILDER = "demo-site"  # the container whose commits make the versions


class Receiver:
    """A webhook receiver on loopback: an http.server thread keeping every POST it gets."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                posts.append((dict(self.headers.items()), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # the demo prints what it got itself
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def push_of(self, tag: str, digest: str) -> tuple[dict[str, str], bytes] | None:
        """The POST announcing that `tag` was pushed as `digest`, if it came."""
        for headers, body in list(self.posts):
            for event in json.loads(body).get("events", []):
                target = event.get("target", {})
                wanted = (event.get("action"), target.get("tag"), target.get("digest"))
                if target.get("repository") == REPO and wanted == ("push", tag, digest):
                    return headers, body
        return None


class Prober:
    """Fetches the version page through the mesh every 0.1 s, counting the answers."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pages: Counter[str] = Counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=2) as reply:
                    self.pages[reply.read().decode().strip()] += 1
            except OSError:
                self.pages["(failed)"] += 1
            self.stop.wait(0.1)

    def done(self) -> str:
        self.stop.set()
        self.thread.join()
        return ", ".join(f"{page}: {n}" for page, n in sorted(self.pages.items()))


class PipelineSteps:
    # Provided by Demo.
    step: int
    env: dict[str, str]

    def heading(self, text: str) -> None: ...
    def show(self, argv: list[str]) -> None: ...
    def berth(self, *args: str, capture: bool = False, fails: bool = False) -> str: ...
    def run_quiet(self, argv: list[str]) -> str: ...
    def replicas(self) -> list[dict]: ...
    def running(self, name: str) -> dict: ...
    def remove_left(self, *names: str) -> None: ...
    def failed(self, message: str) -> Exception: ...

    def pipeline_steps(self, service: str, mesh_url: str, berth: Path) -> None:
        self.bin = berth
        self.service = service
        self.page_url = mesh_url + "version.txt"
        self.heading(
            "A webhook: the registry POSTs a signed event for every push to demo/web to a"
            " receiver on loopback (an http.server thread of this demo)"
        )
        receiver = Receiver()
        hook = ""
        self.remove_left(BUILDER)
        try:
            hook = self.berth(
                "registry", "webhook", "add", receiver.url, "--events", "push",
                "--repo", REPO, "--secret", SECRET, capture=True,
            ).strip()  # fmt: skip
            self.berth("registry", "webhook", "ls")
            self.versions(receiver, hook)
        finally:
            receiver.close()
            # Not created when an earlier step failed: that step's error is the one to show.
            with contextlib.suppress(Exception):
                self.berth("rm", "-f", BUILDER)
            if hook:
                self.berth("registry", "webhook", "rm", hook)

    def versions(self, receiver: Receiver, hook: str) -> None:
        self.heading(
            f"Version 1: a page that names its version, committed as {REPO}:1 and pushed to"
            f" {FOLLOWED}"
        )
        self.berth("run", "-d", "--name", BUILDER, "--network", "berth", "demo/nginx:1.22")
        self.running(BUILDER)
        self.version(1, f"echo v1 > {PAGE}")

        self.heading(
            f"The {self.service} service follows {FOLLOWED}, checks its replicas' health and"
            " rolls back a version that fails (stop-first, one replica at a time)"
        )
        self.berth(
            "service", "update", "--follow", "--image", FOLLOWED,
            "--health-cmd", HEALTH_CMD, "--health-interval", "1s", "--health-retries", "2",
            "--update-monitor", "2s", "--update-failure-action", "rollback",
            "--rollback-monitor", "2s", self.service,
        )  # fmt: skip
        self.rolled("completed")
        self.berth("service", "ps", self.service)
        self.curl("v1")

        self.heading(
            f"Version 2: commit a changed page as {REPO}:2 and push it to {FOLLOWED}; the"
            " service rolls by itself"
        )
        digest = self.pushed(2, f"echo v2 > {PAGE}", "completed")
        self.berth("service", "ps", self.service)
        self.curl("v2")

        self.heading(f"The webhook's receiver got the push of {FOLLOWED}, signed")
        self.webhook(receiver, digest)
        self.berth("registry", "webhook", "deliveries", hook)

        self.heading(
            f"Version 3 is broken: its page is gone, so its health check fails; pushed to"
            f" {FOLLOWED}, it is rolled back with no human"
        )
        self.pushed(3, f"rm {PAGE}", "rollback_completed")
        self.restored(digest)
        self.curl("v2")

    # --- the pieces -----------------------------------------------------------------------

    def version(self, n: int, change: str) -> str:
        """Change the builder container's page, commit it as REPO:n and move the followed
        tag to it (`berth tag` puts the manifest under the new tag: a push). Its digest."""
        self.berth("exec", BUILDER, "sh", "-c", change)
        self.berth("commit", "-m", f"version {n}", BUILDER, f"{REPO}:{n}")
        self.berth("tag", f"{REPO}:{n}", FOLLOWED)
        argv = [str(self.bin / "berth"), "--format", "json", "registry", "tags", REPO]
        tags = {t["name"]: t["digest"] for t in json.loads(self.run_quiet(argv))}
        if tags.get(FOLLOWED.split(":")[1]) != tags.get(str(n)) or not tags.get(str(n)):
            raise self.failed(f"{FOLLOWED} is not {REPO}:{n} ({tags})")
        return tags[str(n)]

    def pushed(self, n: int, change: str, state: str) -> str:
        """Push version n with `berth events` running and the page fetched through the mesh
        meanwhile; wait for the rollout to reach `state`, then show both."""
        events = [str(self.bin / "berth"), "events", "--filter", "type=service"]
        events += ["--filter", f"service={self.service}"]
        print(f"$ {shlex.join(['berth', *events[1:]])} &", flush=True)
        watcher = subprocess.Popen(
            events, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(watcher.stdout or ()))
        reader.start()
        prober = Prober(self.page_url)
        try:
            time.sleep(0.5)  # the stream is open before the push
            digest = self.version(n, change)
            self.rolled(state)
        finally:
            seen = prober.done()
            watcher.terminate()
            watcher.wait(10)
            reader.join(10)
        print("".join(lines), end="")
        print(f"({self.page_url} meanwhile: {seen})")
        words = ["follow:", "update"] + (
            ["rollback", "rollback-completed"] if state.startswith("rollback") else []
        )
        missing = [w for w in words if not any(f"service {w}" in line for line in lines)]
        if missing:
            raise self.failed(f"berth events showed no service {', '.join(missing)}")
        return digest

    def rolled(self, state: str) -> None:
        """Poll the service until its update state is `state`, printing each change of the
        state and the replicas."""
        started = time.monotonic()
        argv = [str(self.bin / "berth"), "--format", "json", "service", "inspect", self.service]
        last = ""
        while True:
            status = json.loads(self.run_quiet(argv))[0]["UpdateStatus"]
            replicas = sorted(self.replicas(), key=lambda r: r.get("slot", 0))
            line = f"{status['State'] or '-'}: " + ", ".join(
                f"{r['name']} {r.get('state') or 'pending'}"
                + (f" ({health})" if (health := (r.get("health") or {}).get("Status")) else "")
                for r in replicas
            )
            elapsed = time.monotonic() - started
            if line != last:
                print(f"  {elapsed:5.1f}s  {line}", flush=True)
                last = line
            if status["State"] == state:
                print(f"  {elapsed:5.1f}s  {status['Message'] or state}")
                return
            if status["State"] in ("paused", "rollback_paused"):
                raise self.failed(f"the update paused: {status['Message']}")
            if elapsed > ROLLOUT_TIMEOUT:
                raise self.failed(f"not {state} after {ROLLOUT_TIMEOUT:.0f}s")
            time.sleep(0.5)

    def curl(self, want: str) -> None:
        page = self.berth_free(["curl", "-sS", "-m", "5", self.page_url])
        if page.strip() != want:
            raise self.failed(f"{self.page_url} answered {page.strip()!r}, not {want!r}")

    def berth_free(self, argv: list[str]) -> str:
        """A command other than berth, shown with its output."""
        self.show(argv)
        out = self.run_quiet(argv)
        print(out, end="")
        return out

    def webhook(self, receiver: Receiver, digest: str) -> None:
        deadline = time.monotonic() + 30
        while (got := receiver.push_of(FOLLOWED.split(":")[1], digest)) is None:
            if time.monotonic() > deadline:
                raise self.failed(f"the receiver got no push event of {FOLLOWED}")
            time.sleep(0.2)
        headers, body = got
        event = json.loads(body)["events"][0]
        print(f"POST {receiver.url}  Content-Type: {headers.get('Content-Type')}")
        print(f"{SIGNATURE}: {headers.get(SIGNATURE)}")
        print(json.dumps({k: event[k] for k in ("action", "target", "actor")}, indent=2))
        mine = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mine, headers.get(SIGNATURE, "")):
            raise self.failed(f"the push event's {SIGNATURE} does not match the secret")
        print(f"(HMAC-SHA256 of the body with the webhook's secret matches {SIGNATURE})")

    def restored(self, good: str) -> None:
        """`berth service inspect`: the spec is version 2's again, version 3's is previous."""
        argv = [str(self.bin / "berth"), "service", "inspect", self.service]
        self.show(argv)
        data = json.loads(self.run_quiet(argv))[0]
        image = data["spec"]["template"]["image"]
        previous = data.get("previousSpec", {}).get("template", {}).get("image", "")
        abridged = {
            "UpdateStatus": data["UpdateStatus"],
            "Spec.Template.Image": image,
            "PreviousSpec.Template.Image": previous,
        }
        print(f"(abridged) {json.dumps(abridged, indent=2)}")
        if not image.endswith(good) or previous.endswith(good) or not previous:
            raise self.failed(f"the spec's image is {image}, not version 2's {good}")
