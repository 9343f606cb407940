"""The image commands without an image service: parsing, Docker's lines and tables, archives,
credentials, errors; and the image client's conversions.

A fake image service stands in for ImageClient where a command needs answers.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

import grpc
import pytest
from rich.console import Console

from berth.cli import auth, image_cmds
from berth.cli.image_cmds import (
    catalog_rows,
    docker_image,
    history_rows,
    push_names,
)
from berth.cli.main import build_parser, main
from berth.cli.progress import PUSH, LayerProgress, TransferDisplay
from berth.client.image import (
    CommitProgress,
    Credentials,
    HistoryStep,
    ImageClient,
    ImageDetails,
    ImageSummary,
    LoadResult,
    ProgressEvent,
    PruneResult,
    PullResult,
    PushedImage,
    Removal,
    TransferProgress,
    _details,
    parse_external_reference,
)
from berth.client.node import ImageInfo, PullProgress
from berth.client.registry import BlobInfo, GcProgress, GcReport
from berth.errors import BerthClientError
from berth.image.v1 import image_pb2 as pb
from berth.types.v1 import progress_pb2

from .cli_output import error_line, table

UNREACHABLE = "127.0.0.1:1"  # nothing listens on port 1: connection refused at once
REGISTRY = "127.0.0.1:5000"
IMAGE_ID = "sha256:" + "4f0c2d1b9a8e" + "7" * 52
DIGEST = "sha256:" + "d1" * 32
LAYER_A = "sha256:" + "aaaaaaaaaaaa" + "0" * 52
LAYER_B = "sha256:" + "bbbbbbbbbbbb" + "0" * 52
LAYER_C = "sha256:" + "cccccccccccc" + "0" * 52


@pytest.fixture(autouse=True)
def no_ambient_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the developer's own cluster, node and credentials out of every test."""
    for name in ("BERTH_NODE", "BERTH_HOST", "BERTH_IMAGE", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BERTH_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("BERTH_AUTH_FILE", str(tmp_path / "config" / "auth.json"))
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker"))
    return tmp_path


def details(**changes: Any) -> ImageDetails:
    base = ImageDetails(
        digest=DIGEST,
        id=IMAGE_ID,
        repo_tags=["demo/app:1"],
        repo_digests=[f"demo/app@{DIGEST}"],
        media_type="application/vnd.oci.image.manifest.v1+json",
        manifest=b"{}",
        config={
            "created": "2024-05-01T12:00:00Z",
            "author": "Jo",
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
        },
        layers=[],
        diff_ids=["sha256:" + "e" * 64],
        history=[],
        created=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        size=2_157_000,
        hosts=["n1", "n2"],
        platform="linux/amd64",
        origin="commit",
        origin_detail="web",
    )
    return replace(base, **changes)


def summary(**changes: Any) -> ImageSummary:
    base = ImageSummary(
        repository="demo/app",
        tag="1",
        digest=DIGEST,
        id=IMAGE_ID,
        created=datetime.now(UTC) - timedelta(hours=2, minutes=5),
        size=4_260_000,
        shared_size=0,
        hosts=[],
        containers=0,
    )
    return replace(base, **changes)


# --- an image service without a server --------------------------------------------------------


class FakeImages:
    """Answers like the image service and records what was asked."""

    SERVICE = "image service"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.catalog: list[ImageSummary] = [summary()]
        self.steps: list[HistoryStep] = []
        self.missing: set[str] = set()
        self.events: list[TransferProgress] = []
        self.archive = b"tar bytes"
        self.save_failure: BerthClientError | None = None
        self.uploaded = b""
        self.loaded = LoadResult([details()], ["demo/app:1"])

    def __enter__(self) -> FakeImages:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def _check(self, image: str) -> None:
        if image in self.missing:
            raise BerthClientError(f"no such image: {image}", "NOT_FOUND")

    def images(self, reference: str = "", all: bool = False, dangling: bool = False) -> list:
        self.calls.append(("images", reference, all, dangling))
        return self.catalog

    def inspect(self, image: str) -> ImageDetails:
        self.calls.append(("inspect", image))
        self._check(image)
        return details()

    def history(self, image: str) -> list[HistoryStep]:
        self._check(image)
        return self.steps

    def tag(self, source: str, target: str) -> str:
        self.calls.append(("tag", source, target))
        return DIGEST

    def remove(self, image: str, force: bool = False) -> Removal:
        self.calls.append(("remove", image, force))
        self._check(image)
        return Removal([f"{image}"], [DIGEST, LAYER_A])

    def prune(self, all: bool = False) -> PruneResult:
        self.calls.append(("prune", all))
        return PruneResult([Removal(["old:1"], [DIGEST]), Removal([], [LAYER_A])], 1_234_567)

    def commit(self, container: str, reference: str = "", **options: Any) -> ImageDetails:
        self.calls.append(("commit", container, reference, options))
        progress = options["progress"]
        if progress is not None:
            progress(CommitProgress("export", "running", "node n1 exports the changes"))
            progress(CommitProgress("export", "done", "not shown"))
        return details()

    def import_image(
        self,
        source: str | BinaryIO,
        reference: str,
        message: str,
        changes: list[str],
        source_name: str,
        progress: Callable[[ProgressEvent], None],
    ) -> ImageDetails:
        self.calls.append(("import", reference, message, changes, source_name))
        self.uploaded = _read(source)
        size = len(self.uploaded)
        progress(ProgressEvent("upload", "downloading", size, size, "bytes", ""))
        progress(ProgressEvent("layer", "running", 0, 0, "", "packing"))
        return details()

    def save(
        self, images: list[str], fmt: str, out: BinaryIO, progress: Callable[[int, int], None]
    ) -> int:
        self.calls.append(("save", list(images), fmt))
        out.write(self.archive)
        progress(len(self.archive), len(self.archive))
        if self.save_failure is not None:
            raise self.save_failure
        return len(self.archive)

    def load(
        self, source: str | BinaryIO, reference: str, progress: Callable[[ProgressEvent], None]
    ) -> LoadResult:
        self.calls.append(("load", reference))
        self.uploaded = _read(source)
        return self.loaded

    def pull(
        self,
        image: str,
        credentials: Credentials | None,
        insecure: bool,
        local_reference: str,
        progress: Callable[[TransferProgress], None] | None = None,
    ) -> PullResult:
        self.calls.append(("pull", image, credentials, insecure, local_reference))
        for event in self.events if progress else []:
            progress(event)
        return PullResult(details(), local_reference or str(parse_external_reference(image).name))

    def push(
        self,
        image: str,
        destination: str,
        credentials: Credentials | None,
        insecure: bool,
        progress: Callable[[TransferProgress], None] | None = None,
    ) -> PushedImage:
        self.calls.append(("push", image, destination, credentials, insecure))
        for event in self.events if progress else []:
            progress(event)
        return PushedImage(DIGEST, 527)


def _read(source: str | BinaryIO) -> bytes:
    if isinstance(source, str):
        return Path(source).read_bytes()
    return source.read()


@pytest.fixture
def images(monkeypatch: pytest.MonkeyPatch) -> FakeImages:
    fake = FakeImages()
    monkeypatch.setattr(image_cmds, "ImageClient", lambda address: fake)
    monkeypatch.setenv("BERTH_IMAGE", "fake:1")
    return fake


class FakeNode:
    """The node agent's image calls, for the single-host forms of images, rmi and pull."""

    SERVICE = "node"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __enter__(self) -> FakeNode:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def images(self) -> list[ImageInfo]:
        return [ImageInfo(DIGEST, ["demo/app:1"], IMAGE_ID, [], 1000)]

    def pull(self, image: str, progress: Callable[[PullProgress], None]) -> ImageInfo:
        self.calls.append(("pull", image))
        progress(PullProgress(LAYER_A, "Pull complete", 10, 10))
        return ImageInfo(DIGEST, [image], IMAGE_ID, [], 10)

    def remove_image(self, image: str) -> list[str]:
        self.calls.append(("remove_image", image))
        return [LAYER_A]


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> FakeNode:
    fake = FakeNode()
    monkeypatch.setattr(image_cmds, "NodeClient", lambda address: fake)
    return fake


def stdin_of(monkeypatch: pytest.MonkeyPatch, data: bytes, tty: bool = False) -> None:
    stream = io.TextIOWrapper(io.BufferedReader(io.BytesIO(data)))
    monkeypatch.setattr(stream, "isatty", lambda: tty)
    monkeypatch.setattr(sys, "stdin", stream)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


# --- argument parsing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["images"], {"reference": "", "all": False, "quiet": False, "digests": False}),
        (
            ["images", "-a", "-q", "--digests", "--no-trunc", "--filter", "dangling=true", "x"],
            {
                "reference": "x",
                "all": True,
                "quiet": True,
                "digests": True,
                "no_trunc": True,
                "filter": [("dangling", True)],
            },
        ),
        (["image", "ls", "-f", "dangling=false"], {"filter": [("dangling", False)]}),
        (["image", "list"], {"func": image_cmds.cmd_images}),
        (["image", "inspect", "a", "b"], {"images": ["a", "b"]}),
        (["history", "x"], {"image": "x", "human": True, "no_trunc": False, "quiet": False}),
        (["history", "-H=false", "x"], {"human": False}),
        (["history", "--human=false", "x"], {"human": False}),
        (["history", "--human=true", "x"], {"human": True}),
        (["history", "-H", "x"], {"human": True, "image": "x"}),  # -H takes no value
        (["image", "history", "--no-trunc", "-q", "x"], {"no_trunc": True, "quiet": True}),
        (["tag", "a", "b:2"], {"source": "a", "target": "b:2"}),
        (["rmi", "-f", "a", "b"], {"force": True, "images": ["a", "b"]}),
        (["image", "rm", "a"], {"force": False, "images": ["a"]}),
        (["image", "remove", "a"], {"func": image_cmds.cmd_rmi}),
        (["image", "prune", "-a", "-f"], {"all": True, "force": True}),
        (
            ["commit", "-a", "Jo", "-m", "msg", "-c", 'CMD ["sh"]', "-c", "ENV A=1", "web", "x:1"],
            {
                "author": "Jo",
                "message": "msg",
                "change": ['CMD ["sh"]', "ENV A=1"],
                "pause": True,
                "container": "web",
                "reference": "x:1",
            },
        ),
        (["commit", "--pause=false", "web"], {"pause": False, "reference": ""}),
        (["commit", "-p=false", "web"], {"pause": False}),
        (["commit", "--no-pause", "web"], {"pause": False}),
        (["commit", "-p", "web", "x"], {"pause": True, "container": "web", "reference": "x"}),
        (["import", "-m", "m", "-c", "WORKDIR /app", "-", "x"], {"file": "-", "reference": "x"}),
        (["image", "import", "root.tar"], {"file": "root.tar", "reference": ""}),
        (
            ["save", "a", "b"],
            {"images": ["a", "b"], "archive_format": "docker-archive", "output": None},
        ),
        (
            ["save", "--format", "oci-archive", "-o", "f.tar", "a"],
            {"archive_format": "oci-archive", "output": "f.tar"},
        ),
        (
            ["load", "-i", "f.tar", "-q", "--reference", "x:1"],
            {"input": "f.tar", "quiet": True, "reference": "x:1"},
        ),
        (["image", "load"], {"input": None}),
        (
            ["pull", "--insecure", "--as", "y:2", f"{REGISTRY}/x:1"],
            {"insecure": True, "as_name": "y:2"},
        ),
        (["image", "pull", "x"], {"image": "x", "as_name": ""}),
        (["push", "x:1", f"{REGISTRY}/y:2"], {"image": "x:1", "destination": f"{REGISTRY}/y:2"}),
        (["image", "push", "--insecure", f"{REGISTRY}/x"], {"destination": None, "insecure": True}),
        (
            ["login", "-u", "jo", "--password-stdin", REGISTRY],
            {"username": "jo", "password_stdin": True},
        ),
        (["logout", REGISTRY], {"server": REGISTRY}),
        (["--image-service", "a:1", "images"], {"image_service": "a:1"}),
        (["images", "--image-service", "a:1"], {"image_service": "a:1"}),
        (["rmi", "--node", "n:1", "x"], {"node": "n:1"}),
    ],
)
def test_parsing(argv: list[str], expected: dict[str, Any]) -> None:
    args = parse(*argv)
    assert {key: getattr(args, key) for key in expected} == expected


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["commit", "-c", "RUN rm -rf /", "web"], 'invalid change "RUN rm -rf /"'),
        (["import", "-c", "", "-"], 'invalid change ""'),
        (["images", "--filter", "label=x"], 'invalid filter "label=x"'),
        (["images", "--filter", "dangling=maybe"], "dangling=true or dangling=false"),
        (["images", "-f", "dangling=true", "-f", "dangling=false"], "exclude each other"),
        (["images", f"{REGISTRY}/x"], f"names the external registry {REGISTRY}"),
        (["tag", "x", f"{REGISTRY}/y"], f'drop "{REGISTRY}/"'),
        (["tag", "x", "y@sha256:" + "0" * 64], "has a digest"),
        (["tag", "x", "Y"], 'invalid repository name "Y"'),
        (["commit", "web", "Bad:Name"], 'invalid repository name "Bad"'),
        (["import", "-", "x:-bad"], 'invalid tag "-bad"'),
        (["load", "--reference", f"{REGISTRY}/x", "-i", "f"], "--reference"),
        (["pull", "UPPER"], 'invalid repository name "UPPER"'),
        (["pull", "bad host!/x"], "invalid"),
        (["pull", "127.0.0.1:99999/x"], 'invalid registry host "127.0.0.1:99999"'),
        (["pull", "--as", "y", "x"], "--as and --insecure are for pulls from an external"),
        (["pull", "--as", f"{REGISTRY}/y", f"{REGISTRY}/x"], "--as"),
        (["push", "x:1"], f"berth push x:1 {REGISTRY}/x:1"),
        (["push", "x:1", "y:2"], f"e.g. {REGISTRY}/y:2"),
        (["push", f"{REGISTRY}/x:1", f"{REGISTRY}/y:2"], 'drop "127.0.0.1:5000/"'),
        (["push", f"{REGISTRY}/x@sha256:" + "0" * 64], "reachable by its own digest"),
        (["login", "-u", "jo", "-p", "pw", "not a host"], 'invalid registry "not a host"'),
        (["--image-service", "a:1", "--node", "n:1", "images"], "exclusive"),
        (["history"], "the following arguments are required: IMAGE"),
        (["save", "--format", "tar", "x"], "invalid choice: 'tar'"),
    ],
)
def test_bad_arguments_give_one_error_line(
    argv: list[str], mentions: str, images: FakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    assert mentions in error_line(capsys)
    assert not [c for c in images.calls if c[0] != "inspect"]  # refused before any change


# --- the catalog ------------------------------------------------------------------------------


def test_images_table_like_docker(images: FakeImages, capsys: pytest.CaptureFixture[str]) -> None:
    images.catalog = [
        summary(),
        summary(tag="", id="sha256:" + "f" * 64, size=528),
        summary(repository="", tag="", id="sha256:" + "9" * 64, digest=""),
    ]
    assert main(["images", "-a"]) == 0
    assert table(capsys.readouterr().out) == [
        ["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"],
        ["demo/app", "1", "4f0c2d1b9a8e", "2 hours ago", "4.26MB"],
        ["demo/app", "<none>", "ffffffffffff", "2 hours ago", "528B"],
        ["<none>", "<none>", "999999999999", "2 hours ago", "4.26MB"],
    ]
    assert images.calls[-1] == ("images", "", True, False)

    assert main(["images", "--digests", "--no-trunc", "demo/app:1"]) == 0
    rows = table(capsys.readouterr().out)
    assert rows[0] == ["REPOSITORY", "TAG", "DIGEST", "IMAGE ID", "CREATED", "SIZE"]
    assert rows[1][2:4] == [DIGEST, IMAGE_ID]
    assert rows[3][2] == "<none>"
    assert images.calls[-1] == ("images", "demo/app:1", False, False)


def test_images_quiet_filters_and_json(
    images: FakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    images.catalog = [summary(), summary(tag="", id="sha256:" + "f" * 64)]
    assert main(["images", "-q"]) == 0
    assert capsys.readouterr().out == "4f0c2d1b9a8e\nffffffffffff\n"
    assert main(["images", "-q", "--filter", "dangling=false"]) == 0
    assert capsys.readouterr().out == "4f0c2d1b9a8e\n"
    assert main(["images", "--filter", "dangling=true", "-q"]) == 0
    assert images.calls[-1] == ("images", "", False, True)
    capsys.readouterr()
    assert main(["images", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(i["repository"], i["tag"], i["id"]) for i in data] == [
        ("demo/app", "1", IMAGE_ID),
        ("demo/app", "", "sha256:" + "f" * 64),
    ]
    assert data[0]["created"].endswith("Z")


def test_catalog_rows_at_a_fixed_time() -> None:
    now = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    rows = catalog_rows([summary(created=now - timedelta(days=3), size=999_499)], now=now)
    assert rows == [["demo/app", "1", "4f0c2d1b9a8e", "3 days ago", "999kB"]]
    assert catalog_rows([summary(created=None)], now=now)[0][3] == "-"


def test_images_with_a_node_list_its_cache(
    images: FakeImages, node: FakeNode, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["images", "--node", "n:1"]) == 0
    assert table(capsys.readouterr().out) == [
        ["REPOSITORY", "TAG", "IMAGE ID", "SIZE"],
        ["demo/app", "1", "4f0c2d1b9a8e", "1kB"],
    ]
    assert images.calls == []
    assert main(["images", "--node", "n:1", "-a"]) == 1
    assert "-a: only for the image catalog" in error_line(capsys)


def test_berth_node_means_single_host_unless_an_image_service_is_named(
    images: FakeImages,
    node: FakeNode,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BERTH_NODE", "n:1")
    monkeypatch.delenv("BERTH_IMAGE")
    assert main(["rmi", "demo/app:1"]) == 0
    assert node.calls == [("remove_image", "demo/app:1")]
    assert capsys.readouterr().out == f"Untagged: demo/app:1\nDeleted: {LAYER_A}\n"
    assert main(["--image-service", "fake:1", "rmi", "demo/app:1"]) == 0
    assert images.calls == [("remove", "demo/app:1", False)]
    monkeypatch.setenv("BERTH_IMAGE", "fake:1")
    assert main(["rmi", "demo/app:2"]) == 0
    assert images.calls[-1] == ("remove", "demo/app:2", False)


def test_inspect_is_shaped_like_docker(
    images: FakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    images.missing.add("nope")
    assert main(["image", "inspect", "demo/app:1", "nope"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "Error: no such image: nope\n"
    [data] = json.loads(captured.out)
    assert data == {
        "Id": IMAGE_ID,
        "RepoTags": ["demo/app:1"],
        "RepoDigests": [f"demo/app@{DIGEST}"],
        "Parent": "",
        "Comment": "",
        "Created": "2024-05-01T12:00:00Z",
        "Author": "Jo",
        "Config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
        "Architecture": "amd64",
        "Os": "linux",
        "Size": 2_157_000,
        "RootFS": {"Type": "layers", "Layers": ["sha256:" + "e" * 64]},
        "Hosts": ["n1", "n2"],
        "Origin": {"Type": "commit", "Detail": "web"},
    }


def test_docker_image_falls_back_to_the_platform() -> None:
    step = HistoryStep(LAYER_A, None, "", 1, "my message", False, "")
    data = docker_image(details(config={}, platform="linux/arm64", history=[step], created=None))
    assert (data["Os"], data["Architecture"], data["Config"]) == ("linux", "arm64", {})
    assert (data["Comment"], data["Created"]) == ("my message", "")


def steps() -> list[HistoryStep]:
    t = datetime.now(UTC) - timedelta(hours=3)
    long = "/bin/sh -c #(nop) ADD file:0123456789abcdef0123456789abcdef in / "
    return [
        HistoryStep(LAYER_C, t, "berth commit", 2048, "add the app", False, "Jo"),
        HistoryStep("", t, '/bin/sh -c #(nop)  CMD ["sh"]', 0, "", True, ""),
        HistoryStep(LAYER_A, t, long, 2_157_000, "", False, ""),
    ]


def test_history_rows_truncate_and_mark_steps_without_layers(
    images: FakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    images.steps = steps()
    assert main(["history", "demo/app:1"]) == 0
    assert table(capsys.readouterr().out) == [
        ["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"],
        ["cccccccccccc", "3 hours ago", "berth commit", "2.05kB", "add the app"],
        ["<missing>", "3 hours ago", '/bin/sh -c #(nop)  CMD ["sh"]', "0B"],
        ["aaaaaaaaaaaa", "3 hours ago", "/bin/sh -c #(nop) ADD file:0123456789abcdef0…", "2.16MB"],
    ]
    assert len("/bin/sh -c #(nop) ADD file:0123456789abcdef0…") == 45


def test_history_raw_untruncated_quiet_and_json(
    images: FakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    images.steps = steps()
    when = images.steps[0].created
    assert main(["history", "-H=false", "--no-trunc", "x"]) == 0
    rows = table(capsys.readouterr().out)
    assert rows[1][:2] == [LAYER_C, when.isoformat().replace("+00:00", "Z")]
    assert rows[3][2:4] == [images.steps[2].created_by.strip(), "2157000"]
    assert main(["history", "-q", "x"]) == 0
    assert capsys.readouterr().out == "cccccccccccc\n<missing>\naaaaaaaaaaaa\n"
    assert main(["history", "--format", "json", "x"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(s["layer"], s["comment"], s["empty_layer"]) for s in data][:2] == [
        (LAYER_C, "add the app", False),
        ("", "", True),
    ]


def test_history_rows_unknown_time() -> None:
    step = HistoryStep("", None, "x\ty", 0, "", True, "")
    assert history_rows([step]) == [["<missing>", "-", "x y", "0B", ""]]
    assert history_rows([step], human=False) == [["<missing>", "-", "x y", "0", ""]]


def test_tag_is_silent(images: FakeImages, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tag", "demo/app:1", "demo/app:stable"]) == 0
    assert capsys.readouterr() == ("", "")
    assert images.calls == [("tag", "demo/app:1", "demo/app:stable")]


def test_rmi_lines_and_for_each(images: FakeImages, capsys: pytest.CaptureFixture[str]) -> None:
    images.missing = {"x", "y"}
    assert main(["rmi", "-f", "x", "demo/app:1", "y"]) == 1
    out = f"Untagged: demo/app:1\nDeleted: {DIGEST}\nDeleted: {LAYER_A}\n"
    assert error_line(capsys, out=out) == "Error: no such image: x; no such image: y"
    assert [c[1:] for c in images.calls] == [("x", True), ("demo/app:1", True), ("y", True)]
    assert main(["rmi", "--format", "json", "demo/app:1"]) == 0
    assert json.loads(capsys.readouterr().out) == [
        {"untagged": ["demo/app:1"], "deleted": [DIGEST, LAYER_A]}
    ]


def test_prune_asks_first(
    images: FakeImages, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin_of(monkeypatch, b"")  # no answer: no
    assert main(["image", "prune"]) == 0
    assert capsys.readouterr().out == (
        "WARNING! This will remove all dangling images.\n"
        "Are you sure you want to continue? [y/N] \n"
    )
    assert images.calls == []
    stdin_of(monkeypatch, b"n\n")
    assert main(["image", "prune", "-a"]) == 0
    assert "without at least one container" in capsys.readouterr().out
    assert images.calls == []
    stdin_of(monkeypatch, b"y\n")
    assert main(["image", "prune"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "Are you sure you want to continue? [y/N] Deleted Images:",
        "untagged: old:1",
        f"deleted: {DIGEST}",
        f"deleted: {LAYER_A}",
        "",
        "Total reclaimed space: 1.23MB",
    ]
    assert images.calls == [("prune", False)]


def test_prune_forced_and_json(images: FakeImages, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["image", "prune", "-f", "-a", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reclaimed_bytes"] == 1_234_567
    assert data["removed"][0] == {"untagged": ["old:1"], "deleted": [DIGEST]}
    assert images.calls == [("prune", True)]


# --- making images ----------------------------------------------------------------------------


def test_commit_prints_the_id(images: FakeImages, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["commit", "-a", "Jo", "-m", "msg", "-c", "CMD sh", "--no-pause", "web", "x:1"]
    assert main(argv) == 0
    # stderr is no terminal here: no stage lines, only the id on stdout.
    assert capsys.readouterr() == (IMAGE_ID + "\n", "")
    [(_, container, reference, options)] = images.calls
    assert (container, reference) == ("web", "x:1")
    assert {k: v for k, v in options.items() if k != "progress"} == {
        "author": "Jo",
        "message": "msg",
        "pause": False,
        "changes": ["CMD sh"],
    }
    assert options["progress"] is None
    assert main(["commit", "--format", "json", "web"]) == 0
    assert json.loads(capsys.readouterr().out)["Id"] == IMAGE_ID
    assert images.calls[-1][2] == ""  # an untagged image


def test_commit_shows_stages_on_a_terminal(
    images: FakeImages, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["commit", "web"]) == 0
    out, err = capsys.readouterr()
    assert out == IMAGE_ID + "\n"
    assert "node n1 exports the changes" in err
    assert "not shown" not in err


def test_import_a_file_and_stdin(
    images: FakeImages,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tarball = tmp_path / "rootfs.tar"
    tarball.write_bytes(b"root filesystem")
    assert main(["import", "-m", "from a file", "-c", "WORKDIR /app", str(tarball), "x:1"]) == 0
    assert capsys.readouterr().out == IMAGE_ID + "\n"
    # Only the file's name goes into the history, never the directories above it.
    assert images.calls[-1] == ("import", "x:1", "from a file", ["WORKDIR /app"], "rootfs.tar")
    assert images.uploaded == b"root filesystem"
    stdin_of(monkeypatch, b"piped tarball")
    assert main(["image", "import", "-"]) == 0
    assert images.calls[-1] == ("import", "", "", [], "-")
    assert images.uploaded == b"piped tarball"


def test_import_refuses_a_terminal_on_stdin(
    images: FakeImages, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin_of(monkeypatch, b"", tty=True)
    assert main(["import", "-"]) == 1
    assert "stdin, which is a terminal" in error_line(capsys)


def test_import_of_a_missing_file(images: FakeImages, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["import", "no-such.tar"]) == 1
    assert error_line(capsys) == "Error: No such file or directory: no-such.tar"


# --- archives ---------------------------------------------------------------------------------


def test_save_refuses_a_terminal(
    images: FakeImages, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["save", "demo/app:1"]) == 1
    assert error_line(capsys) == (
        "Error: cowardly refusing to save to a terminal. Use the -o flag or redirect"
    )
    assert images.calls == []


def test_save_to_stdout(images: FakeImages, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    assert main(["save", "--format", "oci-archive", "a", "b"]) == 0
    assert capsysbinary.readouterr() == (b"tar bytes", b"")
    assert images.calls == [("save", ["a", "b"], "oci-archive")]


def test_save_to_a_file_is_atomic(
    images: FakeImages, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "out" / "images.tar"
    target.parent.mkdir()
    assert main(["save", "-o", str(target), "demo/app:1"]) == 0
    assert target.read_bytes() == b"tar bytes"
    assert capsys.readouterr() == ("", "")

    # A save that breaks half-way leaves the old file as it was and no temporary file.
    images.archive = b"half an arch"
    images.save_failure = BerthClientError("stream broke", "UNAVAILABLE")
    assert main(["save", "-o", str(target), "demo/app:1"]) == 1
    assert error_line(capsys) == "Error: stream broke"
    assert target.read_bytes() == b"tar bytes"
    assert [p.name for p in target.parent.iterdir()] == ["images.tar"]

    fresh = tmp_path / "out" / "new.tar"
    assert main(["save", "-o", str(fresh), "demo/app:1"]) == 1
    assert not fresh.exists()
    assert [p.name for p in target.parent.iterdir()] == ["images.tar"]
    capsys.readouterr()

    nowhere = tmp_path / "no-dir" / "x.tar"
    assert main(["save", "-o", str(nowhere), "demo/app:1"]) == 1
    assert error_line(capsys) == f"Error: No such file or directory: {nowhere}"


def test_load_from_a_file_and_stdin(
    images: FakeImages,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    archive = tmp_path / "a.tar"
    archive.write_bytes(b"archive")
    unnamed = details(id="sha256:" + "5" * 64, repo_tags=[])
    images.loaded = LoadResult([details(), unnamed], ["demo/app:1"])
    assert main(["load", "-i", str(archive)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Loaded image: demo/app:1",
        "Loaded image ID: sha256:" + "5" * 64,
    ]
    assert images.uploaded == b"archive"
    stdin_of(monkeypatch, b"piped archive")
    assert main(["image", "load", "-q", "--reference", "named:2", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["references"] == ["demo/app:1"]
    assert [i["Id"] for i in data["images"]] == [IMAGE_ID, "sha256:" + "5" * 64]
    assert images.calls[-1] == ("load", "named:2")
    assert images.uploaded == b"piped archive"


def test_load_refuses_a_terminal_on_stdin(
    images: FakeImages, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin_of(monkeypatch, b"", tty=True)
    assert main(["load"]) == 1
    assert "requested load from stdin, but stdin is a terminal" in error_line(capsys)
    assert images.calls == []


# --- pull and push ----------------------------------------------------------------------------


def progress(digest: str, *states: str, total: int = 100) -> list[TransferProgress]:
    return [TransferProgress(digest, state, total // 2, total) for state in states]


def test_pull_from_an_external_registry(
    images: FakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    images.events = [
        *progress(LAYER_A, "Waiting", "Downloading", "Verifying Checksum", "Pull complete"),
        *progress(LAYER_B, "Already exists"),
    ]
    assert main(["pull", f"{REGISTRY}/demo/app:1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "1: Pulling from demo/app",
        "aaaaaaaaaaaa: Pull complete",
        "bbbbbbbbbbbb: Already exists",
        f"Digest: {DIGEST}",
        f"Status: Downloaded newer image for {REGISTRY}/demo/app:1",
        "demo/app:1",
    ]
    assert images.calls == [
        ("inspect", "demo/app:1"),  # what the local name named before
        ("pull", f"{REGISTRY}/demo/app:1", None, False, ""),
    ]


def test_pull_of_what_berth_has_is_up_to_date(
    images: FakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    images.events = progress(LAYER_A, "Waiting", "Already exists")
    assert main(["pull", "--insecure", "--as", "mine/app", f"{REGISTRY}/demo/app"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Using default tag: latest",
        "latest: Pulling from demo/app",
        "aaaaaaaaaaaa: Already exists",
        f"Digest: {DIGEST}",
        f"Status: Image is up to date for {REGISTRY}/demo/app:latest",
        "mine/app",
    ]
    assert images.calls == [
        ("inspect", "mine/app:latest"),
        ("pull", f"{REGISTRY}/demo/app", None, True, "mine/app"),
    ]
    assert main(["--format", "json", "pull", f"{REGISTRY}/demo/app@{DIGEST}"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["local_reference"], data["image"]["Id"]) == (f"demo/app@{DIGEST}", IMAGE_ID)


def test_pull_under_a_new_name_is_newer_even_when_no_byte_moved(
    images: FakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    images.events = progress(LAYER_A, "Waiting", "Already exists")
    images.missing.add("fresh/app:latest")
    assert main(["pull", "--as", "fresh/app", f"{REGISTRY}/demo/app"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"Status: Downloaded newer image for {REGISTRY}/demo/app:latest" in out


def test_pull_sends_stored_credentials(
    images: FakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    auth.save_credentials(REGISTRY, "jo", "s3cret:x")
    assert main(["pull", f"{REGISTRY}/x:1"]) == 0
    assert images.calls[-1][2] == Credentials("jo", "s3cret:x")


def test_pull_without_a_host_asks_the_catalog(
    images: FakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pull", "demo/app:1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"Digest: {DIGEST}",
        "Status: Image is up to date for demo/app:1",
    ]
    assert images.calls == [("inspect", "demo/app:1")]
    images.missing.add("x")
    assert main(["pull", "x"]) == 1
    assert error_line(capsys) == (
        "Error: x:latest is not in berth's registry; pull it from an external registry by "
        f"naming its host, e.g. {REGISTRY}/x"
    )


def test_pull_onto_a_node(
    images: FakeImages,
    node: FakeNode,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BERTH_IMAGE")
    monkeypatch.setenv("BERTH_NODE", "n:1")
    assert main(["pull", "demo/app"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Using default tag: latest",
        "latest: Pulling from demo/app",
        "aaaaaaaaaaaa: Pull complete",
        f"Digest: {DIGEST}",
        "Status: Downloaded newer image for demo/app:latest",
    ]
    assert node.calls == [("pull", "demo/app")]
    # A name with a host is never a node's business: it goes to the image service (none is
    # configured here).
    assert main(["pull", f"{REGISTRY}/x:1"]) == 1
    assert "pass --image-service HOST:PORT" in error_line(capsys)
    assert node.calls == [("pull", "demo/app")]
    assert main(["pull", "--node", "n:1", f"{REGISTRY}/x:1"]) == 1
    assert "a node pulls only from berth's registry" in error_line(capsys)


def test_push_to_the_same_name(images: FakeImages, capsys: pytest.CaptureFixture[str]) -> None:
    images.events = [
        *progress(LAYER_A, "Waiting", "Pushing", "Pushed"),
        *progress(LAYER_B, "Layer already exists"),
        *progress(LAYER_C, "Mounted from another repository"),
    ]
    assert main(["push", f"{REGISTRY}/demo/app:1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"The push refers to repository [{REGISTRY}/demo/app]",
        "aaaaaaaaaaaa: Pushed",
        "bbbbbbbbbbbb: Layer already exists",
        "cccccccccccc: Mounted from another repository",
        f"1: digest: {DIGEST} size: 527",
    ]
    assert images.calls == [("push", "demo/app:1", f"{REGISTRY}/demo/app:1", None, False)]


def test_push_hides_the_config_and_names_the_mount_source(
    images: FakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    images.events = [
        TransferProgress(LAYER_A, "Pushed", 10, 10, config=True),
        TransferProgress(LAYER_C, "Mounted from another repository", 10, 10, mounted_from="a/b"),
    ]
    assert main(["push", f"{REGISTRY}/demo/app:1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"The push refers to repository [{REGISTRY}/demo/app]",
        "cccccccccccc: Mounted from a/b",
        f"1: digest: {DIGEST} size: 527",
    ]


def test_push_to_another_name(images: FakeImages, capsys: pytest.CaptureFixture[str]) -> None:
    auth.save_credentials(REGISTRY, "jo", "pw")
    assert main(["push", "--insecure", "demo/app:1", f"{REGISTRY}/other/app:2"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"The push refers to repository [{REGISTRY}/other/app]",
        f"2: digest: {DIGEST} size: 527",
    ]
    assert images.calls[-1] == (
        "push",
        "demo/app:1",
        f"{REGISTRY}/other/app:2",
        Credentials("jo", "pw"),
        True,
    )
    assert main(["--format", "json", "push", "demo/app:1", f"{REGISTRY}/other/app"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "destination": f"{REGISTRY}/other/app:1",
        "digest": DIGEST,
        "size": 527,
    }


@pytest.mark.parametrize(
    ("image", "destination", "source", "target"),
    [
        (f"{REGISTRY}/x", None, "x", f"{REGISTRY}/x:latest"),
        ("x:1", f"{REGISTRY}/y", "x:1", f"{REGISTRY}/y:1"),
        ("x", f"{REGISTRY}/y", "x", f"{REGISTRY}/y:latest"),
        ("sha256:" + "4" * 64, f"{REGISTRY}/y", "sha256:" + "4" * 64, f"{REGISTRY}/y:latest"),
        (f"x@{DIGEST}", "localhost/y:3", f"x@{DIGEST}", "localhost/y:3"),
    ],
)
def test_push_names(image: str, destination: str | None, source: str, target: str) -> None:
    got_source, got_target = push_names(image, destination)
    assert (got_source, str(got_target)) == (source, target)


def test_transfer_display_on_a_terminal() -> None:
    """Live lines take every event and end as the final states."""
    out = Console(file=io.StringIO(), force_terminal=True, width=120)
    with LayerProgress(out, "Pushing") as display:
        lines = TransferDisplay(display, PUSH)
        for event in progress(LAYER_A, "Waiting", "Pushing", "Pushed"):
            lines.update(event.digest, event.state, event.current, event.total)
        lines.update(LAYER_B, "Layer already exists", 0, 0)
        lines.update("", "Pushing", 0, 0)  # no digest: nothing to show
    assert lines.copied
    text = out.file.getvalue()
    assert "aaaaaaaaaaaa: Pushed" in text
    assert "bbbbbbbbbbbb: Layer already exists" in text


def test_transfer_display_without_copies() -> None:
    out = Console(file=io.StringIO(), force_terminal=False)
    with LayerProgress(out, "Pushing") as display:
        lines = TransferDisplay(display, PUSH)
        lines.update(LAYER_A, "Waiting", 0, 10)
        lines.update(LAYER_A, "Layer already exists", 0, 10)
    assert not lines.copied
    assert out.file.getvalue() == "aaaaaaaaaaaa: Layer already exists\n"


# --- credentials ------------------------------------------------------------------------------


def test_login_stores_docker_shaped_credentials_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin_of(monkeypatch, b"pa:ss\n")
    assert main(["login", "-u", "jo", "--password-stdin", f"http://{REGISTRY}/"]) == 0
    assert capsys.readouterr() == (
        f"Credentials saved for {REGISTRY} (checked at the next pull or push)\n",
        "",
    )
    path = tmp_path / "config" / "auth.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entry = json.loads(path.read_text())["auths"][REGISTRY]
    assert base64.b64decode(entry["auth"]) == b"jo:pa:ss"
    assert auth.lookup(REGISTRY) == Credentials("jo", "pa:ss")
    assert [p.name for p in path.parent.iterdir()] == ["auth.json"]  # no temporary left


def test_login_with_a_password_flag_warns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["login", "-u", "jo", "-p", "pw", "localhost:5000"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("Credentials saved for localhost:5000")
    assert err == "WARNING! Using --password via the CLI is insecure. Use --password-stdin.\n"
    assert auth.lookup("localhost:5000") == Credentials("jo", "pw")


@pytest.mark.parametrize(
    ("argv", "mentions"),
    [
        (["login", REGISTRY], "Cannot perform an interactive login from a non TTY device"),
        (["login", "--password-stdin", REGISTRY], "Must provide --username"),
        (["login", "-u", "jo", "-p", "x", "--password-stdin", REGISTRY], "mutually exclusive"),
        (["login", "-u", "jo", "-p", "", REGISTRY], "needs a username and a password"),
    ],
)
def test_login_refusals(
    argv: list[str],
    mentions: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stdin_of(monkeypatch, b"")
    assert main(argv) == 1
    assert mentions in capsys.readouterr().err
    assert not (tmp_path / "config" / "auth.json").exists()


def test_logout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    auth.save_credentials(REGISTRY, "jo", "pw")
    auth.save_credentials("other.example:443", "a", "b")
    assert main(["logout", REGISTRY]) == 0
    assert main(["logout", REGISTRY]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"Removing login credentials for {REGISTRY}",
        f"Not logged in to {REGISTRY}",
    ]
    assert auth.lookup(REGISTRY) is None
    assert auth.lookup("other.example:443") == Credentials("a", "b")


def test_lookup_falls_back_to_dockers_config(tmp_path: Path) -> None:
    docker = tmp_path / "docker"
    docker.mkdir()
    token = base64.b64encode(b"dj:dpw").decode()
    (docker / "config.json").write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": token},
                    REGISTRY: {"auth": token},
                    "https://ghcr.example": {"identitytoken": "refresh"},
                    "helper.example": {},  # a credential helper's placeholder
                },
                "credsStore": "desktop",
            }
        )
    )
    assert auth.lookup("docker.io") == Credentials("dj", "dpw")
    assert auth.lookup("ghcr.example") == Credentials(identity_token="refresh")
    assert auth.lookup("helper.example") is None
    assert auth.lookup("nowhere.example") is None
    assert auth.lookup(REGISTRY) == Credentials("dj", "dpw")
    auth.save_credentials(REGISTRY, "berth", "bpw")  # berth's own file comes first
    assert auth.lookup(REGISTRY) == Credentials("berth", "bpw")
    # The Docker file is only read.
    assert "berth" not in (docker / "config.json").read_text()


def test_unreadable_credentials_name_the_file(
    tmp_path: Path, images: FakeImages, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "config" / "auth.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"auths": {REGISTRY: {"auth": "not base64!"}}}))
    assert main(["pull", f"{REGISTRY}/x"]) == 1
    line = error_line(capsys)
    assert str(path) in line
    assert f"berth login {REGISTRY}" in line
    path.write_text("[]")
    assert main(["pull", f"{REGISTRY}/x"]) == 1
    assert "is not a credentials file" in error_line(capsys)


def test_auth_file_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert auth.auth_file() == tmp_path / "config" / "auth.json"
    monkeypatch.delenv("BERTH_AUTH_FILE")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert auth.auth_file() == tmp_path / "xdg" / "berth" / "auth.json"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert auth.auth_file() == tmp_path / "home" / ".config" / "berth" / "auth.json"


# --- addresses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["--image-service", UNREACHABLE, "images"],
        ["history", "--image-service", UNREACHABLE, "x"],
        ["--image-service", UNREACHABLE, "image", "inspect", "a", "b"],
        ["--image-service", UNREACHABLE, "rmi", "a", "b"],
    ],
)
def test_unreachable_image_service(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    line = error_line(capsys)
    assert f"cannot reach the image service at {UNREACHABLE}" in line
    assert "--image-service or BERTH_IMAGE" in line


def test_no_image_service_configured_says_how_to_get_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["images"]) == 1
    line = error_line(capsys)
    assert "pass --image-service HOST:PORT, set BERTH_IMAGE" in line
    assert "berthd up" in line


# --- the client's conversions -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "name"),
    [
        ("x", None, "x"),
        ("demo/app:1", None, "demo/app:1"),
        (f"{REGISTRY}/x:1", REGISTRY, "x:1"),
        ("localhost/a/b", "localhost", "a/b"),
        ("registry.example.com/a@" + DIGEST, "registry.example.com", "a@" + DIGEST),
        ("[::1]:5000/x", "[::1]:5000", "x"),
    ],
)
def test_parse_external_reference(text: str, host: str | None, name: str) -> None:
    reference = parse_external_reference(text)
    assert (reference.host, str(reference.name), str(reference)) == (host, name, text)


def detail_message() -> pb.ImageDetail:
    message = pb.ImageDetail(
        digest=DIGEST,
        id=IMAGE_ID,
        repo_tags=["demo/app:1"],
        config=b'{"os": "linux", "config": {"Cmd": ["sh"]}}',
        diff_ids=["sha256:" + "e" * 64],
        size=10,
        platform="linux/amd64",
        origin="pull",
    )
    message.layers.add(media_type="application/x", digest=LAYER_A, size=7)
    step = message.history.add(layer=LAYER_A, created_by="ADD", size=7, author="Jo")
    step.created_at.FromDatetime(datetime(2024, 5, 1, tzinfo=UTC))
    message.history.add(empty_layer=True, comment="c")
    return message


def test_details_from_the_message() -> None:
    image = _details(detail_message())
    assert image.config == {"os": "linux", "config": {"Cmd": ["sh"]}}
    assert image.layers[0].digest == LAYER_A
    assert image.history[0].created == datetime(2024, 5, 1, tzinfo=UTC)
    assert image.history[1] == HistoryStep("", None, "", 0, "c", True, "")
    assert image.created is None
    assert (image.platform, image.origin) == ("linux/amd64", "pull")


def test_details_with_a_broken_config() -> None:
    message = detail_message()
    message.config = b"[1, 2]"
    with pytest.raises(BerthClientError, match="config that is not a JSON object"):
        _details(message)
    message.config = b""
    assert _details(message).config == {}


class _Cancelled(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED

    def details(self) -> str:
        return "Locally cancelled by application!"

    def trailing_metadata(self) -> tuple:
        return ()


class _Call:
    """A stand-in for a bidirectional call: consumes the requests on its own thread, as gRPC
    does, answers with the bytes received so far and then the result, and reports a
    cancellation as gRPC's call iterator does."""

    def __init__(self, requests: Iterator[Any]) -> None:
        self.sent: list[Any] = []
        self.cancelled = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._consume, args=(requests,))
        self._thread.start()

    def _consume(self, requests: Iterator[Any]) -> None:
        for request in requests:
            if self.cancelled.is_set():
                break
            self.sent.append(request)
        self._done.set()

    def cancel(self) -> bool:
        self.cancelled.set()
        return True

    def __iter__(self) -> Iterator[pb.ImportImageResponse]:
        self._done.wait()
        if self.cancelled.is_set():
            raise _Cancelled()
        received = sum(len(r.data) for r in self.sent)
        upload = progress_pb2.Progress(
            id="upload",
            state=progress_pb2.PROGRESS_STATE_DOWNLOADING,
            current=received,
            unit=progress_pb2.PROGRESS_UNIT_BYTES,
        )
        yield pb.ImportImageResponse(progress=upload)
        yield pb.ImportImageResponse(image=detail_message())


class _Method:
    def __init__(self) -> None:
        self.call: _Call | None = None

    def __call__(self, requests: Iterator[Any]) -> _Call:
        self.call = _Call(requests)
        return self.call


class _FailingReader(io.RawIOBase):
    """Two good megabytes, then a read error, as a failing disk or a broken pipe gives."""

    def __init__(self) -> None:
        self.reads = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self.reads += 1
        if self.reads > 2:
            raise OSError(5, "Input/output error")
        buffer[:] = b"x" * len(buffer)
        return len(buffer)


def test_import_upload_sends_options_then_chunks() -> None:
    client = ImageClient(UNREACHABLE)
    method = _Method()
    client._stub.ImportImage = method  # type: ignore[attr-defined]
    seen: list[ProgressEvent] = []
    data = io.BytesIO(b"y" * ((1 << 20) + 5))
    image = client.import_image(data, "x:1", "m", ["CMD sh"], "-", seen.append)
    assert image.id == IMAGE_ID
    first, *chunks = method.call.sent
    assert first.WhichOneof("content") == "options"
    options = first.options
    assert (options.reference, options.message, list(options.changes), options.source) == (
        "x:1",
        "m",
        ["CMD sh"],
        "-",
    )
    assert {c.WhichOneof("content") for c in chunks} == {"data"}
    assert [len(c.data) for c in chunks] == [1 << 20, 5]
    # The service's count of bytes received, with the file's size the service cannot know.
    assert seen == [
        ProgressEvent("upload", "downloading", (1 << 20) + 5, (1 << 20) + 5, "bytes", "")
    ]
    client.close()


def test_a_failed_read_cancels_the_upload_and_is_raised() -> None:
    """The server must never take the part sent before a read error for the whole archive."""
    client = ImageClient(UNREACHABLE)
    method = _Method()
    client._stub.LoadImages = method  # type: ignore[attr-defined]
    with pytest.raises(OSError, match="Input/output error"):
        client.load(io.BufferedReader(_FailingReader(), 1 << 20), "x:1")
    assert method.call.cancelled.is_set()
    client.close()


def test_a_missing_file_fails_before_any_call(tmp_path: Path) -> None:
    client = ImageClient(UNREACHABLE)
    method = _Method()
    client._stub.ImportImage = method  # type: ignore[attr-defined]
    with pytest.raises(FileNotFoundError):
        client.import_image(tmp_path / "none.tar")
    assert method.call is None
    client.close()


def test_save_rejects_an_unknown_format() -> None:
    with ImageClient(UNREACHABLE) as client, pytest.raises(BerthClientError, match="oci-archive"):
        client.save(["x"], "tar", io.BytesIO())


# --- registry gc --------------------------------------------------------------------------------


class FakeRegistry:
    """A registry that garbage-collects, reporting both stages as it goes."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __enter__(self) -> FakeRegistry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    def garbage_collect(
        self,
        dry_run: bool = False,
        grace_seconds: float | None = None,
        progress: Callable[[GcProgress], None] | None = None,
    ) -> GcReport:
        self.calls.append(("gc", dry_run, grace_seconds, progress is not None))
        if progress is not None:
            progress(GcProgress("mark", 3, 3, True))
            progress(GcProgress("sweep", 5, 5, True))
        return GcReport([BlobInfo(LAYER_A, 2_000_000)], 2_000_000, 3, 1)


def test_registry_gc_reports_what_went(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from berth.cli import registry_cmds

    fake = FakeRegistry()
    monkeypatch.setattr(registry_cmds, "RegistryClient", lambda address: fake)
    monkeypatch.setenv("BERTH_REGISTRY", "fake:1")
    assert main(["registry", "gc", "--grace", "10m"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "Deleted blobs:",
        f"deleted: {LAYER_A} (2MB)",
        "",
        "Total reclaimed space: 2MB",
        "Kept 3 referenced blobs and 1 unreferenced blobs younger than the grace period",
    ]
    assert err == ""  # stage lines only on a terminal
    assert fake.calls == [("gc", False, 600, True)]
    assert main(["registry", "gc", "--dry-run", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["reclaimed_bytes"], data["dry_run"]) == (2_000_000, True)
    assert fake.calls[-1] == ("gc", True, None, False)  # no --grace: the server's default
    assert main(["registry", "gc", "--grace", "0s", "--format", "json"]) == 0
    assert fake.calls[-1] == ("gc", False, 0, False)  # 0 means 0
