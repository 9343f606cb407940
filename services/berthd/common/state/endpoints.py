"""Service instances: where each running berth server answers (docs/etcd.md). Keys, relative
to the store prefix:

    endpoints/<service>/<instance>  EndpointRecord, bound to the instance's lease: written by
                                    the server bootstrap of every service (common/server.py),
                                    so a live instance is listed and a dead one vanishes. Read
                                    by every service that finds another without a flag
                                    (common/endpoints.py) and by the cluster (GetEndpoints).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from berthd.common.state.family import Family, known_fields
from berthd.common.store import Store, encode


@dataclass(frozen=True)
class EndpointRecord:
    service: str  # registry, image, builder, node, cluster
    instance: str
    address: str  # host:port of its gRPC server (mutual TLS)
    metrics: str = ""  # URL of its Prometheus metrics
    pid: int = 0
    version: str = ""
    started_at: float = 0.0
    public_address: str = ""  # host:port for token and anonymous callers (TLS), if any
    http_url: str = ""  # base URL of its HTTP API, if any (the registry's OCI /v2/)

    @property
    def id(self) -> str:
        return endpoint_id(self.service, self.instance)

    def encode(self) -> bytes:
        data = asdict(self)
        if not self.http_url:
            del data["http_url"]  # only the registry serves one: the others' records unchanged
        return encode(data)

    @classmethod
    def decode(cls, id: str, raw: bytes | str) -> EndpointRecord:
        """`id` is `<service>/<instance>` from the key, which wins over the value."""
        service, _, instance = id.partition("/")
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("an endpoint is a JSON object")
        return cls(**{**known_fields(cls, data), "service": service, "instance": instance})


def endpoint_id(service: str, instance: str) -> str:
    if not service or "/" in service or not instance:
        raise ValueError(f"invalid endpoint {service!r}/{instance!r}")
    return f"{service}/{instance}"


ENDPOINTS: Family[EndpointRecord] = Family("endpoint", "endpoints/", EndpointRecord.decode)


def endpoint_key(service: str, instance: str) -> str:
    return ENDPOINTS.key(endpoint_id(service, instance))


async def instances(store: Store, service: str) -> list[EndpointRecord]:
    """The registered instances of one service, in instance order (reads only its keys)."""
    return [v.record for v in await ENDPOINTS.list(store, f"{service}/")]
