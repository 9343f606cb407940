"""`berth stack` against the two-host harness of test_networks: a compose file of two services
that talk by service name over the stack's network, a second deploy that touches only the
service that changed, a bad key refused with its path, and `stack rm` taking it all away."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .test_networks import Net, started

pytestmark = pytest.mark.integration

COMPOSE = """
services:
  api:
    image: ${IMAGE}
    command:
      - sh
      - -c
      - mkdir -p /www && cat /run/secrets/token > /www/index.html && httpd -f -p 8000 -h /www
    secrets: [token]
    deploy:
      replicas: 2
  web:
    image: ${IMAGE}
    command: ["sh", "-c", "while true; do wget -q -O /tmp/page http://api:8000/; sleep 0.5; done"]
    environment:
      ROUND: ${ROUND:-1}
    depends_on: [api]
secrets:
  token:
    file: token.txt
"""

PAGE = """
from berth.client.cluster import ClusterContainer
deadline = time.monotonic() + 90
page = None
while time.monotonic() < deadline:
    replicas = [c for c in cluster.service_ps("shop_web") if c.state == "running"]
    if replicas:
        r = cluster.exec(replicas[0].id, ["cat", "/tmp/page"])
        if r.exit_code == 0 and r.stdout:
            page = r.stdout.decode().strip()
            break
    time.sleep(0.5)
services = {s.name: [s.version, s.replicas, s.labels] for s in cluster.services()}
out({"page": page, "services": services})
"""


@pytest.fixture(scope="module")
def stack_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    run_dir = tmp_path_factory.mktemp("stack")
    key = run_dir / "secrets.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    with started(run_dir, cluster_flags=(f"--secrets-key={key}",)) as net:
        yield net


def deploy(net: Net, text: str) -> tuple[int, str, str]:
    path = net.run_dir / "compose.yaml"
    path.write_text(text)
    (net.run_dir / ".env").write_text("IMAGE=test/busybox:1\n")
    (net.run_dir / "token.txt").write_text("hello from api\n")
    result = net.cli("stack", "deploy", "-c", str(path), "shop")
    return result.returncode, result.stdout, result.stderr


def test_a_stack_deploys_talks_by_name_updates_what_changed_and_goes(stack_cluster: Net) -> None:
    try:
        deployed_updated_and_removed(stack_cluster)
    finally:
        stack_cluster.cli("stack", "rm", "shop")  # what a failure left


def deployed_updated_and_removed(net: Net) -> None:
    code, stdout, stderr = deploy(net, COMPOSE)
    assert code == 0, stderr
    assert stdout.splitlines() == [
        "Creating network shop_default",
        "Creating secret shop_token",
        "Creating service shop_api",
        "Creating service shop_web",
    ]
    first = net.client(PAGE)
    assert isinstance(first, dict)
    # web reached api by its service's name in the file, over the stack's network (api serves
    # the stack's secret).
    assert first["page"] == "hello from api"
    assert first["services"]["shop_api"][1] == 2
    assert first["services"]["shop_web"][2]["com.docker.stack.namespace"] == "shop"

    # The same file again: nothing changes; then only web's environment changes.
    code, stdout, stderr = deploy(net, COMPOSE)
    assert (code, stdout) == (0, ""), stderr
    code, stdout, stderr = deploy(net, COMPOSE.replace("${ROUND:-1}", "2"))
    assert code == 0, stderr
    assert [line.split(" (")[0] for line in stdout.splitlines()] == ["Updating service shop_web"]
    second = net.client(PAGE)
    assert isinstance(second, dict)
    assert second["services"]["shop_api"][0] == first["services"]["shop_api"][0]
    assert second["services"]["shop_web"][0] == first["services"]["shop_web"][0] + 1

    listed = net.cli("stack", "ls")
    assert listed.stdout.splitlines() == ["NAME   SERVICES", "shop   2"]
    services = net.cli("stack", "services", "shop").stdout.splitlines()
    assert services[0].split() == ["ID", "NAME", "MODE", "REPLICAS", "IMAGE", "PORTS", "UPDATE"]
    assert sorted(line.split()[1] for line in services[1:]) == ["shop_api", "shop_web"]
    ps = net.cli("stack", "ps", "shop").stdout.splitlines()
    assert sorted(line.split()[1] for line in ps[1:]) == ["shop_api.1", "shop_api.2", "shop_web.1"]

    # A bad key: refused with its path, nothing touched.
    code, stdout, stderr = deploy(net, COMPOSE.replace("replicas: 2", "replcas: 2"))
    assert code == 1
    assert stderr == (
        "Error: services.api.deploy.replcas: Additional property replcas is not allowed\n"
    )

    removed = net.cli("stack", "rm", "shop")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.splitlines() == [
        "Removing service shop_api",
        "Removing service shop_web",
        "Removing secret shop_token",
        "Removing network shop_default",
    ]
    left = net.client(
        "out({'services': [s.name for s in cluster.services()],"
        " 'networks': [n.name for n in networks.list()]})"
    )
    assert isinstance(left, dict)
    assert left["services"] == []
    assert "shop_default" not in left["networks"]
    gone = net.cli("stack", "ps", "shop")
    assert (gone.returncode, gone.stderr) == (1, "Error: nothing found in stack: shop\n")
