"""`berth registry webhook add|ls|rm|deliveries`: the registry's outgoing webhooks
(docs/deploy-pipeline.md, "Webhooks")."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from berth.cli.output import for_each, human_ago, print_json, print_line, print_listing, truncate
from berth.config import resolve_service_address
from berth.enums.registry import WEBHOOK_EVENTS

if TYPE_CHECKING:  # the client loads only when a webhook command runs (`registry ls` needs none)
    from berth.client.webhooks import DeliveryInfo, WebhookClient, WebhookInfo

WEBHOOK_HEADERS = ["ID", "URL", "EVENTS", "REPOSITORY", "SECRET", "CREATED"]
DELIVERY_HEADERS = ["EVENT ID", "ACTION", "TARGET", "STATUS", "ATTEMPTS", "CODE", "LAST ERROR"]


def parse_events(text: str) -> list[str]:
    events = [e.strip() for e in text.split(",") if e.strip()]
    unknown = [e for e in events if e not in WEBHOOK_EVENTS]
    if not events or unknown:
        raise argparse.ArgumentTypeError(
            f'invalid events "{text}": expected a comma-separated list of '
            + ", ".join(WEBHOOK_EVENTS.names)
        )
    return events


def add_commands(registry: argparse._SubParsersAction, common: list) -> None:
    """`webhook ...` under `berth registry`."""
    webhook = registry.add_parser("webhook", help="send registry events to other systems")
    sub = webhook.add_subparsers(dest="webhook_command", metavar="COMMAND", required=True)

    add = sub.add_parser("add", parents=common, help="add a webhook; prints its id")
    add.add_argument("url", metavar="URL", help="where to POST events (http or https)")
    add.add_argument(
        "--events",
        type=parse_events,
        default=["push"],
        metavar="LIST",
        help="comma-separated: push, delete (default: push)",
    )
    add.add_argument(
        "--repo",
        default="",
        metavar="PATTERN",
        help="only repositories matching this glob, e.g. 'team/*' (default: all)",
    )
    add.add_argument(
        "--secret",
        default="",
        metavar="S",
        help="sign each delivery: X-Berth-Signature-256: sha256=HMAC-SHA256(body, S)",
    )
    add.set_defaults(func=cmd_add)

    ls = sub.add_parser("ls", parents=common, help="list webhooks (never their secrets)")
    ls.add_argument("-q", "--quiet", action="store_true", help="only ids")
    ls.set_defaults(func=cmd_ls)

    rm = sub.add_parser("rm", parents=common, help="remove webhooks and their queued deliveries")
    rm.add_argument("webhooks", nargs="+", metavar="ID", help="id or unique id prefix")
    rm.set_defaults(func=cmd_rm)

    deliveries = sub.add_parser(
        "deliveries", parents=common, help="a webhook's queued and last finished deliveries"
    )
    deliveries.add_argument("webhook", metavar="ID", help="id or unique id prefix")
    deliveries.add_argument("-q", "--quiet", action="store_true", help="only event ids")
    deliveries.set_defaults(func=cmd_deliveries)


def connect(args: argparse.Namespace) -> WebhookClient:
    from berth.client.webhooks import WebhookClient

    return WebhookClient(resolve_service_address("registry", args.registry))


def cmd_add(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = client.create(args.url, args.events, args.repo, args.secret)
    if args.format == "json":
        print_json(info)
    else:
        print_line(info.id)
    return 0


def webhook_rows(hooks: list[WebhookInfo]) -> list[list[str]]:
    return [
        [
            h.id,
            h.url,
            ",".join(h.events),
            h.repository_pattern or "*",
            "***" if h.has_secret else "",
            human_ago(h.created_at),
        ]
        for h in hooks
    ]


def cmd_ls(args: argparse.Namespace) -> int:
    with connect(args) as client:
        hooks = client.list()
    print_listing(args, hooks, WEBHOOK_HEADERS, webhook_rows, lambda h: h.id)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    with connect(args) as client:

        def remove(webhook: str) -> None:
            client.remove(webhook)
            print_line(webhook)

        for_each(args.webhooks, remove)
    return 0


def _target(d: DeliveryInfo) -> str:
    if d.tag:
        return f"{d.repository}:{d.tag}"
    return f"{d.repository}@{d.digest[:19]}" if d.digest else d.repository


def delivery_rows(deliveries: list[DeliveryInfo]) -> list[list[str]]:
    return [
        [
            d.event_id,
            d.action,
            _target(d),
            d.status,
            str(d.attempts),
            str(d.last_status_code or "-"),
            truncate(d.last_error, 60) if d.last_error else "",
        ]
        for d in deliveries
    ]


def cmd_deliveries(args: argparse.Namespace) -> int:
    with connect(args) as client:
        found = client.deliveries(args.webhook)
    print_listing(args, found, DELIVERY_HEADERS, delivery_rows, lambda d: d.event_id)
    return 0
