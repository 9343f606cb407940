"""`berth run`, `ps`, `logs`, `exec`, `start`, `stop`, `kill`, `rm`, `inspect`, `wait`, `stats`,
`diff`: containers, with Docker's options and output.

The commands go to the cluster service (which places containers and routes logs, exec and stats
to their nodes) or, in single-host mode, straight to one node agent: config.TARGET_RULE. Both
clients answer the same calls, so each command is written once; `run` differs (the cluster has
no client-side pull, and places), and `kill` and `diff`, which only a node answers, are sent to
the container's node.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from berth.cli.interactive import check_tty, detach_keys_option, run_session, terminal_size
from berth.cli.output import (
    err_console,
    for_each,
    format_options,
    format_time,
    host_options,
    human_ago,
    inspect_each,
    jsonable,
    parse_label,
    print_error,
    print_json,
    print_line,
    print_table,
)
from berth.client.cluster import ClusterClient, ClusterContainer, Placement
from berth.client.containers import ContainerInfo
from berth.config import resolve_target
from berth.enums.containers import CONTAINER_STATES
from berth.error_details import ErrorDetails
from berth.errors import BerthClientError
from berth.ports import PortBinding, format_ps

# berth.containers is imported by what parses or builds a container's configuration (run,
# create, service create): ps, stats, logs and the like need none of it.
if TYPE_CHECKING:
    from berth.client.node import NodeClient
    from berth.containers import ContainerConfig, SecretReference

    Client = NodeClient | ClusterClient


def __getattr__(name: str) -> Any:
    """NodeClient on first use: only single-host mode and a few commands talk to a node, and
    the others should not pay for importing its stubs (start-up time of every command)."""
    if name == "NodeClient":
        from berth.client.node import NodeClient

        globals()["NodeClient"] = NodeClient  # tests replace it here
        return NodeClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _node_client(address: str) -> NodeClient:
    return (globals().get("NodeClient") or __getattr__("NodeClient"))(address)


# Docker's RAMInBytes: 64m, 64M, 64mb, 64MiB and 1.5g all mean binary units.
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?) ?([kmgtp]?)i?b?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}
FILTER_KEYS = ("label", "name", "status")
STATES = CONTAINER_STATES.names
COMMAND_WIDTH = 20  # what `docker ps` keeps of COMMAND without --no-trunc
SHORT_ID = 12
ZERO_TIME = "0001-01-01T00:00:00Z"  # Docker's inspect for a time that never happened
# How long an attached `run` waits for the cluster's node to pull and create the container.
NODE_START_TIMEOUT = 300.0
NODE_START_NOTICE = 2.0  # after this, say on stderr what we are waiting for
_CONSTRAINT_RE = re.compile(r"\s*([A-Za-z0-9_.\-/]+)\s*(==|!=)\s*(\S.*?)\s*")
TARGET_NODE_HELP = "talk to this node agent HOST:PORT directly instead of the cluster"


# --- argument types ---------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """Bytes in Docker's notation: 512, 512b, 100k, 64m, 1.5g."""
    match = _SIZE_RE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(
            f'invalid size "{text}": use a number with an optional unit b, k, m, g (e.g. 64m)'
        )
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[unit.lower()])


def parse_cpus(text: str) -> int:
    """--cpus as millicpus: 0.5 is 500; 0 means no limit."""
    try:
        cpus = float(text)
    except ValueError:
        cpus = math.nan
    if not math.isfinite(cpus) or cpus < 0:
        raise argparse.ArgumentTypeError(f'invalid number of CPUs "{text}": e.g. 0.5 or 2')
    millis = round(cpus * 1000)
    if cpus > 0 and millis == 0:
        # Rounding to 0 would silently mean "no limit".
        raise argparse.ArgumentTypeError(f"--cpus {text} is below the smallest quota, 0.001")
    return millis


def parse_restart(text: str) -> tuple[str, int]:
    """Docker's --restart: no, always, on-failure or on-failure:N, as (policy, max retries)."""
    from berth.containers import RESTART_POLICIES

    name, sep, count = text.partition(":")
    if name not in RESTART_POLICIES:
        raise argparse.ArgumentTypeError(
            f'invalid restart policy "{text}": use no, on-failure[:N] or always'
        )
    if not sep:
        return name, 0
    if name != "on-failure":
        raise argparse.ArgumentTypeError(
            f'restart policy "{name}" takes no retry count; only on-failure:N does'
        )
    if not count.isdigit():
        raise argparse.ArgumentTypeError(
            f'invalid restart retry count "{count}": expected a number, e.g. on-failure:3'
        )
    return name, int(count)


def parse_volume(text: str) -> tuple[str, str, bool]:
    """-v SRC:DST[:ro|rw] as (source, target, read_only). SRC is a host path or a volume name;
    a relative path (./data) is made absolute, as the Docker CLI does."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise argparse.ArgumentTypeError(f'invalid volume "{text}": expected SRC:DST[:ro]')
    source, target, mode = parts[0], parts[1], parts[2] if len(parts) == 3 else "rw"
    if mode not in ("ro", "rw"):
        raise argparse.ArgumentTypeError(f'invalid mode "{mode}" in volume "{text}": use ro or rw')
    if not target.startswith("/"):
        raise argparse.ArgumentTypeError(
            f'invalid volume "{text}": the container path must be absolute'
        )
    if source.startswith("."):
        source = os.path.abspath(source)
    elif "/" in source and not source.startswith("/"):
        raise argparse.ArgumentTypeError(
            f'invalid volume "{text}": a host path must be absolute or start with ./'
        )
    return source, target, mode == "ro"


def parse_env(text: str) -> str | None:
    """-e KEY=VALUE, or -e KEY to pass this shell's value (None: unset here, so dropped)."""
    key, sep, _ = text.partition("=")
    if not key or any(c.isspace() for c in key):
        raise argparse.ArgumentTypeError(f'invalid environment variable "{text}": use KEY=VALUE')
    if sep:
        return text
    return f"{key}={os.environ[key]}" if key in os.environ else None


