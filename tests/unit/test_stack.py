"""berth stack: compose files read, interpolated, checked against the Compose spec's schema,
mapped to ServiceSpecs, and the diff that decides which services a second deploy updates."""

from __future__ import annotations

from pathlib import Path

import pytest

from berth.cluster.v1 import cluster_pb2 as pb
from berth.stack import compose
from berth.stack.compose import ComposeError
from berth.stack.deploy import changed
from berth.stack.plan import NAMESPACE_LABEL, creation_order, make_plan

TWO = """
services:
  api:
    image: demo/busybox:1.35
    command: httpd -f -p 8000
    deploy:
      replicas: ${API_REPLICAS:-2}
      resources: {limits: {cpus: "0.5", memory: 64M}, reservations: {memory: 32M}}
      placement: {constraints: ["node.labels.zone == a"]}
      update_config: {parallelism: 2, delay: 2s, monitor: 500ms, order: start-first}
  web:
    image: demo/busybox:1.35
    entrypoint: ["sh", "-c"]
    command: ["wget -O- http://api:8000/"]
    environment: {GREETING: hi, FROM_SHELL: null, COUNT: 3}
    env_file: web.env
    ports: ["8080:80", {target: 53, published: 5353, protocol: udp}]
    depends_on: [api]
    networks:
      front: {aliases: [www]}
    secrets: [token]
    volumes: ["./data:/data:ro", "cache:/cache"]
    deploy:
      restart_policy: {condition: on-failure, max_attempts: 3}
networks:
  front: {}
volumes:
  cache: {}
secrets:
  token: {file: token.txt}
"""


def plan_of(tmp_path: Path, text: str, env: dict[str, str] | None = None):
    (tmp_path / "compose.yaml").write_text(text)
    data = compose.load(tmp_path / "compose.yaml", env or {})
    return make_plan("shop", data, tmp_path, env or {})


def refused(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ComposeError) as caught:
        plan_of(tmp_path, text, env)
    return caught.value.message


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "web.env").write_text("# a comment\nexport FROM_FILE='quoted'\nGREETING=file\n")
    (tmp_path / "token.txt").write_text("s3cret")
    return tmp_path


def test_a_two_service_file_maps_to_specs_named_and_labelled_as_docker_stack(files):
    plan = plan_of(files, TWO, {"FROM_SHELL": "shell"})
    assert [s.name for s in plan.services] == ["shop_api", "shop_web"]
    api, web = plan.services
    assert api.replicas == 2
    assert api.template.command == ["httpd", "-f", "-p", "8000"]
    assert api.template.resources.cpu_millis == 500
    assert api.template.resources.memory_bytes == 64 * 1024**2
    assert api.placement.request.memory_bytes == 32 * 1024**2
    assert api.placement.constraints == ["node.labels.zone==a"]
    assert api.update_config.parallelism == 2
    assert api.update_config.delay.seconds == 2
    assert api.update_config.monitor.nanos == 500_000_000
    assert api.update_config.order == pb.UPDATE_ORDER_START_FIRST
    assert api.labels[NAMESPACE_LABEL] == "shop"
    assert api.template.labels[NAMESPACE_LABEL] == "shop"
    assert api.template.network == "shop_default"
    assert list(api.template.network_aliases) == ["api"]
    # env_file first, environment over it; a value-less key comes from the shell.
    assert sorted(web.template.env) == [
        "COUNT=3",
        "FROM_FILE=quoted",
        "FROM_SHELL=shell",
        "GREETING=hi",
    ]
    assert web.template.entrypoint == ["sh", "-c"]
    assert web.template.network == "shop_front"
    assert list(web.template.network_aliases) == ["web", "www"]
    ports = [(p.published_port, p.target_port, p.protocol) for p in web.endpoint_spec.ports]
    assert ports == [(8080, 80, 1), (5353, 53, 2)]
    mounts = [(m.source, m.target, m.read_only) for m in web.template.mounts]
    assert mounts == [(str(files / "data"), "/data", True), ("shop_cache", "/cache", False)]
    assert [(s.name, s.target) for s in web.template.secrets] == [("shop_token", "token")]
    assert web.template.restart_policy.max_retries == 3
    assert [(n.name, n.labels[NAMESPACE_LABEL]) for n in plan.networks] == [
        ("shop_default", "shop"),
        ("shop_front", "shop"),
    ]
    assert [(s.name, s.data) for s in plan.secrets] == [("shop_token", b"s3cret")]


