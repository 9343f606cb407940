"""The node's DNS answers (berthd.node.dns) without servers: the name table, what a query
gets, truncation, resolv.conf, and the endpoint records a node's containers call for."""

from __future__ import annotations

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest

from berth.containers import ContainerConfig, InvalidContainerConfig, from_spec, to_spec
from berthd.common.state.containers import SERVICE_LABEL
from berthd.common.state.networks import ENDPOINTS, EndpointRecord, endpoint_id
from berthd.node.dns import (
    TTL,
    Bridge,
    NameTable,
    answer,
    host_upstreams,
    names_of,
    parse_upstreams,
    render,
    resolv_conf,
    wanted,
)
from berthd.node.network import Attachment, nft_ruleset
from berthd.node.records import ContainerRecord

FRONT, BACK = "f0" * 32, "b0" * 32
WEB1, WEB2, DB, OTHER = "a1" * 32, "a2" * 32, "d1" * 32, "e1" * 32


def table() -> NameTable:
    names = NameTable()
    names.put(endpoint_id(FRONT, WEB1), EndpointRecord("web.1", "10.90.1.2", "h1", [], "web"))
    names.put(endpoint_id(FRONT, WEB2), EndpointRecord("web.2", "10.90.2.2", "h2", [], "web"))
    names.put(endpoint_id(FRONT, DB), EndpointRecord("db", "10.90.1.3", "h1", ["Store"]))
    names.put(endpoint_id(BACK, OTHER), EndpointRecord("hidden", "10.91.1.2", "h1"))
    return names


def ask(name: str, rdtype: str = "A", network: str = FRONT, internal: bool = False):
    query = dns.message.make_query(name, rdtype)
    return answer(query, network, internal, table(), shuffle=lambda _: None)


def addresses(reply: dns.message.Message) -> list[str]:
    return [r.address for rrset in reply.answer for r in rrset]


def test_a_container_name_an_alias_and_a_short_id_answer_the_address() -> None:
    for name in ("db", "db.", "DB", "store", "STORE.", DB[:12]):
        reply = ask(name)
        assert reply is not None, name
        assert reply.rcode() == dns.rcode.NOERROR
        assert addresses(reply) == ["10.90.1.3"]
        assert reply.flags & dns.flags.AA
        assert reply.answer[0].ttl == TTL


def test_a_service_name_answers_every_replica_and_a_replica_its_own() -> None:
    assert sorted(addresses(ask("web"))) == ["10.90.1.2", "10.90.2.2"]
    assert sorted(addresses(ask("tasks.web"))) == ["10.90.1.2", "10.90.2.2"]
    assert addresses(ask("web.2")) == ["10.90.2.2"]


def test_the_order_is_shuffled_for_round_robin() -> None:
    query = dns.message.make_query("web", "A")
    seen = set()
    for _ in range(50):
        reply = answer(query, FRONT, False, table())
        assert reply is not None
        seen.add(tuple(addresses(reply)))
    assert seen == {("10.90.1.2", "10.90.2.2"), ("10.90.2.2", "10.90.1.2")}


def test_another_networks_name_goes_upstream_or_is_refused_on_an_internal_network() -> None:
    assert ask("hidden") is None  # not a name of FRONT: forwarded like any other
    assert ask("example.org") is None
    refused = ask("example.org", internal=True)
    assert refused is not None and refused.rcode() == dns.rcode.REFUSED
    # BACK's own name answers on BACK.
    assert addresses(ask("hidden", network=BACK)) == ["10.91.1.2"]


def test_a_known_name_has_no_ipv6_address_and_a_reverse_lookup_names_it() -> None:
    aaaa = ask("db", "AAAA")
    assert aaaa is not None and aaaa.rcode() == dns.rcode.NOERROR and not aaaa.answer
    reverse = ask(dns.reversename.from_address("10.90.1.3").to_text(), "PTR")
    assert reverse is not None
    assert [r.target.to_text() for r in reverse.answer[0]] == ["db."]
    # Another network's address is not named here.
    assert ask(dns.reversename.from_address("10.91.1.2").to_text(), "PTR") is None