def read_env_file(path: str) -> list[str]:
    """--env-file as Docker reads it: KEY=VALUE or KEY lines, # comments; values are verbatim
    (quotes included)."""
    entries = []
    for line in Path(path).read_text().splitlines():
        line = line.lstrip()
        if not line or line.startswith("#"):
            continue
        try:
            entry = parse_env(line)
        except argparse.ArgumentTypeError as err:
            raise BerthClientError(f"{path}: {err}", "INVALID_ARGUMENT") from None
        if entry is not None:
            entries.append(entry)
    return entries


def parse_constraint(text: str) -> str:
    """--constraint KEY==VALUE or KEY!=VALUE (node.id, node.labels.KEY or a label key)."""
    match = _CONSTRAINT_RE.fullmatch(text)
    if not match:
        raise argparse.ArgumentTypeError(
            f'invalid constraint "{text}": use KEY==VALUE or KEY!=VALUE, e.g. zone==a'
        )
    return "".join(match.groups())


def parse_filter(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or key not in FILTER_KEYS or not value:
        raise argparse.ArgumentTypeError(
            f'invalid filter "{text}": use label=KEY[=VALUE], name=NAME or status=STATE'
        )
    if key == "status" and value not in STATES:
        raise argparse.ArgumentTypeError(
            f'invalid status "{value}": use one of {", ".join(STATES)}'
        )
    return key, value


def parse_tail(text: str) -> int | None:
    """--tail N, or "all" (None)."""
    if text == "all":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f'invalid --tail "{text}": use a number or "all"')
    return int(text)


def security_opt(text: str) -> str:
    """--security-opt, as the Docker CLI sends it: seccomp=FILE becomes seccomp=<the file's
    JSON> (the node cannot read the client's files); other values go as they are, for the
    model to check."""
    key, sep, value = text.partition("=")
    if key != "seccomp" or not sep or value == "unconfined" or value.lstrip().startswith("{"):
        return text
    try:
        profile = json.loads(Path(value).read_text())
    except OSError as e:
        raise argparse.ArgumentTypeError(
            f'cannot read seccomp profile "{value}": {e.strerror or e}'
        ) from None
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f'seccomp profile "{value}" is not valid JSON: {e}'
        ) from None
    return "seccomp=" + json.dumps(profile, separators=(",", ":"))


def parse_secret(text: str) -> SecretReference:
    """--secret NAME, or Docker's long form source=NAME,target=FILE,mode=0400,uid=0,gid=0
    (mode in octal); the model checks the values."""
    from berth.containers import SecretReference

    if "=" not in text:
        return SecretReference(text)
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        key = {"src": "source"}.get(key.strip(), key.strip())
        if not sep or key not in ("source", "target", "mode", "uid", "gid"):
            raise argparse.ArgumentTypeError(
                f'invalid --secret "{text}": expected NAME or '
                "source=NAME[,target=FILE][,mode=0400][,uid=N][,gid=N]"
            )
        fields[key] = value.strip()
    if not fields.get("source"):
        raise argparse.ArgumentTypeError(f'invalid --secret "{text}": source=NAME is required')
    numbers: dict[str, int] = {}
    for key, base in (("mode", 8), ("uid", 10), ("gid", 10)):
        if key in fields:
            try:
                numbers[key] = int(fields[key].removeprefix("0o"), base)
            except ValueError:
                kind = "an octal mode such as 0400" if base == 8 else "a number"
                raise argparse.ArgumentTypeError(
                    f'invalid --secret "{text}": {key} must be {kind}'
                ) from None
    return SecretReference(fields["source"], fields.get("target", ""), **numbers)


def absolute_path(text: str) -> str:
    if not text.startswith("/"):
        raise argparse.ArgumentTypeError(f'the working directory "{text}" must be absolute')
    return text


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f'expected a number of 0 or more, got "{text}"')
    return int(text)


