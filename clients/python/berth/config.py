"""Where the CLI and clients find a berth cluster: flags, environment, then `berthd up`'s file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, NamedTuple

from berth.errors import BerthClientError

CLUSTER_FILE = "cluster.json"


def default_state_dir() -> Path:
    """BERTH_STATE_DIR, else $XDG_STATE_HOME/berth, else ~/.local/state/berth."""
    if explicit := os.environ.get("BERTH_STATE_DIR"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_STATE_HOME"):
        return Path(xdg).expanduser() / "berth"
    return Path.home() / ".local" / "state" / "berth"


def auth_file() -> Path:
    """Where `berth login` keeps credentials: $BERTH_AUTH_FILE, else
    $XDG_CONFIG_HOME/berth/auth.json, else ~/.config/berth/auth.json."""
    if explicit := os.environ.get("BERTH_AUTH_FILE"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_CONFIG_HOME"):
        return Path(xdg).expanduser() / "berth" / "auth.json"
    return Path.home() / ".config" / "berth" / "auth.json"


def cluster_token() -> str | None:
    """The token berth calls carry: $BERTH_TOKEN (set but empty: no token), else the one
    `berth login --token` stored; None: the client certificate (or nothing) speaks for the
    caller."""
    from_env = os.environ.get("BERTH_TOKEN")
    if from_env is not None:
        return from_env.strip() or None
    try:
        data = json.loads(auth_file().read_text())
    except (OSError, ValueError):
        return None
    entry = data.get("berth") if isinstance(data, dict) else None
    token = entry.get("token") if isinstance(entry, dict) else None
    return str(token) if token else None


def load_cluster_file(state_dir: Path) -> dict[str, Any] | None:
    """The cluster description `berthd up` wrote into state_dir, or None when there is none.

    Format: {"etcd": {"endpoint": ...}, "prefix": "/berth/",
             "services": {"registry": {"address": ..., "metrics": ..., "pid": ...}}}
    """
    path = Path(state_dir) / CLUSTER_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BerthClientError(f"cannot read {path}: {exc}", "FAILED_PRECONDITION") from exc
    if not isinstance(data, dict):
        raise BerthClientError(f"{path} is not a JSON object", "FAILED_PRECONDITION")
    return data


class Target(NamedTuple):  # not a dataclass: `berth --help` imports this module, not dataclasses
    """Where container commands go: the cluster service, or one node agent directly."""

    kind: Literal["cluster", "node"]
    address: str


TARGET_RULE = (
    "Container commands (run, ps, logs, exec, stop, start, rm, inspect, wait, stats, ...) go "
    "to the cluster at --host, else to the node agent at --node (single-host mode), else "
    "$BERTH_HOST, else $BERTH_NODE, else the cluster `berthd up` started on this machine."
)


CLUSTER_HINT = "pass --host HOST:PORT, set BERTH_HOST, or start a local cluster with `berthd up`"


def resolve_target(host: str | None, node: str | None) -> Target:
    """TARGET_RULE: an explicit flag beats the environment, and a node agent is only ever used
    when asked for by name, so the default is always the cluster."""
    if host and node:
        raise BerthClientError(
            "--host and --node are exclusive: the cluster or one node agent", "INVALID_ARGUMENT"
        )
    if host:
        return Target("cluster", host)
    if node:
        return Target("node", node)
    if os.environ.get("BERTH_NODE") and not os.environ.get("BERTH_HOST"):
        return Target("node", os.environ["BERTH_NODE"])
    hint = (
        "pass --host HOST:PORT or set BERTH_HOST, start a local cluster with `berthd up`, "
        "or use one node agent with --node HOST:PORT or BERTH_NODE"
    )
    return Target("cluster", resolve_cluster_address(None, hint))


def resolve_cluster_address(host: str | None, hint: str = "") -> str:
    """The cluster's address for commands only it answers (node, service, events): --host,
    else BERTH_HOST, else the local cluster; BERTH_NODE plays no part."""
    if host:
        return host
    if from_env := os.environ.get("BERTH_HOST"):
        return from_env
    return _cluster_file_address("cluster", hint or CLUSTER_HINT)


def resolve_service_address(service: str, flag: str | None, option: str = "") -> str:
    """The address of a berth service: the flag, else BERTH_<SERVICE>, else the local cluster.
    `option` is the flag's name when it is not --SERVICE (the image service's --image-service)."""
    if flag:
        return flag
    env_name = f"BERTH_{service.upper()}"
    if from_env := os.environ.get(env_name):
        return from_env
    hint = (
        f"pass {option or f'--{service}'} HOST:PORT, set {env_name}, "
        "or start a local cluster with `berthd up`"
    )
    return _cluster_file_address(service, hint)


IMAGE_RULE = (
    "Image commands go to the image service at --image-service, else $BERTH_IMAGE, else the "
    "`berthd up` cluster's. `images`, `rmi` and `pull` of a name without a registry host act on "
    "one node agent's own image cache instead with --node, or with $BERTH_NODE when no image "
    "service is named."
)


def image_cache_node(image_service: str | None, node: str | None) -> str | None:
    """IMAGE_RULE: the node agent whose own image cache a command acts on, or None for the
    image service. As in TARGET_RULE, a flag beats the environment, and BERTH_NODE is single-host
    mode only while BERTH_IMAGE does not name an image service."""
    if image_service and node:
        raise BerthClientError(
            "--image-service and --node are exclusive: the cluster's image catalog or one "
            "node's image cache",
            "INVALID_ARGUMENT",
        )
    if node or image_service:
        return node
    if os.environ.get("BERTH_NODE") and not os.environ.get("BERTH_IMAGE"):
        return os.environ["BERTH_NODE"]
    return None


def _cluster_file_address(service: str, hint: str) -> str:
    """The address `berthd up` recorded for service, or an error that ends with hint."""
    state_dir = default_state_dir()
    cluster = load_cluster_file(state_dir)
    if cluster is None:
        raise BerthClientError(
            f"no {service} address: {hint} (no {state_dir / CLUSTER_FILE})", "FAILED_PRECONDITION"
        )
    entry = (cluster.get("services") or {}).get(service) or {}
    if not isinstance(entry, dict):
        entry = {}
    # A token caller uses the public port (no client certificate needed there).
    address = (cluster_token() and entry.get("public_address")) or entry.get("address")
    if not address:
        raise BerthClientError(
            f"the cluster in {state_dir / CLUSTER_FILE} runs no {service} service; {hint}",
            "FAILED_PRECONDITION",
        )
    return str(address)


# Help of the global address options, shared by the top-level parser and the subcommands that
# repeat them.
HOST_HELP = "cluster address HOST:PORT (default: $BERTH_HOST, else the `berthd up` cluster)"
IMAGE_SERVICE_HELP = (
    "image service address HOST:PORT (default: $BERTH_IMAGE, else the `berthd up` cluster)"
)
BUILDER_HELP = "builder address HOST:PORT (default: $BERTH_BUILDER, else the `berthd up` cluster)"