def test_a_bad_key_is_reported_with_its_path(tmp_path):
    text = "services:\n  web:\n    image: x\n    deploy:\n      replcas: 2\n"
    assert refused(tmp_path, text) == (
        "services.web.deploy.replcas: Additional property replcas is not allowed"
    )


def test_every_schema_error_is_reported_on_one_line(tmp_path):
    text = "services:\n  web:\n    image: x\n    imgae: y\n    ports: {a: 1}\nfoo: 1\n"
    message = refused(tmp_path, text)
    assert "foo: Additional property foo is not allowed" in message
    assert "services.web.imgae: Additional property imgae is not allowed" in message
    assert "services.web.ports: {'a': 1} is not of type 'array'" in message
    assert "\n" not in message


def test_interpolation_from_the_environment_over_the_dot_env_file(tmp_path):
    (tmp_path / ".env").write_text("TAG=1.0\nREPO=demo/app\n")
    env = compose.environment_of(tmp_path, {"TAG": "2.0"})
    data = compose.parse(
        "services:\n  web:\n    image: ${REPO}:${TAG}\n    command: echo $$HOME ${X:-none}\n",
        env,
    )
    assert data["services"]["web"]["image"] == "demo/app:2.0"
    assert data["services"]["web"]["command"] == "echo $HOME none"


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A:-d}", {"A": ""}, "d"),
        ("${A-d}", {"A": ""}, ""),
        ("${A:+alt}", {"A": "x"}, "alt"),
        ("${A+alt}", {}, ""),
        ("$A/${B}", {"A": "1", "B": "2"}, "1/2"),
    ],
)
def test_interpolation_forms(text, env, expected):
    assert compose.interpolate(text, env) == expected


def test_a_required_variable_and_a_bad_format_name_the_key(tmp_path):
    message = refused(tmp_path, "services:\n  web:\n    image: ${IMG:?set IMG}\n")
    assert message == "services.web.image: required variable IMG: set IMG"
    message = refused(tmp_path, "services:\n  web:\n    image: a$\n")
    assert message.startswith("services.web.image: invalid interpolation format")


@pytest.mark.parametrize(
    ("service", "expected"),
    [
        ("build: .", "services.web.build: building is not supported"),
        ("healthcheck: {test: [CMD]}", "services.web.healthcheck: health check command is empty"),
        ("healthcheck: {test: [RUN, x]}", 'services.web.healthcheck: health check test "RUN"'),
        ("healthcheck: {interval: 5s}", "services.web.healthcheck.test: a health check needs"),
        ("privileged: true", "services.web.privileged: not supported by berth stack deploy"),
        ("deploy: {mode: global}", "services.web.deploy.mode: berth services are replicated"),
        ("deploy: {update_config: {failure_action: rollback}}", "failure_action: berth supports"),
        ("deploy: {restart_policy: {delay: 5s}}", "restart_policy.delay: not supported"),
        ("volumes: [/data]", "services.web.volumes.0: anonymous volumes are not supported"),
        ("volumes: [{type: tmpfs, target: /t}]", "volumes.0: type tmpfs is not supported"),
        ("volumes: ['v:/v']", "volumes.0: volume 'v' is not declared in volumes:"),
        ("ports: ['127.0.0.1:80:80']", "services.web.ports.0: invalid publish value"),
        ("networks: [a, b]", "services.web.networks: a berth service joins one network"),
        ("networks: [nope]", "services.web.networks.nope: network is not declared"),
        ("secrets: [nope]", "services.web.secrets.0: secret 'nope' is not declared"),
        ("depends_on: [ghost]", "services.web.depends_on: service 'ghost' is not defined"),
        ("deploy: {resources: {limits: {memory: 1k}}}", "services.web: memory limit"),
    ],
)
def test_what_berth_cannot_do_is_refused_with_its_path(tmp_path, service, expected):
    message = refused(tmp_path, f"services:\n  web:\n    image: x\n    {service}\n")
    assert message.startswith(expected) or expected in message, message