def publish_option(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type of a port option, with Docker's message for a bad value."""
    from berth.ports import InvalidPort

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except InvalidPort as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    return convert


def default_network(args: argparse.Namespace, publishes: bool) -> str:
    """--network as given; without it, `berth` when ports are published (Docker puts a `run
    -p` on its default bridge), else none. Ports with none or host are dropped with Docker's
    warning."""
    if args.network is None:
        return "berth" if publishes else "none"
    if publishes and args.network in ("none", "host"):
        err_console().print(
            f"WARNING: Published ports are discarded when using {args.network} network mode",
            markup=False,
        )
        args.publish = []
    return args.network


def run_config(args: argparse.Namespace) -> ContainerConfig:
    """The container of a parsed `berth run`, validated."""
    if args.rm and args.restart[0] != "no":
        raise BerthClientError("conflicting options: --restart and --rm", "INVALID_ARGUMENT")
    if args.rm and args.detach:
        # The node has no auto-remove: only an attached client can remove after the exit.
        raise BerthClientError("--rm needs an attached run: drop -d", "INVALID_ARGUMENT")
    config = container_config(args, name=args.name or "")
    config.ports = [b for group in args.publish for b in group]
    config.validate()
    config.tty = args.tty
    config.stdin_open = args.interactive
    return config


def container_config(args: argparse.Namespace, name: str = "") -> ContainerConfig:
    """The container of a parsed `berth run`, or the template of a `berth service create`
    (no name: the cluster names each replica SERVICE.SLOT), validated: a mistake the node or
    the cluster would refuse fails here, with their words, before any call (and any pull)."""
    from berth.cli.health_opts import health_check
    from berth.containers import ContainerConfig, MountSpec

    restart, retries = args.restart
    # Files first, so -e overrides them (as in Docker).
    env = [entry for path in args.env_file for entry in read_env_file(path)]
    config = ContainerConfig(
        image=args.image,
        name=name,
        entrypoint=[args.entrypoint] if args.entrypoint else [],
        command=args.command,
        env=[*env, *(entry for entry in args.env if entry is not None)],
        working_dir=args.workdir or "",
        user=args.user or "",
        hostname=args.hostname or "",
        labels=dict(args.label),
        mounts=[MountSpec(*volume) for volume in args.volume],
        read_only_rootfs=args.read_only,
        memory_bytes=args.memory,
        cpu_millis=args.cpus,
        cpu_shares=args.cpu_shares,
        pids_limit=args.pids_limit,
        restart_policy=restart,
        restart_max_retries=retries,
        network_mode=default_network(args, bool(getattr(args, "publish", None))),
        network_aliases=args.network_alias,
        cap_add=args.cap_add,
        cap_drop=args.cap_drop,
        security_opt=args.security_opt,
        userns=args.userns,
        secrets=args.secret,
        health_check=health_check(args),
    )
    config.validate()
    return config


def placement_options(args: argparse.Namespace) -> Placement | None:
    """Where the cluster may put the container; None when no placement flag was given."""
    if not (args.constraint or args.reserve_memory or args.reserve_cpus):
        return None
    return Placement(args.constraint, args.reserve_cpus, args.reserve_memory)


# --- parsers ----------------------------------------------------------------------------------


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the container commands on the top-level subcommands."""
    node = [target_options()]
    data = [target_options(), format_options()]

    run = commands.add_parser("run", parents=node, help="create and start a container")
    _add_run_options(run)
    run.set_defaults(func=cmd_run)

    ps = commands.add_parser("ps", parents=data, help="list containers")
    ps.add_argument("-a", "--all", action="store_true", help="include stopped containers")
    ps.add_argument("-q", "--quiet", action="store_true", help="only print container ids")
    ps.add_argument(
        "-f",
        "--filter",
        action="append",
        type=parse_filter,
        default=[],
        metavar="KEY=VALUE",
        help="label=KEY[=VALUE], name=NAME or status=STATE (repeatable)",
    )
    ps.add_argument("--no-trunc", action="store_true", help="full ids and commands")
    ps.set_defaults(func=cmd_ps)

    logs = commands.add_parser("logs", parents=node, help="print a container's output")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    logs.add_argument(
        "-n", "--tail", type=parse_tail, default=None, metavar="N", help="only the last N lines"
    )
    logs.add_argument("-t", "--timestamps", action="store_true", help="prefix each line's time")
    logs.add_argument("container", metavar="CONTAINER")
    logs.set_defaults(func=cmd_logs)

    exec_ = commands.add_parser("exec", parents=node, help="run a command in a running container")
    exec_.add_argument("-i", "--interactive", action="store_true", help="send stdin to it")
    _add_terminal_options(exec_)
    exec_.add_argument("-u", "--user", help="uid[:gid] or user name (default: the container's)")
    exec_.add_argument(
        "-w", "--workdir", type=absolute_path, metavar="DIR", help="working directory"
    )
    _add_env_option(exec_)
    exec_.add_argument("container", metavar="CONTAINER")
    exec_.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")
    exec_.set_defaults(func=cmd_exec)

    start = commands.add_parser("start", parents=node, help="start containers")
    _add_containers(start)
    start.set_defaults(func=cmd_start)

    stop = commands.add_parser("stop", parents=node, help="stop containers (SIGTERM, then KILL)")
    stop.add_argument(
        "-t",
        "--time",
        "--timeout",
        dest="timeout",
        type=non_negative_int,
        default=None,
        metavar="N",
        help="seconds to wait before killing (default 10)",
    )
    _add_containers(stop)
    stop.set_defaults(func=cmd_stop)

    kill = commands.add_parser("kill", parents=node, help="send a signal to containers")
    kill.add_argument("-s", "--signal", default="KILL", help="signal name or number (KILL)")
    _add_containers(kill)
    kill.set_defaults(func=cmd_kill)

    rm = commands.add_parser("rm", parents=node, help="remove containers")
    rm.add_argument("-f", "--force", action="store_true", help="kill a running container first")
    _add_containers(rm)
    rm.set_defaults(func=cmd_rm)

    inspect = commands.add_parser("inspect", parents=data, help="containers as JSON")
    _add_containers(inspect)
    inspect.set_defaults(func=cmd_inspect)

    port = commands.add_parser("port", parents=data, help="a container's published ports")
    port.add_argument("container", metavar="CONTAINER", help="id, id prefix or name")
    port.add_argument("private", nargs="?", metavar="PRIVATE_PORT[/PROTO]", help="one port")
    port.set_defaults(func=cmd_port)

    wait = commands.add_parser("wait", parents=node, help="wait for containers to exit")
    _add_containers(wait)
    wait.set_defaults(func=cmd_wait)

    stats = commands.add_parser("stats", parents=data, help="CPU, memory and pids of containers")
    stats.add_argument("--no-stream", action="store_true", help="print one sample, then exit")
    stats.add_argument(
        "containers", nargs="*", metavar="CONTAINER", help="(default: every running container)"
    )
    stats.set_defaults(func=cmd_stats)

    diff = commands.add_parser("diff", parents=node, help="paths a container changed")
    diff.add_argument("container", metavar="CONTAINER")
    diff.set_defaults(func=cmd_diff)

    attach = commands.add_parser(
        "attach", parents=node, help="connect to a running container's main process"
    )
    attach.add_argument("--no-stdin", action="store_true", help="do not send our stdin to it")
    attach.add_argument(
        "--detach-keys",
        type=detach_keys_option,
        default="",
        metavar="KEYS",
        help="keys that detach and leave it running (default ctrl-p,ctrl-q)",
    )
    attach.add_argument("container", metavar="CONTAINER")
    attach.set_defaults(func=cmd_attach)


def target_options() -> argparse.ArgumentParser:
    """--host or --node on a container command (config.TARGET_RULE)."""
    parent = argparse.ArgumentParser(add_help=False, parents=[host_options()])
    parent.add_argument("--node", metavar="ADDR", default=argparse.SUPPRESS, help=TARGET_NODE_HELP)
    return parent


def _add_containers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("containers", nargs="+", metavar="CONTAINER", help="id, id prefix or name")


def _add_env_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-e",
        "--env",
        action="append",
        type=parse_env,
        default=[],
        metavar="KEY[=VALUE]",
        help="set an environment variable; KEY alone passes this shell's value (repeatable)",
    )


def _add_run_options(run: argparse.ArgumentParser) -> None:
    add = run.add_argument
    add("-d", "--detach", action="store_true", help="run in the background and print the id")
    add("--rm", action="store_true", help="remove the container when it exits")
    add("--name", help="container name (default: generated)")
    add("-i", "--interactive", action="store_true", help="keep stdin open and send ours to it")
    from berth.ports import parse_publish

    add(
        "-p",
        "--publish",
        action="append",
        type=publish_option(parse_publish),
        default=[],
        metavar="[IP:][HOST_PORT:]PORT[/PROTO]",
        help="publish a container's port on its node (repeatable; implies --network berth)",
    )
    _add_terminal_options(run)
    add_spec_options(run)
    add_image_arguments(run)


def add_spec_options(parser: argparse.ArgumentParser) -> None:
    """What a container runs with and where it may run: `run` and `service create` share them."""
    if not isinstance(parser, argparse.ArgumentParser):
        return  # a command main skips (another was asked for): no need for berth.containers
    from berth.cli.health_opts import add_health_options
    from berth.containers import NETWORK_MODES, USERNS_MODES

    add = parser.add_argument
    _add_env_option(parser)
    add_health_options(parser)
    add("--env-file", action="append", default=[], metavar="FILE", help="KEY=VALUE lines")
    add("-m", "--memory", type=parse_size, default=0, help="memory limit, e.g. 64m")
    add("--cpus", type=parse_cpus, default=0, help="CPU quota, e.g. 0.5")
    add("--cpu-shares", type=non_negative_int, default=0, metavar="N", help="relative CPU weight")
    add("--pids-limit", type=non_negative_int, default=0, metavar="N", help="most processes")
    add(
        "--restart",
        type=parse_restart,
        default=("no", 0),
        metavar="POLICY",
        help="no (default), on-failure[:N] or always",
    )
    add(
        "-v",
        "--volume",
        action="append",
        type=parse_volume,
        default=[],
        metavar="SRC:DST[:ro]",
        help="bind mount a host path or a named volume (repeatable)",
    )
    add("-w", "--workdir", type=absolute_path, metavar="DIR", help="working directory")
    add("-u", "--user", help="uid[:gid] or user name")
    add("--hostname", help="host name (default: the short id)")
    add("--read-only", action="store_true", help="mount the root filesystem read-only")
    add(
        "--network",
        metavar="NETWORK",
        help=f"{' or '.join(NETWORK_MODES)}, or a network's name (berth network ls) (none; "
        "berth with published ports)",
    )
    add(
        "--network-alias",
        action="append",
        default=[],
        metavar="ALIAS",
        help="another name the container answers to on its network (repeatable)",
    )
    add(
        "-l",
        "--label",
        action="append",
        type=parse_label,
        default=[],
        metavar="KEY=VALUE",
        help="set a label (repeatable)",
    )
    add("--entrypoint", metavar="CMD", help="replace the image's entrypoint")
    add(
        "--cap-add",
        action="append",
        default=[],
        metavar="CAP",
        help="add a capability to Docker's default set, e.g. NET_ADMIN, or ALL (repeatable)",
    )
    add(
        "--cap-drop",
        action="append",
        default=[],
        metavar="CAP",
        help="drop a capability from the default set, or ALL (repeatable)",
    )
    add(
        "--security-opt",
        action="append",
        type=security_opt,
        default=[],
        metavar="OPT",
        help="seccomp=unconfined, seccomp=PROFILE.json, no-new-privileges[=true|false] "
        "(repeatable)",
    )
    add(
        "--userns",
        choices=[m for m in USERNS_MODES if m],
        default="",
        help="user namespace: host (the default: root in the container is the host's root) "
        "or remap (root in the container is an unprivileged host uid, 100000 by default)",
    )
    add(
        "--secret",
        action="append",
        type=parse_secret,
        default=[],
        metavar="SECRET",
        help="give the container a cluster secret at /run/secrets/: NAME, or "
        "source=NAME,target=FILE,mode=0400,uid=N,gid=N (cluster; repeatable)",
    )
    add(
        "--constraint",
        action="append",
        type=parse_constraint,
        default=[],
        metavar="KEY==VALUE",
        help="only nodes where this holds: zone==a, disk!=hdd, node.id==n1 (cluster; repeatable)",
    )
    add(
        "--reserve-memory",
        type=parse_size,
        default=0,
        metavar="SIZE",
        help="memory reserved on the node (cluster; default: the -m limit)",
    )
    add(
        "--reserve-cpus",
        type=parse_cpus,
        default=0,
        metavar="N",
        help="CPUs reserved on the node (cluster; default: the --cpus limit)",
    )


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")


# --- commands ---------------------------------------------------------------------------------


# Docker's exit code when `run` itself fails: the container could not be created or started
# (an image with no command, a refused spec, a node that cannot pull).
CANNOT_RUN = 125


def cmd_run(args: argparse.Namespace) -> int:
    config = run_config(args)
    if not args.detach:
        check_tty(args.interactive, args.tty)
    placement = placement_options(args)
    with connect(args) as client:
        if not on_cluster(client) and placement is not None:
            raise BerthClientError(
                "--constraint and --reserve-* place containers on cluster nodes: "
                "drop them, or use the cluster (--host) instead of --node",
                "INVALID_ARGUMENT",
            )
        try:
            if on_cluster(client):
                container_id = _run_on_cluster(client, args, config, placement)
            else:
                container_id = _run_on_node(client, args, config)
        except BerthClientError as err:
            print_error(err)
            return CANNOT_RUN
        if args.detach:
            print_line(container_id)
            return 0
        return _attach_run(client, container_id, args)


def _run_on_node(client: NodeClient, args: argparse.Namespace, config: ContainerConfig) -> str:
    """Create (pulling the image if needed) and start; the container's id."""
    container = _create(client, config)
    try:
        client.start(container.id)
    except BerthClientError:
        if args.rm:
            # The start error is the one to report, not a failed clean-up.
            with contextlib.suppress(BerthClientError):
                client.remove(container.id, force=True)
        raise
    return container.id


def _run_on_cluster(
    client: ClusterClient,
    args: argparse.Namespace,
    config: ContainerConfig,
    placement: Placement | None,
) -> str:
    """Schedule, and unless detached wait until the node created it; the container's id."""
    # No pull here: the chosen node pulls the image itself when it converges.
    container = client.run(config, placement)
    if args.detach and not config.ports:
        return container.id
    try:
        _wait_for_node(client, container)
    except (BerthClientError, KeyboardInterrupt):
        if args.rm:
            with contextlib.suppress(BerthClientError):
                client.remove(container.id, force=True)
        raise
    return container.id


def _wait_for_node(client: ClusterClient, container: ClusterContainer) -> None:
    """Until the container's node has created it: before that it has no logs to follow."""
    started = time.monotonic()
    noticed = False
    while container.state in ("pending", "create_failed"):
        if container.state == "create_failed":  # the node said why it cannot create it
            raise BerthClientError(
                f"node {container.node_id} cannot create container {container.name}: "
                f"{container.error}",
                "FAILED_PRECONDITION",
                ErrorDetails(
                    reason="CONTAINER_CREATE_FAILED",
                    metadata={
                        "container_id": container.id,
                        "node_id": container.node_id,
                        "failure_reason": container.failure_reason,
                    },
                ),
            )
        waited = time.monotonic() - started
        if waited > NODE_START_TIMEOUT:
            raise BerthClientError(
                f"node {container.node_id} has not created container {container.name} in "
                f"{NODE_START_TIMEOUT:.0f}s (can it pull {container.image}?); it stays scheduled: "
                f"see `berth ps -a`, remove it with `berth rm -f {container.name}`",
                "DEADLINE_EXCEEDED",
            )
        if waited > NODE_START_NOTICE and not noticed:
            from berth.cli.image_cmds import image_name  # the image client: only when needed

            err_console().print(
                f"Waiting for node {container.node_id} to pull {image_name(container.image)} "
                "and start the container",
                markup=False,
            )
            noticed = True
        time.sleep(0.2)
        container = client.inspect(container.id)
    if container.ports:
        _wait_for_ports(client, container)


def _wait_for_ports(client: ClusterClient, container: ClusterContainer) -> None:
    """Until the node has started it: publishing can fail there (a port another process
    listens on), and `run -d -p` must say so, as Docker's does."""
    deadline = time.monotonic() + NODE_START_TIMEOUT
    while container.state == "created" and time.monotonic() < deadline:
        time.sleep(0.1)
        container = client.inspect(container.id)
    if container.state == "exited" and container.failure_reason == "START_FAILED":
        allocated = "port is already allocated" in container.error
        raise BerthClientError(
            f"driver failed programming external connectivity on container {container.name}: "
            f"{container.error}",
            "FAILED_PRECONDITION",
            ErrorDetails(
                reason="PORT_ALLOCATED" if allocated else "CONTAINER_START_FAILED",
                metadata={"container_id": container.id, "node_id": container.node_id},
            ),
        )


def cmd_ps(args: argparse.Namespace) -> int:
    # The node filters by exact labels to send less; filter_containers then applies them all.
    labels = {}
    for key, value in args.filter:
        if key == "label" and "=" in value:
            name, _, wanted = value.partition("=")
            labels[name] = wanted
    statuses = {v for k, v in args.filter if k == "status"}
    with connect(args) as client:
        # A status filter asks for stopped containers too, as in Docker.
        containers = client.list(all=args.all or bool(statuses), labels=labels)
        node_column = on_cluster(client)
    containers = filter_containers(containers, args.filter)
    if args.quiet:
        ids = [c.id if args.no_trunc else c.id[:SHORT_ID] for c in containers]
        if ids:
            print_line("\n".join(ids))
    elif args.format == "json":
        print_json([{**jsonable(c), "status": container_status(c)} for c in containers])
    else:
        print_ps_table(containers, no_trunc=args.no_trunc, node_column=node_column)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    # Docker's --tail 0 means no old lines (with -f: only new ones), but the protocol reads 0
    # as "all": ask for all and drop the lines written before this request.
    since = datetime.now(UTC) if args.tail == 0 else None
    with connect(args) as client:
        for line in client.logs(args.container, follow=args.follow, tail=args.tail or 0):
            if since and line.time < since:
                continue
            prefix = f"{format_time(line.time)} ".encode() if args.timestamps else b""
            write_output(line.stream, prefix + line.data)
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    if not args.command:
        raise BerthClientError("exec needs a command to run", "INVALID_ARGUMENT")
    check_tty(args.interactive, args.tty)
    env = [entry for entry in args.env if entry is not None]
    with connect(args) as client:
        session = client.exec_session(
            args.container,
            args.command,
            env=env,
            tty=args.tty,
            size=terminal_size() if args.tty else None,
            detach_keys=args.detach_keys,
            working_dir=args.workdir or "",
            user=args.user or "",
        )
        return run_session(session, stdin=args.interactive, tty_mode=args.tty)


def cmd_attach(args: argparse.Namespace) -> int:
    with connect(args) as client:
        spec = client.spec(args.container)
        stdin = spec.stdin_open and not args.no_stdin
        check_tty(stdin, spec.tty)
        session = client.attach(
            args.container,
            stdin=stdin,
            size=terminal_size() if spec.tty else None,
            detach_keys=args.detach_keys,
        )
        return run_session(session, stdin=stdin, tty_mode=spec.tty)


def cmd_start(args: argparse.Namespace) -> int:
    return _each_container(args, lambda client, c: client.start(c))


def cmd_stop(args: argparse.Namespace) -> int:
    # No -t: the node's default (10 s); -t 0 kills at once, as Docker's.
    return _each_container(args, lambda client, c: client.stop(c, args.timeout))


def cmd_kill(args: argparse.Namespace) -> int:
    return _each_container(args, lambda client, c: _kill(client, c, args.signal))


def cmd_rm(args: argparse.Namespace) -> int:
    return _each_container(args, lambda client, c: client.remove(c, args.force))


def cmd_inspect(args: argparse.Namespace) -> int:
    with connect(args) as client:
        inspect_each(args.containers, lambda c: docker_inspect(client.inspect(c)))
    return 0


def cmd_port(args: argparse.Namespace) -> int:
    """Docker's `port`: `80/tcp -> 0.0.0.0:8080` lines, or the host side of one port."""
    from berth.ports import parse_port_filter

    wanted = parse_port_filter(args.private) if args.private else None
    with connect(args) as client:
        container = client.inspect(args.container)
    bindings = [b for b in container.published if wanted in (None, (b.container_port, b.protocol))]
    if wanted is not None and not bindings:
        port, proto = wanted
        raise BerthClientError(
            f"No public port '{port}/{proto}' published for {args.container}", "NOT_FOUND"
        )
    if args.format == "json":
        print_json(bindings)
    elif wanted is not None:
        print_line("\n".join(f"{b.shown_ip}:{b.host_port}" for b in bindings))
    elif bindings:
        print_line(
            "\n".join(
                f"{b.container_port}/{b.protocol} -> {b.shown_ip}:{b.host_port}" for b in bindings
            )
        )
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    with connect(args) as client:
        for_each(args.containers, lambda c: print_line(str(client.wait(c))))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    # One call a round: the cluster (or the node) samples every container at once, each
    # CPU percent from two readings of its cgroup.
    with connect(args) as client:
        while True:
            started = time.monotonic()
            entries = client.stats_many(args.containers)
            names = args.containers or [e["container_id"][:SHORT_ID] for e in entries]
            samples = list(zip(names, entries, strict=True))
            if args.format == "json":
                print_json([stats_json(name, entry) for name, entry in samples])
            else:
                if not args.no_stream and sys.stdout.isatty():
                    sys.stdout.write("\033[2J\033[H")  # redraw in place, as `docker stats`
                print_stats_table(samples)
            failed = [(name, e["error"]) for name, e in samples if e["error"]]
            for name, error in failed:
                print_error(f"no stats for {name}: {error}")
            if args.no_stream:
                return 1 if failed else 0
            sys.stdout.flush()
            time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


def stats_json(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    figures = ("cpu_nanos", "cpu_percent", "memory_bytes", "memory_limit_bytes", "pids")
    found = {"container": name, **{key: entry[key] for key in figures}}
    return {**found, "error": entry["error"]} if entry["error"] else found


def cmd_diff(args: argparse.Namespace) -> int:
    with connect(args) as client, _node_of(client, args.container) as (node, container):
        changes = node.changes(container)
    if changes:
        print_line("\n".join(f"{kind} {path}" for kind, path in changes))
    return 0


# --- helpers ----------------------------------------------------------------------------------


def connect(args: argparse.Namespace) -> Client:
    """The cluster, or one node agent in single-host mode (config.TARGET_RULE)."""
    target = resolve_target(args.host, args.node)
    if target.kind == "cluster":
        return ClusterClient(target.address)
    return _node_client(target.address)


def on_cluster(client: Client) -> bool:
    """Whether client talks to the cluster (by what it says it talks to, so fakes can too)."""
    return client.SERVICE == "cluster"


@contextlib.contextmanager
def _node_of(client: Client, container: str) -> Iterator[tuple[NodeClient, str]]:
    """The node agent that runs container, and its id there: for what only a node answers.
    The cluster resolves the name and says which node; we then call that node directly."""
    if not on_cluster(client):
        yield client, container
        return
    placed = client.inspect(container)
    with _node_client(client.node(placed.node_id).address) as node:
        yield node, placed.id


def _kill(client: Client, container: str, signal: str) -> None:
    with _node_of(client, container) as (node, container_id):
        node.kill(container_id, signal)


def _each_container(args: argparse.Namespace, action: Callable[[Client, str], object]) -> int:
    """Act on every container given; Docker echoes each one, as given, once done with it."""
    with connect(args) as client:

        def one(container: str) -> None:
            action(client, container)
            print_line(container)

        for_each(args.containers, one)
    return 0


def _create(client: NodeClient, config: ContainerConfig) -> ContainerInfo:
    """Create; when the node lacks the image, pull it (progress on stderr) and try again."""
    try:
        return client.create(config)
    except BerthClientError as err:
        if err.code != "NOT_FOUND":
            raise
    from berth.cli.image_cmds import image_name, pull_image  # the image client: only when needed

    out = err_console()
    out.print(f"Unable to find image '{image_name(config.image)}' locally", markup=False)
    pull_image(client, config.image, out)
    return client.create(config)


# Exit codes of a container whose process could not start (Docker's 126, 127; berth's 128).
START_FAILURE_CODES = (126, 127, 128)


def _attach(client: Client, container_id: str, remove: bool) -> int:
    """Stream the container's output until it exits; its exit code is ours."""
    try:
        for line in client.logs(container_id, follow=True):
            write_output(line.stream, line.data)
        exit_code = client.wait(container_id)
        if exit_code in START_FAILURE_CODES:
            # A process that never started has no output: say why, in the node's words.
            info = client.inspect(container_id)
            if info.error:
                err_console().print(f"Error: {info.error}", markup=False, soft_wrap=True)
    except KeyboardInterrupt:
        # Pass Ctrl-C on, as Docker's sig-proxy does; the container may choose to ignore it.
        with contextlib.suppress(BerthClientError):
            _kill(client, container_id, "INT")
        raise
    if remove:
        client.remove(container_id)
    return exit_code


def _attach_run(client: Client, container_id: str, args: argparse.Namespace) -> int:
    """`run` without -d: follow the output to the exit, or with -i/-t attach to the process
    (its output from the first byte, our stdin and terminal to it); --rm once it exited."""
    if not (args.interactive or args.tty):
        return _attach(client, container_id, remove=args.rm)
    session = client.attach(
        container_id,
        stdin=args.interactive,
        logs=True,
        size=terminal_size() if args.tty else None,
        detach_keys=args.detach_keys,
    )
    exit_code = run_session(session, stdin=args.interactive, tty_mode=args.tty)
    if args.rm and session.exited:
        client.remove(container_id, force=True)
    return exit_code


def _add_terminal_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-t", "--tty", action="store_true", help="give it a terminal")
    parser.add_argument(
        "--detach-keys",
        type=detach_keys_option,
        default="",
        metavar="KEYS",
        help="keys that detach and leave it running (default ctrl-p,ctrl-q)",
    )


def write_output(stream: str, data: bytes) -> None:
    """A container's bytes, unchanged, on our stdout or stderr."""
    out = sys.stderr if stream == "stderr" else sys.stdout
    out.flush()  # text printed earlier goes first
    out.buffer.write(data)
    out.buffer.flush()


def filter_containers(
    containers: list[ContainerInfo], filters: list[tuple[str, str]]
) -> list[ContainerInfo]:
    """Docker's ps filters: different keys must all match, values of one key any of them."""
    wanted: dict[str, list[str]] = {}
    for key, value in filters:
        wanted.setdefault(key, []).append(value)

    def has_label(c: ContainerInfo, text: str) -> bool:
        key, sep, value = text.partition("=")
        return key in c.labels and (not sep or c.labels[key] == value)

    def matches(c: ContainerInfo) -> bool:
        return (
            all(has_label(c, text) for text in wanted.get("label", []))
            and ("name" not in wanted or any(n in c.name for n in wanted["name"]))
            and ("status" not in wanted or c.state in wanted["status"])
        )

    return [c for c in containers if matches(c)]


# --- rendering --------------------------------------------------------------------------------


UNKNOWN_NODE_DOWN = "Unknown (node down)"


def container_status(c: ContainerInfo, now: datetime | None = None) -> str:
    """Docker's STATUS: "Up 5 seconds", "Exited (3) 2 minutes ago", "Created", "Restarting (1)
    3 seconds ago"; "Pending" while the cluster's node pulls and creates it; "Unknown (node
    down)" while its node is not ready, whatever that node said last."""
    if not getattr(c, "node_ready", True):
        return UNKNOWN_NODE_DOWN
    if c.state == "pending":
        return "Pending"
    if c.state == "create_failed":
        return f"Create failed ({c.failure_reason or 'CREATE_FAILED'})"
    if c.state == "running":
        # Docker's durations use the words of its relative times, without the "ago".
        up = f"Up {human_ago(c.started_at, now).removesuffix(' ago')}" if c.started_at else "Up"
        status = c.health.get("Status")
        # Docker's "Up 5 seconds (healthy)", "(health: starting)", "(unhealthy)".
        if status == "starting":
            return f"{up} (health: starting)"
        return f"{up} ({status})" if status else up
    if c.state == "restarting":
        return _with_time(f"Restarting ({c.exit_code})", c.finished_at, now)
    if c.state == "created" or c.started_at is None:
        return "Created"  # an exited container that never started (its start failed)
    if c.state == "exited":
        return _with_time(f"Exited ({c.exit_code})", c.finished_at, now)
    return c.state.capitalize()


def _with_time(text: str, when: datetime | None, now: datetime | None) -> str:
    return f"{text} {human_ago(when, now)}" if when else text


def container_command(c: ContainerInfo, no_trunc: bool = False) -> str:
    """COMMAND as `docker ps` shows it: quoted, cut to 20 characters with an ellipsis."""
    command = " ".join(c.command)
    if not no_trunc and len(command) > COMMAND_WIDTH:
        command = command[: COMMAND_WIDTH - 1] + "…"
    return f'"{command}"'


PS_HEADERS = ["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]


def ps_rows(
    containers: list[ContainerInfo],
    no_trunc: bool = False,
    now: datetime | None = None,
    node_column: bool = False,
) -> list[list[str]]:
    """`docker ps` rows; node_column adds NODE before NAMES, for containers across a cluster."""
    rows = []
    for c in containers:
        row = [
            c.id if no_trunc else c.id[:SHORT_ID],
            c.image or c.image_digest,
            container_command(c, no_trunc),
            human_ago(c.created_at, now),
            container_status(c, now),
            format_ps(c.published),
            c.name,
        ]
        if node_column:
            row.insert(-1, c.node_id if isinstance(c, ClusterContainer) else "")
        rows.append(row)
    return rows


def print_ps_table(
    containers: list[ContainerInfo], no_trunc: bool = False, node_column: bool = False
) -> None:
    headers = [*PS_HEADERS[:-1], "NODE", PS_HEADERS[-1]] if node_column else PS_HEADERS
    print_table(headers, ps_rows(containers, no_trunc, node_column=node_column))


def network_settings_shape(c: ContainerInfo) -> dict[str, Any]:
    """Docker's NetworkSettings: the container's address on its network while it runs."""
    n = c.network
    if not n:
        return {"Networks": {}, "Ports": {}, "IPAddress": "", "Gateway": "", "MacAddress": ""}
    endpoint = {
        "Aliases": c.network_aliases or None,
        "NetworkID": n["network_id"],
        "IPAddress": n["ip_address"],
        "IPPrefixLen": n["ip_prefix_length"],
        "Gateway": n["gateway"],
        "MacAddress": n["mac_address"],
    }
    return {
        "Networks": {n["network"]: endpoint},
        "Ports": docker_ports(c.published),
        "IPAddress": n["ip_address"],
        "Gateway": n["gateway"],
        "MacAddress": n["mac_address"],
    }


def docker_ports(bindings: Iterable[PortBinding]) -> dict[str, list[dict[str, str]] | None]:
    """Docker's map of `80/tcp` to its host bindings (NetworkSettings.Ports and
    HostConfig.PortBindings, where a node-chosen port is "")."""
    ports: dict[str, list[dict[str, str]] | None] = {}
    for b in bindings:
        ports.setdefault(f"{b.container_port}/{b.protocol}", []).append(  # type: ignore[union-attr]
            {"HostIp": b.host_ip, "HostPort": str(b.host_port) if b.host_port else ""}
        )
    return ports


def docker_inspect(c: ContainerInfo) -> dict[str, Any]:
    """A container in the shape of `docker inspect`, for scripts written against Docker."""

    def when(value: datetime | None) -> str:
        return format_time(value) if value else ZERO_TIME

    data: dict[str, Any] = {
        "Id": c.id,
        "Created": when(c.created_at),
        "Path": c.command[0] if c.command else "",
        "Args": c.command[1:],
        "State": {
            "Status": c.state,
            "Running": c.state == "running",
            "Paused": False,
            "Restarting": c.state == "restarting",
            "OOMKilled": c.oom_killed,
            "Dead": False,
            "Pid": c.pid,
            "ExitCode": c.exit_code,
            "Error": c.error,
            "FailureReason": c.failure_reason,
            "StartedAt": when(c.started_at),
            "FinishedAt": when(c.finished_at),
        },
        "Image": c.image_digest,
        "Name": f"/{c.name}",
        "RestartCount": c.restart_count,
        "Config": {"Image": c.image, "Cmd": c.command, "Labels": c.labels},
        # Docker's names; null when not set, as Docker shows them.
        "HostConfig": {
            "CapAdd": c.cap_add or None,
            "CapDrop": c.cap_drop or None,
            "SecurityOpt": c.security_opt or None,
            "UsernsMode": c.userns,
            "NetworkMode": c.network_mode,
            "PortBindings": docker_ports(c.ports),
        },
        "NetworkSettings": network_settings_shape(c),
    }
    if c.health:
        data["State"]["Health"] = c.health
    if isinstance(c, ClusterContainer):
        # Where the cluster put it, in Swarm's words where Swarm has them.
        data["Node"] = {"ID": c.node_id, "Ready": c.node_ready}
        if not c.node_ready:
            # What its node said last may no longer hold: the status says so, as `ps` does.
            data["State"]["Status"] = "unknown"
            data["State"]["Running"] = False
        data["DesiredState"] = c.desired_state
        data["ServiceID"] = c.service_id
        data["Slot"] = c.slot
        data["Placement"] = {
            "Constraints": c.placement.constraints,
            "Reservations": {
                "NanoCPUs": c.placement.cpu_millis * 1_000_000,
                "MemoryBytes": c.placement.memory_bytes,
            },
        }
    return data


def binary_size(size: float) -> str:
    """Docker's memory figures: binary units, four significant digits (1.539MiB)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    unit = 0
    while size >= 1024 and unit < len(units) - 1:
        size /= 1024
        unit += 1
    return f"{size:.4g}{units[unit]}"


def print_stats_table(samples: list[tuple[str, dict[str, Any]]]) -> None:
    rows = [
        [name, "--", "-- / --", "--"]  # no sample, as `docker stats` shows one it cannot read
        if s.get("error")
        else [
            name,
            f"{s['cpu_percent']:.2f}%",
            f"{binary_size(s['memory_bytes'])} / "
            + (binary_size(s["memory_limit_bytes"]) if s["memory_limit_bytes"] else "-"),
            str(int(s["pids"])),
        ]
        for name, s in samples
    ]
    print_table(["CONTAINER", "CPU %", "MEM USAGE / LIMIT", "PIDS"], rows)
