"""The public contract's conventions (docs/api.md), checked on every message and RPC of every
berth proto, so a new field or call that breaks one fails here rather than in a client team's
generated code."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.protobuf.descriptor import (
    Descriptor,
    FieldDescriptor,
    FileDescriptor,
    MethodDescriptor,
)

from berth.builder.v1 import builder_pb2
from berth.cluster.v1 import cluster_pb2, secrets_pb2
from berth.image.v1 import image_pb2
from berth.node.v1 import node_pb2
from berth.registry.v1 import registry_pb2
from berth.types.v1 import container_pb2, progress_pb2, types_pb2
from berth.types.v1 import node_pb2 as types_node_pb2

FILES: list[FileDescriptor] = [
    m.DESCRIPTOR
    for m in (
        builder_pb2,
        cluster_pb2,
        secrets_pb2,
        image_pb2,
        node_pb2,
        registry_pb2,
        container_pb2,
        types_node_pb2,
        progress_pb2,
        types_pb2,
    )
]
PROGRESS = "berth.types.v1.Progress"
TIMESTAMP = "google.protobuf.Timestamp"


def _nested(message: Descriptor) -> Iterator[Descriptor]:
    yield message
    for inner in message.nested_types:
        if not inner.GetOptions().map_entry:
            yield from _nested(inner)


def messages() -> Iterator[Descriptor]:
    for file in FILES:
        for message in file.message_types_by_name.values():
            yield from _nested(message)


def fields() -> Iterator[FieldDescriptor]:
    for message in messages():
        yield from message.fields


def methods() -> Iterator[MethodDescriptor]:
    for file in FILES:
        for service in file.services_by_name.values():
            yield from service.methods


def _type(field: FieldDescriptor) -> str:
    return field.message_type.full_name if field.message_type else ""


def test_the_walk_sees_every_service() -> None:
    names = {m.containing_service.full_name for m in methods()}
    assert names == {
        "berth.builder.v1.BuilderService",
        "berth.cluster.v1.ClusterService",
        "berth.cluster.v1.SecretService",
        "berth.image.v1.ImageService",
        "berth.node.v1.NodeService",
        "berth.registry.v1.RegistryService",
    }
    assert sum(1 for _ in fields()) > 300


def test_times_are_timestamps_named_at() -> None:
    """A point in time is a Timestamp named `*_at` (filters: `since`, `until`)."""
    wrong = [
        f.full_name
        for f in fields()
        if _type(f) == TIMESTAMP and not (f.name.endswith("_at") or f.name in ("since", "until"))
    ]
    wrong += [f.full_name for f in fields() if f.name.endswith("_at") and _type(f) != TIMESTAMP]
    assert wrong == []


DURATION_SUFFIXES = ("_seconds", "_secs", "_ms", "_millis", "_nanos", "timeout", "_period")


def test_durations_are_duration_messages() -> None:
    """A length of time is a google.protobuf.Duration, never an integer with a unit in its name
    (`cpu_millis` is an amount of CPU, not of time)."""
    wrong = [
        f.full_name
        for f in fields()
        if f.name.endswith(DURATION_SUFFIXES)
        and f.name != "cpu_millis"
        and _type(f) != "google.protobuf.Duration"
    ]
    assert wrong == []


def test_one_name_per_idea() -> None:
    """`*_id` holds exactly an id; a field that takes an id, prefix or name is named after the
    thing (`container`); freed space is `reclaimed_bytes`; nodes have only ids."""
    # A message-typed `node` is the node itself (GetNodeResponse.node), not a reference to one.
    wrong = [
        f.full_name
        for f in fields()
        if f.name in ("node", "instance", "created", "bytes_freed", "space_reclaimed", "time")
        and not (f.name == "node" and f.message_type)
    ]
    wrong += [f.full_name for f in fields() if f.name.endswith("_id") and f.type != f.TYPE_STRING]
    assert wrong == []


def test_verbs_get_for_one_and_list_for_many() -> None:
    wrong = [
        m.full_name for m in methods() if m.name.startswith("Inspect") or m.name.endswith("Ps")
    ]
    wrong += [m.full_name for m in methods() if m.name in ("ImageHistory",)]
    assert wrong == []


def test_every_list_and_search_pages() -> None:
    """`page_size` + `page_token` in, `next_page_token` out, on every List and Search."""
    wrong = []
    for method in methods():
        if not method.name.startswith(("List", "Search")):
            continue
        request = method.input_type.fields_by_name
        response = method.output_type.fields_by_name
        if not (
            "page_size" in request
            and request["page_size"].type == FieldDescriptor.TYPE_INT32
            and "page_token" in request
            and "next_page_token" in response
        ):
            wrong.append(method.full_name)
    assert wrong == []


# Messages a stream carries where each message is one of several kinds: each kind is a member
# of a oneof, so "only in the first message" is a type, not a comment.
ALTERNATIVES = [
    builder_pb2.BuildRequest,
    builder_pb2.BuildResponse,
    node_pb2.ExecRequest,
    node_pb2.PullImageResponse,
    cluster_pb2.ExecRequest,
    cluster_pb2.EventsResponse,
    image_pb2.ImportImageRequest,
    image_pb2.LoadImagesRequest,
    image_pb2.PullImageResponse,
    image_pb2.PushImageResponse,
    image_pb2.CommitContainerResponse,
    image_pb2.SaveImagesResponse,
    container_pb2.ProcessInput,
    container_pb2.ProcessOutput,
]


@pytest.mark.parametrize("message", ALTERNATIVES, ids=lambda m: m.DESCRIPTOR.full_name)
def test_alternatives_are_oneofs(message: type) -> None:
    descriptor = message.DESCRIPTOR
    real = [o for o in descriptor.oneofs if not o.name.startswith("_")]
    assert real, f"{descriptor.full_name} has no oneof"
    outside = [f.name for f in descriptor.fields if f.containing_oneof is None]
    assert outside == [] or descriptor.full_name.endswith("EventsResponse"), outside


def test_progress_is_in_a_oneof_wherever_it_streams() -> None:
    wrong = [f.full_name for f in fields() if _type(f) == PROGRESS and f.containing_oneof is None]
    # BuildStep carries its step's progress beside the step's own facts.
    assert [w for w in wrong if not w.startswith("berth.builder.v1.BuildStep.")] == []


LONG_OPERATIONS = [
    "berth.node.v1.NodeService.PullImage",
    "berth.image.v1.ImageService.PullImage",
    "berth.image.v1.ImageService.PushImage",
    "berth.image.v1.ImageService.CommitContainer",
    "berth.image.v1.ImageService.ImportImage",
    "berth.image.v1.ImageService.LoadImages",
    "berth.image.v1.ImageService.SaveImages",
    "berth.registry.v1.RegistryService.GarbageCollect",
    "berth.builder.v1.BuilderService.Build",
]


def _carries_progress(message: Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    for field in message.fields:
        if _type(field) == PROGRESS:
            return True
        inner = field.message_type
        if (
            inner is not None
            and inner.full_name not in seen
            and _carries_progress(inner, seen | {message.full_name})
        ):
            return True
    return False


@pytest.mark.parametrize("name", LONG_OPERATIONS)
def test_long_operations_stream_the_one_progress_message(name: str) -> None:
    method = next(m for m in methods() if m.full_name == name)
    assert method.server_streaming, f"{name} returns no stream"
    assert _carries_progress(method.output_type), f"{name} reports no Progress"


RETRIED_MUTATIONS = [
    cluster_pb2.RunContainerRequest,
    cluster_pb2.CreateServiceRequest,
    image_pb2.PushImageRequest,
    registry_pb2.StartUploadRequest,
]


@pytest.mark.parametrize("message", RETRIED_MUTATIONS, ids=lambda m: m.DESCRIPTOR.full_name)
def test_retried_mutations_take_a_request_id(message: type) -> None:
    field = message.DESCRIPTOR.fields_by_name.get("request_id")
    assert field is not None and field.type == FieldDescriptor.TYPE_STRING


def test_process_output_is_bytes_with_its_newlines() -> None:
    """Output of a process is `bytes` as written, newline included, wherever it streams (logs,
    exec, attach, build steps); `message` fields are text for people."""
    wrong = [
        f.full_name
        for f in fields()
        if f.name in ("stdout", "stderr", "data", "output")
        and f.type != f.TYPE_BYTES
        and not f.message_type
    ]
    assert wrong == []
