"""berth.enums: one table per protobuf enum, shared by the clients, the CLI and the servicers."""

from __future__ import annotations

import pytest

from berth.enums import EnumTable, Wording
from berth.enums import cluster as cluster_enums
from berth.enums import containers as container_enums
from berth.enums import image as image_enums
from berth.enums import node as node_enums
from berth.enums import progress as progress_enums
from berth.enums import registry as registry_enums
from berth.types.v1 import container_pb2

MODULES = (container_enums, node_enums, cluster_enums, image_enums, progress_enums, registry_enums)
TABLES: list[EnumTable] = [t for m in MODULES for t in m.TABLES]
WORDINGS: list[Wording] = [w for m in MODULES for w in getattr(m, "WORDINGS", ())]


def test_every_table_is_listed() -> None:
    """A table a module defines but leaves out of TABLES would escape the tests below."""
    for module in MODULES:
        defined = {id(v) for v in vars(module).values() if isinstance(v, EnumTable)}
        assert defined == {id(t) for t in module.TABLES}, module.__name__
        worded = {id(v) for v in vars(module).values() if isinstance(v, Wording)}
        assert worded == {id(w) for w in getattr(module, "WORDINGS", ())}, module.__name__


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.full_name)
def test_every_proto_value_has_a_name(table: EnumTable) -> None:
    """A value added to the proto must be given a name here (and so in the CLI and servers)."""
    assert table.missing() == []


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.full_name)
def test_names_and_values_round_trip(table: EnumTable) -> None:
    assert table.names
    for name in table.names:
        assert table.name(table.value(name)) == name
        assert name in table
    values = [table.value(name) for name in table.names]
    assert len(set(values)) == len(values)
    assert 0 not in values


@pytest.mark.parametrize("wording", WORDINGS, ids=lambda w: w.table.full_name)
def test_every_name_has_its_words(wording: Wording) -> None:
    assert wording.missing() == []


def test_unknown_values_and_names() -> None:
    states = container_enums.CONTAINER_STATES
    assert states.name(0, "unknown") == "unknown"
    assert states.name(99, "") == ""
    with pytest.raises(ValueError, match="ContainerState value 99"):
        states.name(99)
    assert states.value("paused", 0) == 0
    with pytest.raises(ValueError, match="expected one of created, running, exited, restarting"):
        states.value("paused")
    assert "paused" not in states


def test_the_zero_value_reads_as_the_default_when_it_means_one() -> None:
    restart = container_enums.RESTART_POLICIES
    assert restart.name(container_pb2.RESTART_POLICY_NAME_UNSPECIFIED) == "no"
    assert restart.value("no") == container_pb2.RESTART_POLICY_NAME_NO  # not the zero value
    assert container_enums.NETWORK_MODES.name(0) == "none"
    assert image_enums.ARCHIVE_FORMATS.name(0) == "docker-archive"
    with pytest.raises(ValueError):
        cluster_enums.EVENT_TYPES.name(0)


def test_names_users_type_stay_as_they_were() -> None:
    """These names are CLI input and output; changing one breaks scripts."""
    assert container_enums.RESTART_POLICIES.names == ("no", "on-failure", "always")
    assert container_enums.NETWORK_MODES.names == ("none", "host", "network")
    assert image_enums.ARCHIVE_FORMATS.names == ("docker-archive", "oci-archive")
    assert cluster_enums.NODE_STATES.names == ("ready", "down")
    assert registry_enums.VISIBILITIES.names == ("private", "public")
    assert node_enums.CHANGE_KINDS.names == ("A", "C", "D")
    states = progress_enums.PROGRESS_STATES
    assert {"running", "cached", "done", "failed"} <= set(states.names)
    assert progress_enums.PULL_WORDS(states.value("mounted"), "?") == "Already exists"
    assert progress_enums.PULL_WORDS(0, "?") == "?"
    assert progress_enums.PULL_WORDS(states.value("done"), "?") == "Pull complete"
    assert progress_enums.PUSH_WORDS(states.value("done"), "?") == "Pushed"


def test_a_table_rejects_names_for_values_the_enum_lacks() -> None:
    with pytest.raises(ValueError, match="has no value 7"):
        EnumTable(container_pb2.NetworkMode, {7: "bridge"})
    with pytest.raises(ValueError, match="has no value 0"):
        EnumTable(container_pb2.NetworkMode, {0: "none"})
    with pytest.raises(ValueError, match="same name"):
        EnumTable(container_pb2.NetworkMode, {1: "none", 2: "none"})
    with pytest.raises(ValueError, match="no name 'bridge'"):
        container_enums.NETWORK_MODES.wording({"bridge": "Bridge"})


# --- the servers' own strings are the tables' names -------------------------------------------


def test_the_node_agents_strings_are_names() -> None:
    from berth.containers import NETWORK_MODES, RESTART_POLICIES

    # create_failed is the state of a container its node has no record of (it could not create
    # it): reported to the cluster only (berthd.common.state.containers.CREATE_FAILED).
    from berthd.common.state.containers import CREATE_FAILED
    from berthd.node.layers import PullState
    from berthd.node.records import STATES

    assert {*STATES, CREATE_FAILED} == set(container_enums.CONTAINER_STATES.names)
    assert {str(s) for s in PullState} <= set(progress_enums.PROGRESS_STATES.names)
    assert set(RESTART_POLICIES) == set(container_enums.RESTART_POLICIES.names)
    # The modes a node supports (berth.containers), of those the proto names.
    assert set(NETWORK_MODES) <= set(container_enums.NETWORK_MODES.names)


def test_the_image_and_builder_strings_are_names() -> None:
    from berthd.builder.model import ProgressState, StepStatus
    from berthd.image.archive import FORMATS
    from berthd.image.model import State, Unit

    states = set(progress_enums.PROGRESS_STATES.names)
    assert {str(s) for s in (*State, *StepStatus, *ProgressState)} <= states
    assert {str(u) for u in Unit} == {*progress_enums.PROGRESS_UNITS.names, ""}
    assert {f"{f}-archive" for f in FORMATS} == set(image_enums.ARCHIVE_FORMATS.names)