def test_a_deleted_record_stops_answering_and_a_moved_one_answers_its_new_address() -> None:
    names = table()
    names.put(endpoint_id(FRONT, WEB2), EndpointRecord("web.2", "10.90.3.7", "h3", [], "web"))
    assert names.addresses(FRONT, "web") == ["10.90.1.2", "10.90.3.7"]
    names.delete(endpoint_id(FRONT, WEB1))
    names.delete(endpoint_id(FRONT, WEB1))  # twice: a repeated watch event is harmless
    assert names.addresses(FRONT, "web") == ["10.90.3.7"]
    assert names.addresses(FRONT, "web.1") == []
    names.replace({})
    assert names.addresses(FRONT, "web") == [] and not names.records


def test_other_opcodes_and_question_counts_are_refused_with_their_codes() -> None:
    query = dns.message.make_query("web", "A")
    query.set_opcode(dns.opcode.NOTIFY)
    reply = answer(query, FRONT, False, table())
    assert reply is not None and reply.rcode() == dns.rcode.NOTIMP
    empty = dns.message.Message()
    reply = answer(empty, FRONT, False, table())
    assert reply is not None and reply.rcode() == dns.rcode.FORMERR


def test_an_answer_too_big_for_udp_is_truncated_and_whole_over_tcp() -> None:
    names = NameTable()
    for n in range(60):
        record = EndpointRecord(f"big.{n}", f"10.90.1.{n + 2}", "h1", [], "big")
        names.put(endpoint_id(FRONT, f"{n:064x}"), record)
    query = dns.message.make_query("big", "A")
    reply = answer(query, FRONT, False, names)
    assert reply is not None
    udp = dns.message.from_wire(render(reply, query, tcp=False))
    assert udp.flags & dns.flags.TC and not udp.answer
    reply = answer(query, FRONT, False, names)
    assert reply is not None
    tcp = dns.message.from_wire(render(reply, query, tcp=True))
    assert len(addresses(tcp)) == 60
    # An EDNS client that takes 4096 bytes gets all of them over UDP.
    edns = dns.message.make_query("big", "A", use_edns=0, payload=4096)
    reply = answer(edns, FRONT, False, names)
    assert reply is not None
    assert len(addresses(dns.message.from_wire(render(reply, edns, tcp=False)))) == 60


def test_names_of_a_replica_and_of_a_container() -> None:
    replica = EndpointRecord("web.1", "10.90.1.2", "h1", ["Front"], "web")
    assert names_of(WEB1, replica) == {"web.1", WEB1[:12], "front", "web", "tasks.web"}
    assert names_of(DB, EndpointRecord("db", "10.90.1.3", "h1")) == {"db", DB[:12]}


def test_endpoint_records_round_trip_and_bad_ones_are_refused() -> None:
    record = EndpointRecord("web.1", "10.90.1.2", "h1", ["a"], "web")
    assert EndpointRecord.decode("x", record.encode()) == record
    assert ENDPOINTS.key(endpoint_id(FRONT, WEB1)) == f"network-endpoints/{FRONT}/{WEB1}"
    assert ENDPOINTS.id_of(f"network-endpoints/{FRONT}/{WEB1}") == f"{FRONT}/{WEB1}"
    with pytest.raises(ValueError):
        EndpointRecord.decode("x", b'{"name":"a","address":"nope","node":"h1"}')


def test_resolv_conf_names_the_gateway_keeps_search_and_sets_ndots_0() -> None:
    host = "nameserver 127.0.0.53\nsearch corp.example\noptions edns0\n"
    assert resolv_conf("10.90.1.1", host) == (
        "nameserver 10.90.1.1\nsearch corp.example\noptions ndots:0\n"
    )
    assert resolv_conf("10.90.1.1", "") == "nameserver 10.90.1.1\noptions ndots:0\n"


def test_upstreams_from_a_flag_and_from_the_hosts_resolv_conf() -> None:
    assert parse_upstreams("10.0.0.2, 10.0.0.3:5353") == [("10.0.0.2", 53), ("10.0.0.3", 5353)]
    for bad in ("example.org", "10.0.0.2:0", "10.0.0.2:x"):
        with pytest.raises(ValueError, match="invalid DNS upstream"):
            parse_upstreams(bad)
    text = "# comment\nnameserver 127.0.0.53\nnameserver bogus\nnameserver ::1\n"
    assert host_upstreams(text) == [("127.0.0.53", 53), ("::1", 53)]


def record(id: str, name: str, attachment: Attachment | None, **config: object) -> ContainerRecord:
    rec = ContainerRecord(id, name, ContainerConfig("busybox", **config), "", [])  # type: ignore[arg-type]
    rec.network = attachment.to_json() if attachment else {}
    return rec