def test_a_disabled_healthcheck_is_accepted_and_rollback_config_is_reported(tmp_path):
    plan = plan_of(
        tmp_path,
        "services:\n  web:\n    image: x\n    healthcheck: {disable: true}\n"
        "    deploy: {rollback_config: {parallelism: 1}}\n",
    )
    assert plan.warnings == [
        "services.web.deploy.rollback_config: not applied yet (berth has no service rollback)"
    ]


def test_a_healthcheck_maps_to_dockers_health_config(tmp_path):
    plan = plan_of(
        tmp_path,
        "services:\n  web:\n    image: x\n    healthcheck:\n      test: wget -q -O- localhost\n"
        "      interval: 1m30s\n      timeout: 500ms\n      start_period: 10s\n      retries: 5\n"
        "  api:\n    image: x\n    healthcheck: {test: [CMD, /bin/check, --deep]}\n",
    )
    specs = {spec.name: spec for spec in plan.services}
    web = specs["shop_web"].template.health_check
    assert list(web.test) == ["CMD-SHELL", "wget -q -O- localhost"]
    assert (web.interval.seconds, web.timeout.ToMilliseconds(), web.start_period.seconds) == (
        90,
        500,
        10,
    )
    assert web.retries == 5
    assert list(specs["shop_api"].template.health_check.test) == ["CMD", "/bin/check", "--deep"]


def test_depends_on_orders_creation_and_a_cycle_is_refused():
    services = {"a": {"depends_on": ["b"]}, "b": {"depends_on": {"c": {}}}, "c": {}}
    assert creation_order(services) == ["c", "b", "a"]
    services["c"] = {"depends_on": ["a"]}
    with pytest.raises(ComposeError, match="cycle: a -> b -> c -> a"):
        creation_order(services)


def test_the_diff_sees_only_real_changes(files):
    plan = plan_of(files, TWO, {"FROM_SHELL": "shell"})
    api, web = plan.services
    stored = pb.ServiceSpec()
    stored.CopyFrom(web)
    assert not changed(web, stored)
    # A port the cluster chose (published 0 asked) is no change.
    asked = pb.ServiceSpec()
    asked.CopyFrom(api)
    asked.endpoint_spec.ports.add(target_port=9000, protocol=1)
    current = pb.ServiceSpec()
    current.CopyFrom(api)
    current.endpoint_spec.ports.add(published_port=30001, target_port=9000, protocol=1)
    assert not changed(asked, current)
    again = plan_of(files, TWO.replace("wget -O-", "wget -q -O-"), {"FROM_SHELL": "shell"})
    assert changed(again.services[1], web)
    assert not changed(again.services[0], api)
    more = plan_of(files, TWO, {"FROM_SHELL": "shell", "API_REPLICAS": "3"})
    assert changed(more.services[0], api)


def test_the_cluster_s_defaults_are_no_change(tmp_path):
    plan = plan_of(tmp_path, "services:\n  web:\n    image: x\n")
    [web] = plan.services
    # As the cluster stores it: restart "always" for "no", parallelism 1, delay 0, monitor 5 s.
    stored = pb.ServiceSpec()
    stored.CopyFrom(web)
    stored.template.restart_policy.name = 3
    stored.update_config.parallelism = 1
    stored.update_config.delay.FromSeconds(0)
    stored.update_config.monitor.FromSeconds(5)
    assert not changed(web, stored)
    stored.update_config.monitor.FromSeconds(6)
    assert changed(web, stored)


def test_restart_condition_none_is_refused(tmp_path):
    text = "services:\n  web:\n    image: x\n    deploy: {restart_policy: {condition: none}}\n"
    assert refused(tmp_path, text) == (
        "services.web.deploy.restart_policy.condition: use on-failure or any"
    )
