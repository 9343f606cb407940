"""`make demo`: start a 3-host local berth cluster, build an image from a multi-stage Dockerfile
(examples/hello), walk images through the registry, run containers through the cluster, commit
a changed container and run the result on another host, tell nginx's story (an image made from
Debian's nginx package, run with `-p 8080:80`, its page fetched with curl from the host, changed
with exec, committed, the new image run on another host with `-p 8081:80`), pull the built image
with skopeo, podman and docker from the registry's OCI HTTP API (/v2/), push to and pull from an
external registry (Debian's docker-registry on loopback), then run nginx as a replicated service
published through the routing mesh, find it by its name from a container, kill a host and
watch the replica move while the page keeps answering; then push to deploy: the service
follows a tag, a pushed version rolls out by itself, a broken one is rolled back by itself, and
a webhook receiver gets the registry's signed push event (scripts/demo_pipeline.py).

Every step prints a heading, the real command, and that command's real output. The cluster
keeps running at the end (stop it with `make down`). Exits non-zero, with one line saying
which step failed, when any step fails.

    .venv/bin/python scripts/demo.py [--state-dir DIR] [--base-port N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

# Run as `python scripts/demo.py`: Python puts scripts/ first on sys.path itself.
from demo_pipeline import PipelineSteps
from docker_registry import start_docker_registry, stop_process
from nginx_image import ImageError, make_nginx_image
from oci_images import make_busybox_image

BIN = Path(sys.executable).parent
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "hello"
BUILT = "demo/hello:1"
COMMITTED = "demo/hello:2"
REPO = "demo/busybox"
TAG = "1.35"
DESCRIPTION = "BusyBox 1.35 built from Debian's busybox-static"
NODES = 3
SERVICE = "web"
REPLICAS = 3
# The host killed (another one that runs a replica if the scheduler put none here).
VICTIM = "node-2"
MOVE_TIMEOUT = 60.0
NGINX = "demo/nginx:1.22"
NGINX_CHANGED = "demo/nginx:changed"
NGINX_PAGE = "/usr/share/nginx/html/index.html"
NGINX_WELCOME = "Welcome to nginx on berth!"
NGINX_CHANGE = "<h1>Changed with berth exec, then committed</h1>"
# Docker's `-p HOST:CONTAINER` for the two nginx containers (the local cluster's hosts share
# one address, so each gets its own host port).
NGINX_PORTS = (8080, 8081)
# The web service's port on every node (the routing mesh), and each replica's page: its host
# name, the short id `berth service ps` shows. nginx stops at once on SIGTERM.
MESH_PORT = 8090
MESH_FETCHES = 9
REPLICA_PAGE = "<h1>served by "
REPLICA_CMD = [
    "sh", "-c",
    f'echo "{REPLICA_PAGE}$(hostname)</h1>" > {NGINX_PAGE} && exec nginx -g "daemon off;"',
]  # fmt: skip


def page_url(host_port: int) -> str:
    """Where the host fetches a published page: every host of `berthd up` is this machine, so
    a port published on any node answers on loopback."""
    return f"http://127.0.0.1:{host_port}/"


def page_ids(page: str) -> list[str]:
    """The replicas' host names (short ids) that a page, or several, names."""
    return [
        line.split(REPLICA_PAGE, 1)[1].split("<", 1)[0]
        for line in page.splitlines()
        if REPLICA_PAGE in line
    ]


def fetch_until(
    url: str, stop: threading.Event, started: float, fetches: list[tuple[float, str, str]]
) -> None:
    """Fetch `url` every 0.1 s until `stop`, noting (seconds since `started`, page, error)."""
    while not stop.is_set():
        at = time.monotonic() - started
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                fetches.append((at, reply.read().decode(), ""))
        except OSError as exc:
            fetches.append((at, "", str(getattr(exc, "reason", exc))))
        stop.wait(0.1)


class StepFailed(Exception):
    """A demo step failed; str() is the one line to print."""