def test_a_node_publishes_its_attached_containers_and_listens_on_their_gateways() -> None:
    def on(network_id: str, address: str, internal: bool = False) -> Attachment:
        return Attachment(
            "n", network_id, "10.90.0.0/16", "10.90.1.0/24", "bn-x", internal, "/x",
            ip_address=address, prefix_length=24, gateway="10.90.1.1",
        )  # fmt: skip

    records = [
        record(WEB1, "web.1", on(FRONT, "10.90.1.2"), labels={SERVICE_LABEL: "5e41ce"},
               network_mode="n", network_aliases=["www"]),
        record(DB, "db", on(BACK, "10.90.1.3", internal=True), network_mode="n"),
        record(OTHER, "off", None),
    ]  # fmt: skip
    endpoints, bridges = wanted("h1", records)
    assert endpoints == {
        endpoint_id(FRONT, WEB1): EndpointRecord("web.1", "10.90.1.2", "h1", ["www"], "web"),
        endpoint_id(BACK, DB): EndpointRecord("db", "10.90.1.3", "h1", [], ""),
    }
    assert bridges == {
        FRONT: Bridge(FRONT, "10.90.1.1", False),
        BACK: Bridge(BACK, "10.90.1.1", True),
    }


def test_service_dns_answers_only_replicas_that_serve() -> None:
    """A replica's service name (and tasks.<service>) leaves a replica withdrawn before a stop
    or, with a health check, not healthy; its own name still answers. A start-first replica
    (SERVICE.SLOT.ID) answers to its service."""
    attachment = Attachment(
        "n", FRONT, "10.90.0.0/16", "10.90.1.0/24", "bn-x", False, "/x",
        ip_address="10.90.1.2", prefix_length=24, gateway="10.90.1.1",
    )  # fmt: skip

    def service_of(name: str, health: str = "", withdrawn: bool = False) -> str:
        rec = record(WEB1, name, attachment, labels={SERVICE_LABEL: "5e41ce"}, network_mode="n")
        rec.health = {"status": health} if health else {}
        rec.withdrawn = withdrawn
        endpoint = wanted("h1", [rec])[0][endpoint_id(FRONT, WEB1)]
        assert endpoint.name == name
        return endpoint.service

    assert service_of("web.1") == service_of("web.1", "healthy") == "web"
    assert service_of("web.2.0123456789ab") == "web"
    assert service_of("web.1", "starting") == service_of("web.1", "unhealthy") == ""
    assert service_of("web.1", withdrawn=True) == ""


def test_the_nodes_table_accepts_dns_to_each_gateway_and_nothing_else_from_internal() -> None:
    def on(network_id: str, slice_: str, internal: bool = False) -> Attachment:
        return Attachment(
            "n", network_id, "10.0.0.0/8", slice_, f"bn-{network_id[:4]}", internal, ""
        )

    rules = nft_ruleset("berth_1", [on(FRONT, "10.90.1.0/24"), on(BACK, "10.91.1.0/24", True)])
    dns_rule = 'iifname "bn-f0f0" ip daddr 10.90.1.1 meta l4proto { udp, tcp } th dport 53 accept'
    assert dns_rule in rules
    assert (
        'iifname "bn-b0b0" ip daddr 10.91.1.1 meta l4proto { udp, tcp } th dport 53 accept' in rules
    )
    internal = rules.index('iifname "bn-b0b0" reject')
    assert internal > rules.index('iifname "bn-b0b0" ip daddr 10.91.1.1')  # DNS first
    assert 'iifname "bn-f0f0" reject' not in rules


def test_network_aliases_in_the_model_and_the_spec() -> None:
    config = ContainerConfig("busybox", network_mode="front", network_aliases=["api", "v1.api"])
    config.validate()
    assert from_spec(to_spec(config)).network_aliases == ["api", "v1.api"]
    assert list(to_spec(config).network_aliases) == ["api", "v1.api"]
    with pytest.raises(InvalidContainerConfig, match="only for containers on a berth network"):
        ContainerConfig("busybox", network_aliases=["api"]).validate()
    with pytest.raises(InvalidContainerConfig, match="invalid network alias") as bad:
        ContainerConfig("busybox", network_mode="front", network_aliases=["-x"]).validate()
    assert bad.value.field == "network_aliases"
    # An older record without the field still loads.
    old = ContainerConfig.from_json('{"image":"busybox","network_mode":"front"}')
    assert old.network_aliases == []
