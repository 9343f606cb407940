"""The image service's contract over gRPC, without nodes: a `berthd image` process over a
registry, driven through the typed client and the generated stubs.

Pages of ListImages and their tokens, progress streamed by import, load, save, pull and push
(berth.types.v1.Progress in a oneof with the result), PushImage's request_id, and the reasons
and metadata of the errors a program branches on.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from berth.client import ImageClient, RegistryClient
from berth.client.image import ProgressEvent, TransferProgress
from berth.errors import BerthClientError, from_rpc_error
from berth.image.v1 import image_pb2 as pb
from berth.image.v1 import image_pb2_grpc
from berth.tls import secure_channel
from berth.types.v1 import progress_pb2

from .conftest import ServiceProcess, Services
from .docker_registry import DockerRegistry
from .images import push_image, tar_of

pytestmark = pytest.mark.integration


@pytest.fixture
def image_service(services: Services, registry: ServiceProcess, tmp_path: Path) -> ServiceProcess:
    return services.start("image", f"--data-dir={tmp_path / 'image'}")


@pytest.fixture
def images(image_service: ServiceProcess) -> Iterator[ImageClient]:
    with ImageClient(image_service.address) as client:
        yield client


@pytest.fixture
def stub(image_service: ServiceProcess) -> Iterator[image_pb2_grpc.ImageServiceStub]:
    with secure_channel(image_service.address) as channel:
        yield image_pb2_grpc.ImageServiceStub(channel)


def test_an_unknown_image_says_so_with_its_reason(images: ImageClient, busybox: str) -> None:
    with pytest.raises(BerthClientError) as missing:
        images.inspect("test/nothing:1")
    assert missing.value.code == "NOT_FOUND"
    assert missing.value.reason == "IMAGE_NOT_FOUND"
    assert missing.value.metadata == {"image": "test/nothing:1"}
    details = missing.value.details
    assert (details.resource_type, details.resource_name) == ("image", "test/nothing:1")
    with pytest.raises(BerthClientError) as bad:
        images.inspect("Bad:Name")
    assert (bad.value.code, bad.value.reason) == ("INVALID_ARGUMENT", "INVALID_REFERENCE")
    assert bad.value.details.field_violations[0][0] == "image"


def test_list_images_pages_and_a_token_belongs_to_its_filters(
    images: ImageClient,
    stub: image_pb2_grpc.ImageServiceStub,
    client: RegistryClient,
    tmp_path: Path,
) -> None:
    for n in range(5):
        push_image(client, f"test/img{n}", "1", [tar_of({"n": str(n).encode()})], tmp_path)
    everything = [(i.repository, i.tag) for i in images.images()]
    assert len(everything) == 5
    paged, token = [], ""
    while True:
        page = stub.ListImages(pb.ListImagesRequest(page_size=2, page_token=token))
        assert len(page.images) <= 2
        paged += [(i.repository, i.tag) for i in page.images]
        token = page.next_page_token
        if not token:
            break
    assert paged == everything
    first = stub.ListImages(pb.ListImagesRequest(page_size=2))
    for request in (
        pb.ListImagesRequest(all=True, page_size=2, page_token=first.next_page_token),
        pb.ListImagesRequest(page_token="not a token"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            stub.ListImages(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        error = from_rpc_error(err.value, address="image", service="image service")
        assert error.reason == "INVALID_PAGE_TOKEN"
        assert error.details.field_violations[0][0] == "page_token"


def test_import_streams_progress_while_the_bytes_arrive(
    images: ImageClient, stub: image_pb2_grpc.ImageServiceStub
) -> None:
    tarball = tar_of({"big": b"x" * (3 << 20), "small": b"hello\n"})
    events: list[ProgressEvent] = []
    image = images.import_image(
        io.BytesIO(tarball), "test/imported:1", source_name="t.tar", progress=events.append
    )
    assert image.repo_tags == ["test/imported:1"]
    upload = [e for e in events if e.id == "upload"]
    assert [e.state for e in upload][-1] == "done"
    assert upload[-1].current == len(tarball)
    # Bytes are counted as they arrive, not only once the client is done.
    assert len([e for e in upload if e.state == "downloading"]) >= 3
    assert all(e.total == len(tarball) for e in upload)
    assert [e.state for e in events if e.id == "layer"] == ["running", "done"]

    # Options come first, and only first.
    def requests() -> Iterator[pb.ImportImageRequest]:
        yield pb.ImportImageRequest(data=b"bytes before the options")

    with pytest.raises(grpc.RpcError) as err:
        list(stub.ImportImage(requests()))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "options" in err.value.details()


def test_save_then_load_stream_their_progress(
    images: ImageClient, stub: image_pb2_grpc.ImageServiceStub, busybox: str
) -> None:
    replies = list(stub.SaveImages(pb.SaveImagesRequest(images=[busybox])))
    first, *chunks = replies
    assert first.WhichOneof("content") == "progress"
    assert first.progress.unit == progress_pb2.PROGRESS_UNIT_BYTES
    archive = b"".join(c.data for c in chunks)
    assert {c.WhichOneof("content") for c in chunks} == {"data"}
    assert first.progress.total == len(archive)

    events: list[ProgressEvent] = []
    loaded = images.load(io.BytesIO(archive), progress=events.append)
    assert loaded.references == [busybox]
    assert [e for e in events if e.id == "upload"][-1] == ProgressEvent(
        "upload", "done", len(archive), len(archive), "bytes", ""
    )
    stored = [e for e in events if e.id == "images"]
    assert stored[-1] == ProgressEvent("images", "done", 1, 1, "items", "")


def test_pull_and_push_stream_blob_progress_and_a_push_is_done_once_per_request_id(
    images: ImageClient,
    stub: image_pb2_grpc.ImageServiceStub,
    busybox: str,
    docker_registry: DockerRegistry,
) -> None:
    destination = f"{docker_registry.address}/once/busybox:1"
    request = pb.PushImageRequest(image=busybox, destination=destination, request_id="push-1")
    first = list(stub.PushImage(request))
    kinds = [r.WhichOneof("event") for r in first]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"progress"}
    config = [r.progress for r in first[:-1] if r.progress.id.startswith("config:")]
    assert config and config[-1].state == progress_pb2.PROGRESS_STATE_DONE
    # The same request_id again: the first push's result, and nothing pushed (no progress).
    again = list(stub.PushImage(request))
    assert [r.WhichOneof("event") for r in again] == ["result"]
    assert again[0].result == first[-1].result

    seen: list[TransferProgress] = []
    pulled = images.pull(destination, local_reference="back/busybox:1", progress=seen.append)
    assert pulled.image.digest == first[-1].result.digest
    layers = {e.digest for e in seen if not e.config}
    assert len(layers) == 1
    # berth's registry holds every blob already: linked into the new name, not downloaded.
    assert {e.state for e in seen if not e.config} >= {"Waiting", "Already exists"}

    with pytest.raises(BerthClientError) as unknown:
        images.pull(f"{docker_registry.address}/no/such:1")
    assert (unknown.value.code, unknown.value.reason) == ("NOT_FOUND", "REGISTRY_NOT_FOUND")
    assert unknown.value.metadata["host"] == docker_registry.address