class Demo(PipelineSteps):
    def __init__(self, state_dir: Path | None, base_port: int | None) -> None:
        self.state_dir = state_dir
        self.base_port = base_port
        self.step = 0
        self.env = dict(os.environ)
        self.bold = sys.stdout.isatty()
        self.source: dict = {}  # skopeo's view of the base image as pushed
        self.victim = VICTIM  # the host the cluster steps kill

    # --- presentation ---

    def heading(self, text: str) -> None:
        self.step += 1
        line = f"== {self.step}. {text}"
        print(f"\n\033[1m{line}\033[0m" if self.bold else f"\n{line}", flush=True)

    def show(self, argv: list[str]) -> None:
        shown = [Path(argv[0]).name, *argv[1:]]
        print(f"$ {shlex.join(shown)}", flush=True)

    # --- running ---

    def run(self, argv: list[str], capture: bool = False, fails: bool = False) -> str:
        """Show and run a command; its output goes straight to the terminal unless captured.
        With `fails`, the command must fail (the step shows a refusal)."""
        self.show(argv)
        try:
            done = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                env=self.env,
                text=True,
                capture_output=capture,
                check=False,
            )
        except OSError as exc:
            raise StepFailed(f"step {self.step} ({shlex.join(argv)}): {exc}") from exc
        if capture:
            sys.stdout.write(done.stdout)
            sys.stderr.write(done.stderr)
            sys.stdout.flush()
        if (done.returncode != 0) != fails:
            shown = shlex.join([Path(argv[0]).name, *argv[1:]])
            raise StepFailed(f"step {self.step} ({shown}) exited with status {done.returncode}")
        if fails:
            print(f"(exit status {done.returncode})", flush=True)
        return done.stdout if capture else ""

    def berth(self, *args: str, capture: bool = False, fails: bool = False) -> str:
        return self.run([str(BIN / "berth"), *args], capture=capture, fails=fails)

    def state_args(self) -> list[str]:
        return ["--state-dir", str(self.state_dir)] if self.state_dir else []

    # --- the steps ---

    def cluster(self) -> dict:
        """The cluster `berthd up` recorded, read the way the CLI reads it."""
        from berth.config import default_state_dir, load_cluster_file

        state = (self.state_dir or default_state_dir()).resolve()
        cluster = load_cluster_file(state)
        if not cluster:
            raise StepFailed(f"step {self.step}: `berthd up` wrote no {state}/cluster.json")
        return cluster

    def tls_steps(self, address: str, state: Path) -> None:
        """Every port speaks mutual TLS: the cluster's certificate names its identity, and a
        plaintext client is refused."""
        self.heading("Every port speaks mutual TLS, with certificates from the cluster's own CA")
        tls = state / "tls"
        print(f"(`berthd up` made the CA and every certificate in {tls}; the CLI finds them there)")
        argv = ["openssl", "s_client", "-connect", address, "-CAfile", str(tls / "ca.crt")]
        argv += ["-cert", str(tls / "client.crt"), "-key", str(tls / "client.key")]
        argv += ["-brief", "-verify_return_error"]
        self.show(argv)
        done = subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False
        )
        wanted = ("Protocol version", "Peer certificate", "Verification")
        for line in (done.stdout + done.stderr).splitlines():
            if line.startswith(wanted):
                print(line)
        # Not its exit status: s_client may exit 1 after a verified handshake when the server
        # resets the connection it closes (seen under load).
        verified = "Verification: OK" in done.stdout + done.stderr
        if not verified or "Peer certificate: CN = service:cluster" not in done.stderr:
            raise StepFailed(f"step {self.step}: the cluster's certificate was not verified")
        # Plaintext HTTP/2 to the same port: the server takes it for a broken TLS handshake.
        self.run(["curl", "-sS", "--http2-prior-knowledge", f"http://{address}/"], fails=True)

    def access_steps(self, cluster: dict) -> None:
        """People and programs log in with tokens that carry a role: a reader may look around,
        and is refused anything that changes the cluster."""
        self.heading("A token with the reader role may look, and is refused what it may not do")
        token = self.berth(
            "token", "create", "--name", "demo-reader", "--role", "reader", "-q", capture=True
        ).strip()
        saved = dict(self.env)
        # The reader's program: the token, and the cluster's public port (no client certificate).
        self.env["BERTH_TOKEN"] = token
        self.env["BERTH_HOST"] = cluster["services"]["cluster"]["public_address"]
        print(
            f"(with BERTH_TOKEN=berth_… and BERTH_HOST={self.env['BERTH_HOST']}, the public port)"
        )
        try:
            self.berth("node", "ls")
            self.berth("node", "drain", VICTIM, fails=True)
            self.berth("token", "ls", fails=True)
        finally:
            self.env = saved
        self.berth("token", "rm", "demo-reader")

    def failed(self, message: str) -> StepFailed:
        return StepFailed(f"step {self.step}: {message}")

    def berthd(self, *args: str) -> str:
        return self.run([str(BIN / "berthd"), *args, *self.state_args()])

    def main(self) -> None:
        self.heading(
            f"Start a local cluster: etcd, the registry, {NODES} node agents, the cluster, the"
            " image service, the builder"
        )
        argv = [str(BIN / "berthd"), "up", "--nodes", str(NODES), *self.state_args()]
        if self.base_port:
            argv += ["--base-port", str(self.base_port)]
        self.run(argv)
        cluster = self.cluster()
        services = cluster["services"]
        registry, host, node = services["registry"], services["cluster"], services["node"]
        # The CLI would find the default state directory by itself; exporting the addresses
        # (and the state directory, where the CLI finds the cluster's CA and the admin
        # certificate) makes every command below talk to this cluster whatever --state-dir was.
        exported = {
            "BERTH_STATE_DIR": cluster["state_dir"],
            "BERTH_REGISTRY": registry["address"],
            "BERTH_HOST": host["address"],
            "BERTH_IMAGE": services["image"]["address"],
            "BERTH_BUILDER": services["builder"]["address"],
        }
        self.env.pop("BERTH_NODE", None)
        self.env.update(exported)
        print(f"(the commands below run with {' '.join(f'{k}={v}' for k, v in exported.items())})")

        self.tls_steps(host["address"], Path(cluster["state_dir"]))
        self.access_steps(cluster)
        work = Path(tempfile.mkdtemp(prefix="berth-demo-"))
        try:
            self.image_steps(work)
            self.build_steps()
            self.registry_steps(work)
            self.oci_http_steps(work, registry)
            self.container_steps()
            self.nginx_steps(work)
            self.external_steps(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.cluster_steps()

        self.heading("The registry's metrics")
        print(f"GET {registry['metrics']}  (berth_registry_* and berth_grpc_requests_total)")
        self.metrics(registry["metrics"], "berth_registry_", "berth_grpc_requests_total")

        self.heading("The node agent's metrics (node-1)")
        print(f"GET {node['metrics']}  (berth_node_*)")
        self.metrics(node["metrics"], "berth_node_")

        self.heading("The cluster service's metrics")
        print(f"GET {host['metrics']}  (berth_cluster_*)")
        self.metrics(host["metrics"], "berth_cluster_")

        for name in ("image", "builder"):
            self.heading(f"The {name} service's metrics")
            print(f"GET {services[name]['metrics']}  (berth_{name}_*)")
            self.metrics(services[name]["metrics"], f"berth_{name}_")

        state = self.state_args()
        stop = "make down" + (f" STATE_DIR={self.state_dir}" if self.state_dir else "")
        print(
            f"\nThe cluster keeps running with {self.victim} down. Bring the host back with:"
            f" {shlex.join(['berthd', 'start-node', self.victim, *state])}\nStop it with: {stop}"
        )

    def image_steps(self, work: Path) -> None:
        layout = work / "busybox"

        self.heading("Build a busybox OCI image with umoci (scripts/oci_images.py)")
        print(f">>> make_busybox_image({str(layout)!r}, 'latest')")
        try:
            make_busybox_image(layout, "latest")
        except (RuntimeError, OSError) as exc:
            raise StepFailed(f"step {self.step} (make_busybox_image): {exc}") from exc
        self.run(["umoci", "stat", "--image", f"{layout}:latest"])
        source = json.loads(self.run_quiet(["skopeo", "inspect", f"oci:{layout}:latest"]))

        self.heading("Push it to the registry: the base image of the build")
        self.berth("oci", "push", f"{layout}:latest", f"{REPO}:{TAG}")
        self.source = source

    def build_steps(self) -> None:
        self.heading(
            "Build examples/hello, a multi-stage Dockerfile: RUN steps run on a node, COPY"
            " layers are made by the builder"
        )
        self.run(["cat", str(EXAMPLE / "Dockerfile")])
        self.berth("build", "-t", BUILT, str(EXAMPLE))

        self.heading("Build it again: every step comes from the build cache (etcd)")
        self.berth("build", "-t", BUILT, str(EXAMPLE))
        self.berth("builder", "ls")

        self.heading("Run it through the cluster, look at its history")
        self.berth("run", "--rm", BUILT)
        self.berth("history", BUILT)

    def registry_steps(self, work: Path) -> None:
        pulled = work / "pulled"
        source = self.source
        self.heading("Describe the base image's repository")
        self.berth(
            "registry",
            "set",
            REPO,
            "--description",
            DESCRIPTION,
            "--label",
            "os=linux",
            "--label",
            "source=debian",
        )

        self.heading("Search the registry")
        self.berth("search", "busybox")

        self.heading("List the repository's tags")
        self.berth("registry", "tags", REPO)

        self.heading("List every repository")
        self.berth("registry", "ls")

        self.heading("Pull the image back into a new OCI layout")
        self.berth("oci", "pull", f"{REPO}:{TAG}", f"{pulled}:{TAG}")

        self.heading("Inspect the pulled copy with skopeo: same digests as the push")
        copy = json.loads(self.run(["skopeo", "inspect", f"oci:{pulled}:{TAG}"], capture=True))
        same = all(copy.get(key) == source.get(key) for key in ("Digest", "Layers"))
        if not same:
            raise StepFailed(
                f"step {self.step}: pulled manifest {copy.get('Digest')} / layers"
                f" {copy.get('Layers')} differ from pushed {source.get('Digest')} /"
                f" {source.get('Layers')}"
            )
        layers = len(source.get("Layers") or [])
        print(f"match: manifest {source['Digest']} and its {layers} layer(s) are the ones pushed")

        self.heading("What garbage collection would delete (dry run)")
        self.berth("registry", "gc", "--dry-run")

    def oci_http_steps(self, work: Path, registry: dict) -> None:
        """The registry also speaks the OCI Distribution HTTP API: skopeo and podman pull the
        image berth built, with a berth token as their password (docs/registry.md)."""
        host = registry["http_url"].removeprefix("http://")
        self.heading(
            f"skopeo and podman pull the berth-built {BUILT} from the registry's /v2/ ({host})"
        )
        token = self.berth(
            "token", "create", "--name", "demo-puller", "--role", "reader", "-q", capture=True
        ).strip()
        creds = f"demo:{token}"
        print("(with a reader's token from `berth token create` as the password)")
        try:
            self.run(
                [
                    "skopeo",
                    "inspect",
                    "--tls-verify=false",
                    "--creds",
                    creds,
                    f"docker://{host}/{BUILT}",
                ]
            )
            self.run(
                [
                    "skopeo",
                    "--insecure-policy",
                    "copy",
                    "--src-tls-verify=false",
                    "--src-creds",
                    creds,
                    f"docker://{host}/{BUILT}",
                    f"oci:{work / 'hello'}:1",
                ]
            )
            if shutil.which("podman"):
                # A private storage and run root: nothing of the machine's podman is touched.
                root, runroot = work / "podman", Path(tempfile.mkdtemp(prefix="berth-demo-"))
                podman = ["podman", "--root", str(root), "--runroot", str(runroot)]
                podman += ["--storage-driver", "vfs"]
                try:
                    self.run(
                        [*podman, "pull", "--tls-verify=false", "--creds", creds, f"{host}/{BUILT}"]
                    )
                    self.run([*podman, "images"])
                finally:
                    subprocess.run(
                        [*podman, "system", "reset", "--force"], capture_output=True, check=False
                    )
                    shutil.rmtree(runroot, ignore_errors=True)
            if shutil.which("dockerd"):
                self.docker_steps(work, host, token)
        finally:
            self.berth("token", "rm", "demo-puller")

    def docker_steps(self, work: Path, host: str, token: str) -> None:
        """Docker's engine pulls and runs it too: a dockerd of the demo's own (data and exec
        roots, socket; no iptables, no bridge, so the host's network is left alone), stopped
        by its pid at the end. A registry on 127.0.0.0/8 needs no insecure-registries entry."""
        self.heading(f"docker pulls and runs {BUILT} from the registry's /v2/")
        short = Path(tempfile.mkdtemp(prefix="berth-demo-"))  # socket paths must stay short
        sock = short / "docker.sock"
        log = open(work / "dockerd.log", "wb")  # noqa: SIM115 (closed in finally)
        daemon = subprocess.Popen(
            [
                "dockerd",
                "--data-root",
                str(work / "docker"),
                "--exec-root",
                str(short / "exec"),
                "--pidfile",
                str(short / "docker.pid"),
                "-H",
                f"unix://{sock}",
                "--iptables=false",
                "--bridge=none",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        saved = dict(self.env)
        self.env["DOCKER_CONFIG"] = str(work / "docker-config")
        docker = ["docker", "-H", f"unix://{sock}"]
        try:
            deadline = time.monotonic() + 60
            while subprocess.run([*docker, "version"], capture_output=True).returncode != 0:
                if daemon.poll() is not None or time.monotonic() > deadline:
                    raise StepFailed(f"step {self.step}: dockerd did not start")
                time.sleep(0.2)
            self.run([*docker, "login", "-u", "demo", "-p", token, host])
            self.run([*docker, "pull", f"{host}/{BUILT}"])
            self.run([*docker, "run", "--rm", "--network", "none", f"{host}/{BUILT}"])
            self.run([*docker, "rmi", f"{host}/{BUILT}"])
        finally:
            self.env = saved
            daemon.terminate()
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
            log.close()
            shutil.rmtree(short, ignore_errors=True)

    def container_steps(self) -> None:
        image = f"{REPO}:{TAG}"
        self.heading("The cluster's images: berth's registry, read as images")
        self.berth("images")

        self.heading(
            "Run a container through the cluster: it picks a node (which pulls the image if it"
            " must), output streams back, its exit code is ours"
        )
        self.berth("run", "--rm", image, "sh", "-c", "echo hello from $(hostname); exit 0")

        self.heading("Run one in the background, with a memory limit")
        self.berth(
            "run", "-d", "--name", "demo-web", "-m", "64m", image,
            "sh", "-c", "while true; do echo tick; sleep 1; done",
        )  # fmt: skip
        self.berth("ps")

        self.heading(
            "Exec into it (routed to its node), change its filesystem, look at the changes"
        )
        self.berth("exec", "demo-web", "sh", "-c", "echo from exec; rm /etc/passwd")
        self.berth("diff", "demo-web")
        self.berth("stats", "--no-stream", "demo-web")
        self.berth("logs", "--tail", "2", "demo-web")

        self.heading("Commit its changes as a new image, with a message and a new CMD")
        placed = json.loads(
            self.run_quiet([str(BIN / "berth"), "--format", "json", "inspect", "demo-web"])
        )[0]
        self.berth(
            "commit", "-a", "demo", "-m", "tick log and no passwd", "-c",
            'CMD ["sh", "-c", "ls /etc; test -e /etc/passwd || echo no passwd here"]',
            "demo-web", COMMITTED,
        )  # fmt: skip
        self.berth("history", COMMITTED)

        ran_on = placed.get("Node", {}).get("ID")
        other = next(n for n in self.node_ids() if n != ran_on)
        self.heading(f"Run the committed image on another host ({other}; demo-web ran on {ran_on})")
        self.berth("run", "--rm", "--constraint", f"node.id=={other}", COMMITTED)

        self.heading("Stop and remove the container")
        self.berth("stop", "-t", "1", "demo-web")
        self.berth("rm", "demo-web")
        self.berth("images")

        self.heading(
            "A container whose image does not exist: its node says so at once, with a reason"
        )
        self.berth("run", "-d", "--name", "demo-typo", "demo/hello:nosuch")
        self.berth("wait", "demo-typo", fails=True)
        self.berth("ps", "-a", "--filter", "name=demo-typo")
        self.berth("rm", "demo-typo")

    # --- nginx: the seed's story -----------------------------------------------------------

    def nginx_steps(self, work: Path) -> None:
        """Run nginx, fetch its page from the host, change it with exec, commit the change and
        fetch it from the new image on another host."""
        layout = work / "nginx"
        self.heading(
            "Build an nginx image from Debian's nginx package (scripts/nginx_image.py): the .deb"
            " files `make deps` downloaded, no package mirror, the same digest every time"
        )
        print(f">>> make_nginx_image({str(layout)!r}, 'latest')  # twice")
        try:
            image = make_nginx_image(layout, "latest")
            again = make_nginx_image(work / "nginx-again", "latest")
        except (ImageError, RuntimeError, OSError) as exc:
            raise StepFailed(f"step {self.step} (make_nginx_image): {exc}") from exc
        if again.digest != image.digest:
            raise StepFailed(f"step {self.step}: two builds differ: {image.digest} {again.digest}")
        print(f"nginx {image.version}: {image.digest}, both times")
        self.berth("oci", "push", f"{layout}:latest", NGINX)
        self.berth("history", NGINX)
        self.remove_left("demo-nginx", "demo-nginx2")

        self.heading(
            f"Run nginx with its port 80 published as {NGINX_PORTS[0]} (-p joins berth's"
            " default network)"
        )
        self.berth("network", "ls")
        self.berth("run", "-d", "--name", "demo-nginx", "-p", f"{NGINX_PORTS[0]}:80", NGINX)
        placed = self.running("demo-nginx")
        address = placed["NetworkSettings"]["IPAddress"]
        print(f"(running on {placed['Node']['ID']}, address {address} on network berth)")
        self.published("demo-nginx", NGINX_PORTS[0])

        self.heading(f"Fetch its page with curl from the host, through port {NGINX_PORTS[0]}")
        url = page_url(NGINX_PORTS[0])
        self.fetch(url, NGINX_WELCOME)
        self.berth("logs", "--tail", "1", "demo-nginx")

        self.heading("Change index.html with exec; the page changes")
        self.berth("exec", "demo-nginx", "sh", "-c", f'echo "{NGINX_CHANGE}" > {NGINX_PAGE}')
        self.fetch(url, NGINX_CHANGE)
        self.berth("diff", "demo-nginx")

        self.heading(f"Commit the change as a new image, {NGINX_CHANGED}")
        self.berth("commit", "-m", "a new index.html", "demo-nginx", NGINX_CHANGED)
        self.berth("history", NGINX_CHANGED)

        ran_on = placed["Node"]["ID"]
        other = next(n for n in self.node_ids() if n != ran_on)
        self.heading(
            f"Run the new image on another host ({other}; demo-nginx runs on {ran_on}) and"
            " fetch the changed page there"
        )
        self.berth(
            "run", "-d", "--name", "demo-nginx2", "-p", f"{NGINX_PORTS[1]}:80",
            "--constraint", f"node.id=={other}", NGINX_CHANGED,
        )  # fmt: skip
        moved = self.running("demo-nginx2")
        if moved["Node"]["ID"] != other:
            raise StepFailed(f"step {self.step}: demo-nginx2 runs on {moved['Node']['ID']}")
        print(
            f"(running on {other}, address {moved['NetworkSettings']['IPAddress']};"
            f" the hosts of `berthd up` share this machine, so its own port {NGINX_PORTS[1]})"
        )
        self.fetch(page_url(NGINX_PORTS[1]), NGINX_CHANGE)

        self.heading("Remove both nginx containers")
        self.berth("rm", "-f", "demo-nginx", "demo-nginx2")

    def published(self, name: str, host_port: int) -> None:
        """`berth port` and the PORTS column of `berth ps` name the published port."""
        ports = self.berth("port", name, capture=True)
        if f"80/tcp -> 0.0.0.0:{host_port}" not in ports:
            raise StepFailed(f"step {self.step}: berth port {name} does not show {host_port}")
        listed = self.berth("ps", "--filter", f"name={name}", capture=True)
        if f"0.0.0.0:{host_port}->80/tcp" not in listed:
            raise StepFailed(f"step {self.step}: berth ps shows no port {host_port} for {name}")

    def running(self, name: str) -> dict:
        """`berth inspect NAME` once it runs with an address (its node reports the address
        with the start)."""
        deadline = time.monotonic() + MOVE_TIMEOUT
        while True:
            argv = [str(BIN / "berth"), "--format", "json", "inspect", name]
            info = json.loads(self.run_quiet(argv))[0]
            state = info["State"]["Status"]
            if state == "running" and info["NetworkSettings"]["IPAddress"]:
                return info
            if state == "exited" or time.monotonic() > deadline:
                raise StepFailed(f"step {self.step}: {name} is {state}: {info['State']['Error']}")
            time.sleep(0.2)

    def fetch(self, url: str, want: str) -> None:
        """`curl URL` from the host, shown once nginx answers (it binds port 80 a moment after
        its container counts as running); the page must say `want`."""
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    if want in reply.read().decode():
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise StepFailed(f"step {self.step}: {url} did not answer with {want!r}")
            time.sleep(0.2)
        page = self.run(["curl", "-sS", url], capture=True)
        if want not in page:
            raise StepFailed(f"step {self.step}: {url} did not answer with {want!r}")

    def remove_left(self, *names: str) -> None:
        """Containers of these names left by an earlier demo go first, shown."""
        argv = [str(BIN / "berth"), "--format", "json", "ps", "-a"]
        left = [c for c in json.loads(self.run_quiet(argv)) if c.get("name") in names]
        if left:
            print(f"({', '.join(c['name'] for c in left)} left from an earlier demo)")
            self.berth("rm", "-f", *(c["name"] for c in left))

    def external_steps(self, work: Path) -> None:
        self.heading("Push the built image to an external registry (docker-registry on loopback)")
        try:
            proc, address, _ = start_docker_registry(work / "external")
        except (RuntimeError, OSError) as exc:
            raise StepFailed(f"step {self.step} (docker-registry): {exc}") from exc
        try:
            remote = f"{address}/demo/hello:1"
            self.berth("push", BUILT, remote)
            self.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{remote}"])

            self.heading("Pull it back under another name, and save it as a docker-archive")
            self.berth("pull", "--as", "pulled/hello:1", remote)
            archive = work / "hello.tar"
            self.berth("save", "-o", str(archive), "pulled/hello:1")
            self.run(["skopeo", "inspect", f"docker-archive:{archive}"])
        finally:
            stop_process(proc)

    def node_ids(self) -> list[str]:
        nodes = json.loads(self.run_quiet([str(BIN / "berth"), "--format", "json", "node", "ls"]))
        return [n["id"] for n in nodes if n.get("state") == "ready"]

    def cluster_steps(self) -> None:
        self.heading(f"The cluster's nodes: {NODES} agents, each its own host (label host=<id>)")
        self.prepare_rerun()
        self.berth("node", "ls")

        self.heading(
            f"A replicated web service: {REPLICAS} nginx replicas, port 80 published as"
            f" {MESH_PORT} on every node (the routing mesh)"
        )
        print("(each replica writes its host name, its container's short id, into its page)")
        self.berth(
            "service", "create", "--name", SERVICE, "--replicas", str(REPLICAS),
            "-p", f"{MESH_PORT}:80", NGINX, *REPLICA_CMD,
        )  # fmt: skip
        self.wait_replicas(exclude="", what=f"{REPLICAS} replicas running")
        self.berth("service", "ps", SERVICE)
        listed = self.berth("service", "ls", capture=True)
        if f"*:{MESH_PORT}->80/tcp" not in listed:
            raise StepFailed(f"step {self.step}: berth service ls shows no port {MESH_PORT}")

        self.heading(f"Fetch the page through the mesh {MESH_FETCHES} times: replicas take turns")
        self.mesh_fetches()

        self.heading(
            f"Names: a container on network berth looks up {SERVICE} (every replica's address,"
            f" DNS round-robin) and fetches http://{SERVICE}/"
        )
        self.names()

        replicas = self.replicas()
        on = {r["node_id"]: r["name"] for r in replicas if r.get("state") == "running"}
        # Not node-1: the last steps read its metrics.
        self.victim = VICTIM if VICTIM in on else next(n for n in sorted(on) if n != "node-1")
        self.heading(
            f"Kill host {self.victim} (it runs {on[self.victim]}): SIGKILL its agent, its"
            " conmons and its containers"
        )
        self.berthd("kill-node", self.victim)

        self.heading(
            f"Wait for the cluster: {self.victim}'s lease expires, its replica starts"
            f" elsewhere; the page is fetched through the mesh meanwhile"
        )
        self.wait_replicas(
            exclude=self.victim,
            what=f"{REPLICAS} replicas running, none on {self.victim}",
            probe=page_url(MESH_PORT),
        )
        self.berth("service", "ps", SERVICE)

        self.heading("The page through the mesh after the move: every fetch answers")
        self.mesh_fetches()

        self.heading(f"The name follows the moved replica: {SERVICE} answers its new address")
        self.names()

        self.heading(f"The nodes again: {self.victim} is down")
        self.berth("node", "ls")

        self.pipeline_steps(SERVICE, page_url(MESH_PORT), BIN)

    def running_replicas(self) -> dict[str, dict]:
        """Running replicas by their short id, the host name that their page names."""
        return {r["id"][:12]: r for r in self.replicas() if r.get("state") == "running"}

    def served_by(self, page: str) -> list[str]:
        """The replicas' short ids that a page (or several) names, each checked to be a
        running replica's."""
        running = self.running_replicas()
        ids = page_ids(page)
        unknown = [i for i in ids if i not in running]
        if unknown:
            raise StepFailed(f"step {self.step}: answered by {unknown}, not a running replica")
        return ids

    def mesh_fetches(self) -> None:
        """curl the mesh port on the host in a loop; every fetch must answer, from a running
        replica, and more than one replica must take part."""
        loop = f"for i in $(seq {MESH_FETCHES}); do curl -sS -m 5 {page_url(MESH_PORT)}; done"
        page = self.run(["sh", "-c", loop], capture=True)
        ids = self.served_by(page)
        if len(ids) != MESH_FETCHES:
            raise StepFailed(f"step {self.step}: {len(ids)} of {MESH_FETCHES} fetches answered")
        names = {i: r["name"] for i, r in self.running_replicas().items()}
        counts = ", ".join(f"{names[i]}: {ids.count(i)}" for i in sorted(set(ids), key=names.get))
        # Three replicas picked at random: all nine fetches on one has odds of 1 in 6561.
        if len(set(ids)) < 2:
            raise StepFailed(f"step {self.step}: one replica answered every fetch ({counts})")
        print(f"(all {MESH_FETCHES} answered, by {len(set(ids))} replicas: {counts})")

    def names(self) -> None:
        """A container on berth's network resolves the service's name to every running
        replica's address, and fetches the page by the name. Polled quietly first: a moved
        replica's name record reaches the resolvers a moment after its start (TTL 2 s)."""
        script = f"nslookup {SERVICE}; wget -q -O - http://{SERVICE}/"
        argv = [str(BIN / "berth"), "run", "--rm", "--network", "berth", NGINX, "sh", "-c"]
        deadline = time.monotonic() + 15
        while True:
            want = {r["network"]["ip_address"] for r in self.running_replicas().values()}
            with contextlib.suppress(StepFailed):  # NXDOMAIN, while no replica has a record
                if self.resolved(self.run_quiet([*argv, f"nslookup {SERVICE}"])) == want:
                    break
            if time.monotonic() > deadline:
                raise StepFailed(f"step {self.step}: {SERVICE} does not resolve to {want}")
            time.sleep(0.5)
        out = self.berth(*argv[1:], script, capture=True)
        got = self.resolved(out)
        if got != want:
            raise StepFailed(f"step {self.step}: {SERVICE} resolved to {got}, not {want}")
        served = self.served_by(out)
        if len(served) != 1:
            raise StepFailed(f"step {self.step}: http://{SERVICE}/ did not answer")
        name = self.running_replicas()[served[0]]["name"]
        print(
            f"({SERVICE} is {', '.join(sorted(got))}: the {len(got)} running replicas; {name}"
            f" answered http://{SERVICE}/)"
        )

    @staticmethod
    def resolved(out: str) -> set[str]:
        """The addresses in busybox nslookup's answer (the server's line carries a port)."""
        return {
            line.split()[1]
            for line in out.splitlines()
            if line.startswith("Address:") and ":" not in line.split()[1]
        }

    def prepare_rerun(self) -> None:
        """A cluster left running by an earlier demo: bring killed hosts back and remove the
        service, shown as the commands a person would type."""
        nodes = json.loads(self.run_quiet([str(BIN / "berth"), "--format", "json", "node", "ls"]))
        for node in nodes:
            if node.get("state") != "ready":
                print(f"({node['id']} is still down from an earlier demo)")
                self.berthd("start-node", node["id"])
        services = json.loads(
            self.run_quiet([str(BIN / "berth"), "--format", "json", "service", "ls"])
        )
        if any(s.get("name") == SERVICE for s in services):
            print(f"(service {SERVICE} is left from an earlier demo)")
            self.berth("service", "rm", SERVICE)

    def replicas(self) -> list[dict]:
        argv = [str(BIN / "berth"), "--format", "json", "service", "ps", SERVICE]
        return list(json.loads(self.run_quiet(argv)))

    def wait_replicas(self, exclude: str, what: str, probe: str = "") -> None:
        """Poll `berth service ps` until every replica runs and none is on `exclude`,
        printing what changes; with `probe`, a thread fetches that page meanwhile, and what
        the fetches found is printed and checked."""
        started = time.monotonic()
        last = ""
        gone_at = 0.0  # when `exclude` first ran no replica
        seen: dict[str, str] = {}  # short id -> "web.2 on node-1", of every replica polled
        fetches: list[tuple[float, str, str]] = []  # (when, page, error)
        stop = threading.Event()
        prober = threading.Thread(target=fetch_until, args=(probe, stop, started, fetches))
        if probe:
            prober.start()
        try:
            while True:
                replicas = self.replicas()
                running = [r for r in replicas if r.get("state") == "running"]
                seen.update((r["id"][:12], f"{r['name']} on {r.get('node_id')}") for r in running)
                line = ", ".join(
                    f"{r['name']} {r.get('state') or 'pending'} on {r.get('node_id') or '-'}"
                    for r in sorted(replicas, key=lambda r: r.get("slot", 0))
                )
                elapsed = time.monotonic() - started
                if not gone_at and all(r.get("node_id") != exclude for r in running):
                    gone_at = elapsed
                if line != last:
                    print(f"  {elapsed:5.1f}s  {line or 'no replicas yet'}", flush=True)
                    last = line
                if len(running) == REPLICAS and all(r.get("node_id") != exclude for r in running):
                    print(f"  {elapsed:5.1f}s  {what}")
                    break
                if elapsed > MOVE_TIMEOUT:
                    raise StepFailed(f"step {self.step}: not {what} after {MOVE_TIMEOUT:.0f}s")
                time.sleep(0.25)
        finally:
            stop.set()
            if probe:
                prober.join()
        if probe:
            self.probed(probe, fetches, seen, exclude, gone_at)

    def probed(
        self, url: str, fetches: list[tuple[float, str, str]], seen: dict, node: str, gone: float
    ) -> None:
        """What the fetches during a wait found: the page answered, from replicas only, and
        what failed failed before the cluster saw `node`'s replica go (at `gone`): until then
        every node's mesh rules still count the dead replica among the backends."""
        answers = [page for _, page, error in fetches if not error]
        failures = [(at, error) for at, _, error in fetches if error]
        ids = page_ids("\n".join(answers))
        if not answers or len(ids) != len(answers) or not set(ids) <= set(seen):
            raise StepFailed(f"step {self.step}: {url} did not answer from the replicas")
        by = ", ".join(f"{seen[i]}: {ids.count(i)}" for i in sorted(set(ids), key=seen.get))
        print(f"  {url} meanwhile: {len(answers)} of {len(fetches)} fetches answered ({by})")
        if failures:
            reasons = "; ".join(sorted({error for _, error in failures}))
            last = failures[-1][0]
            # The rules and `berth service ps` follow the same etcd change, a moment apart.
            if last > gone + 1.0:
                raise StepFailed(f"step {self.step}: {url} failed at {last:.1f}s: {reasons}")
            print(
                f"  {len(failures)} failed ({reasons}), the last at {last:.1f}s: until the"
                f" cluster saw {node}'s replica gone ({gone:.1f}s), the mesh still sent some"
                " connections to it"
            )

    def run_quiet(self, argv: list[str]) -> str:
        """A helper command whose output is data, not part of the show."""
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env, check=False)
        if done.returncode != 0:
            raise StepFailed(
                f"step {self.step} ({shlex.join(argv)}): {(done.stderr or done.stdout).strip()}"
            )
        return done.stdout

    def metrics(self, url: str, *prefixes: str) -> None:
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                text = reply.read().decode()
        except OSError as exc:
            raise StepFailed(f"step {self.step} (GET {url}): {exc}") from exc
        lines = [
            line
            for line in text.splitlines()
            if line.startswith(prefixes)
            and not line.split("{", 1)[0].split(" ", 1)[0].endswith("_created")
            and line.split(" ")[-1] not in ("0.0",)
            and "_bucket{" not in line
        ]
        if not lines:
            raise StepFailed(f"step {self.step} (GET {url}): no {' or '.join(prefixes)} metrics")
        print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--state-dir", type=Path, help="the cluster's state directory (default: berthd's own)"
    )
    parser.add_argument("--base-port", type=int, help="first port of the cluster (berthd up)")
    args = parser.parse_args(argv)
    for tool in ("berth", "berthd"):
        if not (BIN / tool).exists():
            print(f"demo failed: {BIN / tool} is missing (run `make deps`)", file=sys.stderr)
            return 1
    if os.geteuid() != 0:
        print("demo failed: building the image with umoci and chroot needs root", file=sys.stderr)
        return 1
    demo = Demo(args.state_dir, args.base_port)
    try:
        demo.main()
    except StepFailed as exc:
        print(f"\ndemo failed at {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ndemo interrupted at step {demo.step}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
