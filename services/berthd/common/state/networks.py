"""Networks: cluster objects in etcd, and each host's slice of a network's range (as flannel).

The contract between the cluster service (which owns networks) and the node agents (which
lease slices). Keys, relative to the store prefix (docs/etcd.md):

    networks/<id>                       NetworkRecord (JSON). Written by the cluster only, in a
                                        transaction with its name claim.
    networks/names/<name>               The network's id: the name's claim (create-if-absent).
    networks/slices/<network id>/<node> "10.89.N.0/24": the node's slice of the network's range.
                                        Claimed by that node (first free slice, in a transaction
                                        that fails if any other slice was claimed since it
                                        looked) and deleted by it when neither its containers
                                        nor its routing mesh's backends (berthd.node.ingress)
                                        are on the network; the cluster deletes them all with
                                        the network.
    network-endpoints/<network id>/<container id>
                                        EndpointRecord (JSON): a container's names and address on
                                        the network, for the nodes' resolvers (berthd.node.dns).
                                        Written by the container's node when it attaches it,
                                        bound to the node's lease (so a dead node's go with
                                        it), deleted when it detaches. Outside networks/: the
                                        cluster's network creation compares that nothing under
                                        networks/ changed, and containers come and go often.

Container addresses come from the node's slice through the CNI host-local plugin (its leases
live in the node's data directory, not in etcd); the slice's first address is the gateway
on the node's bridge of that network.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from berthd.common.state.family import Family, known_fields
from berthd.common.store import Store

NETWORKS_PREFIX = "networks/"
NAMES_PREFIX = "networks/names/"
SLICES_PREFIX = "networks/slices/"
ENDPOINTS_PREFIX = "network-endpoints/"

# The network every cluster has (made by the cluster service when absent).
DEFAULT_NETWORK = "berth"
DEFAULT_SUBNET = "10.89.0.0/16"
# Each host's part of a network's range: a /24 (253 containers per host per network).
SLICE_PREFIX_LENGTH = 24
# Networks without --subnet get the first free /16 of 10.89.0.0 ... 10.199.0.0.
AUTO_SUBNETS = [f"10.{n}.0.0/16" for n in range(89, 200)]
# Smallest network: a /28 leaves a gateway and 13 container addresses on one host.
MAX_PREFIX_LENGTH = 28
# Names that `--network` gives other meanings to.
RESERVED_NAMES = ("none", "host", "bridge", "default")
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}")


@dataclass
class NetworkRecord:
    """networks/<id>."""

    id: str
    name: str
    subnet: str
    internal: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, id: str, raw: bytes | str) -> NetworkRecord:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("a network record is a JSON object")
        record = cls(**{**known_fields(cls, data), "id": id})
        ipaddress.IPv4Network(record.subnet)
        return record


class _NetworkFamily(Family[NetworkRecord]):
    """networks/<id> only: the names/ and slices/ subtrees share the prefix."""

    def id_of(self, key: str) -> str | None:
        id = super().id_of(key)
        return None if id is None or "/" in id else id


@dataclass(frozen=True)
class NameClaim:
    """networks/names/<name>: the id of the network holding the name."""

    network_id: str

    def encode(self) -> bytes:
        return self.network_id.encode()

    @classmethod
    def decode(cls, name: str, raw: bytes | str) -> NameClaim:
        text = raw.decode() if isinstance(raw, bytes) else raw
        if not text:
            raise ValueError("empty network name claim")
        return cls(text)


@dataclass(frozen=True)
class Slice:
    """networks/slices/<network id>/<node>: one node's part of a network's range."""

    subnet: str

    def encode(self) -> bytes:
        return self.subnet.encode()

    @classmethod
    def decode(cls, id: str, raw: bytes | str) -> Slice:
        text = raw.decode() if isinstance(raw, bytes) else raw
        ipaddress.IPv4Network(text)
        return cls(text)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def gateway(self) -> str:
        """The slice's first address, on the node's bridge."""
        return str(self.network.network_address + 1)


@dataclass
class EndpointRecord:
    """network-endpoints/<network id>/<container id>: what a container answers to on the
    network. Its names: `name`, the container id's first 12 characters, each alias, and for
    a service replica the service's name and `tasks.<service>`."""

    name: str
    address: str
    node: str
    aliases: list[str] = field(default_factory=list)
    service: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def decode(cls, id: str, raw: bytes | str) -> EndpointRecord:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("an endpoint record is a JSON object")
        record = cls(**known_fields(cls, data))
        ipaddress.IPv4Address(record.address)
        if not isinstance(record.aliases, list):
            raise ValueError("aliases is a list")
        return record


def endpoint_id(network_id: str, container_id: str) -> str:
    """The ENDPOINTS id of a container on a network."""
    return f"{network_id}/{container_id}"


NETWORKS: Family[NetworkRecord] = _NetworkFamily("network", NETWORKS_PREFIX, NetworkRecord.decode)
NAMES: Family[NameClaim] = Family("network name", NAMES_PREFIX, NameClaim.decode)
# Every network's endpoints, by "<network id>/<container id>" (endpoint_id).
ENDPOINTS: Family[EndpointRecord] = Family(
    "network endpoint", ENDPOINTS_PREFIX, EndpointRecord.decode
)


def slices(network_id: str) -> Family[Slice]:
    """The slices of one network, by node id."""
    return Family("network slice", f"{SLICES_PREFIX}{network_id}/", Slice.decode)


# Ranges -------------------------------------------------------------------------------------


def slice_prefix_length(subnet: ipaddress.IPv4Network) -> int:
    """A /24 per host, or the whole network when it is a /24 or smaller."""
    return max(SLICE_PREFIX_LENGTH, subnet.prefixlen)


def first_free_slice(subnet: str, taken: Iterable[str]) -> str | None:
    """The first slice of `subnet` that no one holds (None when all are taken). The network's
    first slice is skipped when the network has more than one: its .0.1 would look like the
    whole network's gateway, which no host is."""
    network = ipaddress.IPv4Network(subnet)
    held = {ipaddress.IPv4Network(t) for t in taken}
    candidates = list(network.subnets(new_prefix=slice_prefix_length(network)))
    if len(candidates) > 1:
        candidates = candidates[1:]
    for candidate in candidates:
        if not any(candidate.overlaps(h) for h in held):
            return str(candidate)
    return None


def overlapping(subnet: str, others: Iterable[NetworkRecord]) -> NetworkRecord | None:
    """The first of `others` whose range overlaps `subnet`."""
    mine = ipaddress.IPv4Network(subnet)
    for other in others:
        if mine.overlaps(ipaddress.IPv4Network(other.subnet)):
            return other
    return None


def free_subnet(others: Iterable[NetworkRecord]) -> str | None:
    """The first AUTO_SUBNETS range that overlaps no existing network."""
    others = list(others)
    for candidate in AUTO_SUBNETS:
        if overlapping(candidate, others) is None:
            return candidate
    return None


async def network_by_name(store: Store, name: str) -> NetworkRecord | None:
    """The network called `name`, or None."""
    claim = await NAMES.get(store, name)
    if claim is None:
        return None
    return await NETWORKS.get(store, claim.network_id)
