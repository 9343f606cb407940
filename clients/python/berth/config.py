"""Where the CLI and clients find a berth cluster: flags, environment, then `berthd up`'s file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from berth.errors import BerthClientError

CLUSTER_FILE = "cluster.json"


def default_state_dir() -> Path:
    """BERTH_STATE_DIR, else $XDG_STATE_HOME/berth, else ~/.local/state/berth."""
    if explicit := os.environ.get("BERTH_STATE_DIR"):
        return Path(explicit).expanduser()
    if xdg := os.environ.get("XDG_STATE_HOME"):
        return Path(xdg).expanduser() / "berth"
    return Path.home() / ".local" / "state" / "berth"


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


def resolve_service_address(service: str, flag: str | None) -> str:
    """The address of a berth service: the flag, else BERTH_<SERVICE>, else the local cluster."""
    if flag:
        return flag
    env_name = f"BERTH_{service.upper()}"
    if from_env := os.environ.get(env_name):
        return from_env
    state_dir = default_state_dir()
    cluster = load_cluster_file(state_dir)
    hint = f"pass --{service} HOST:PORT, set {env_name}, or start a local cluster with `berthd up`"
    if cluster is None:
        raise BerthClientError(
            f"no {service} address: {hint} (no {state_dir / CLUSTER_FILE})", "FAILED_PRECONDITION"
        )
    entry = (cluster.get("services") or {}).get(service) or {}
    address = entry.get("address") if isinstance(entry, dict) else None
    if not address:
        raise BerthClientError(
            f"the cluster in {state_dir / CLUSTER_FILE} runs no {service} service; {hint}",
            "FAILED_PRECONDITION",
        )
    return str(address)
