"""Tests for berthd.common.oci.manifest and berthd.common.oci.mediatypes."""

from __future__ import annotations

import base64
import gzip
import json
from typing import Any

import pytest

from berthd.common.errors import InvalidArgument, ResourceExhausted
from berthd.common.oci import mediatypes as mt
from berthd.common.oci.digest import digest_bytes
from berthd.common.oci.manifest import (
    MAX_MANIFEST_BYTES,
    Descriptor,
    ImageConfig,
    ParsedManifest,
    build_image_manifest,
    check_config_matches,
    encode_json,
    parse_image_config,
    parse_manifest,
)

# --- Real content, byte for byte: `umoci init/new/insert/config`, then
# `skopeo copy --format v2s2 oci:img:v1 dir:d2`. umoci omits "mediaType" in its manifests and,
# like any Go json.Encoder, ends its documents with a newline (which is part of the digest).
LAYER_GZ = base64.b64decode(
    "H4sIAAAJbogA/8pIzcnJ1yupKGGgHTAwMDAwMzEB0wYGBug0SJbB0NTYwMjU2NTYzJTBwNDQ0NCYQcEAYQTtQGlx"
    "SWIRgwHFdqF5CllqMIOM1JycfC4AAAAA//8DAMTAVt4GAgAA"
)
LAYER_DIGEST = "sha256:93360f7ee81652c15b441e69285df809555b9a5ca0cd4255694c8455ccb0328b"
DIFF_ID = "sha256:d4a2e695c24c1a774a5b2a4e5889890f18a7b0354d9b99fb38dd9af4ce2a7701"
CONFIG_DIGEST = "sha256:d29e1ee88bb7134b79416c09bd7683776ac44ea6314d67538ca2464676b2bf28"
UMOCI_CONFIG = (
    b'{"created":"2026-11-28T11:28:53.114118995Z","architecture":"amd64","os":"linux",'
    b'"config":{"Env":["PATH=/usr/bin"],"Cmd":["/bin/sh"]},"rootfs":{"type":"layers",'
    b'"diff_ids":["' + DIFF_ID.encode() + b'"]},"history":[{"created":'
    b'"2026-11-28T11:28:53.121692476Z","created_by":"umoci insert"},{"created":'
    b'"2026-11-28T11:28:53.129736668Z","created_by":"umoci config","empty_layer":true}]}\n'
)
MANIFEST_DIGEST = "sha256:1dbd571995ac038c692c255855667f4f53683f335802f5ab9ce73ff5277f962d"
UMOCI_MANIFEST = (
    b'{"schemaVersion":2,"config":{"mediaType":"application/vnd.oci.image.config.v1+json",'
    b'"digest":"' + CONFIG_DIGEST.encode() + b'","size":425},"layers":[{"mediaType":'
    b'"application/vnd.oci.image.layer.v1.tar+gzip","digest":"' + LAYER_DIGEST.encode() + b'",'
    b'"size":102}]}\n'
)
UMOCI_INDEX = (
    b'{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json",'
    b'"digest":"' + MANIFEST_DIGEST.encode() + b'","size":345,"annotations":'
    b'{"org.opencontainers.image.ref.name":"v1"}}]}\n'
)
SKOPEO_V2S2_MANIFEST = (
    b'{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",'
    b'"config":{"mediaType":"application/vnd.docker.container.image.v1+json","size":425,'
    b'"digest":"' + CONFIG_DIGEST.encode() + b'"},"layers":[{"mediaType":'
    b'"application/vnd.docker.image.rootfs.diff.tar.gzip","size":102,"digest":"'
    + LAYER_DIGEST.encode()
    + b'"}]}'
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64
EMPTY_JSON_DIGEST = "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def desc(digest: str = D1, media_type: str = mt.OCI_LAYER_TAR_GZIP, size: int = 10) -> dict:
    return {"mediaType": media_type, "digest": digest, "size": size}


def image(**overrides: Any) -> dict:
    """A valid OCI image manifest as a dict; overrides replace keys, None deletes them."""
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_IMAGE_MANIFEST,
        "config": desc(D1, mt.OCI_IMAGE_CONFIG),
        "layers": [desc(D2), desc(D3)],
    }
    return _apply(doc, overrides)


def config_doc(**overrides: Any) -> dict:
    doc = {
        "architecture": "arm64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [D1, D2]},
    }
    return _apply(doc, overrides)


def _apply(doc: dict, overrides: dict) -> dict:
    for key, value in overrides.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def dump(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def error_of(exc: type[Exception], fn: Any, *args: Any) -> str:
    with pytest.raises(exc) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- real content from umoci and skopeo


def test_real_blobs_are_consistent():
    """The fixtures are what the tools wrote: digests tie manifest, config and layer together."""
    assert digest_bytes(UMOCI_MANIFEST) == MANIFEST_DIGEST
    assert len(UMOCI_MANIFEST) == 345
    assert digest_bytes(UMOCI_CONFIG) == CONFIG_DIGEST
    assert len(UMOCI_CONFIG) == 425
    assert digest_bytes(LAYER_GZ) == LAYER_DIGEST
    assert digest_bytes(gzip.decompress(LAYER_GZ)) == DIFF_ID


@pytest.mark.parametrize("declared", [None, "", mt.OCI_IMAGE_MANIFEST])
def test_umoci_manifest(declared):
    m = parse_manifest(UMOCI_MANIFEST, declared)
    assert m.media_type == mt.OCI_IMAGE_MANIFEST  # inferred from the shape when undeclared
    assert m.kind == "image"
    assert m.config == Descriptor(mt.OCI_IMAGE_CONFIG, CONFIG_DIGEST, 425)
    assert m.layers == (Descriptor(mt.OCI_LAYER_TAR_GZIP, LAYER_DIGEST, 102),)
    assert m.required_blobs == (m.config, *m.layers)
    assert m.children == () == m.manifests
    assert (m.subject, m.annotations, m.artifact_type) == (None, {}, None)


def test_umoci_config_matches_manifest():
    cfg = parse_image_config(UMOCI_CONFIG)
    assert (cfg.architecture, cfg.os) == ("amd64", "linux")
    assert cfg.config == {"Env": ["PATH=/usr/bin"], "Cmd": ["/bin/sh"]}
    assert cfg.diff_ids == (DIFF_ID,)
    assert cfg.created == "2026-11-28T11:28:53.114118995Z"
    assert [h["created_by"] for h in cfg.history] == ["umoci insert", "umoci config"]
    assert cfg.history[1]["empty_layer"] is True
    assert cfg.raw == json.loads(UMOCI_CONFIG)
    check_config_matches(cfg, parse_manifest(UMOCI_MANIFEST))


@pytest.mark.parametrize("declared", [None, mt.OCI_IMAGE_INDEX])
def test_umoci_index(declared):
    m = parse_manifest(UMOCI_INDEX, declared)
    assert (m.media_type, m.kind, m.config, m.layers) == (mt.OCI_IMAGE_INDEX, "index", None, ())
    assert m.required_blobs == ()
    (child,) = m.children
    assert child.digest == digest_bytes(UMOCI_MANIFEST)
    assert child.size == len(UMOCI_MANIFEST)
    assert child.annotations == {"org.opencontainers.image.ref.name": "v1"}


@pytest.mark.parametrize("declared", [None, mt.DOCKER_MANIFEST])
def test_skopeo_docker_schema2_manifest(declared):
    m = parse_manifest(SKOPEO_V2S2_MANIFEST, declared)
    assert (m.media_type, m.kind) == (mt.DOCKER_MANIFEST, "image")
    assert m.config == Descriptor(mt.DOCKER_CONFIG, CONFIG_DIGEST, 425)
    assert m.layers == (Descriptor(mt.DOCKER_LAYER_TAR_GZIP, LAYER_DIGEST, 102),)
    check_config_matches(parse_image_config(UMOCI_CONFIG), m)


def test_skopeo_manifest_declared_as_oci_is_a_mismatch():
    msg = error_of(InvalidArgument, parse_manifest, SKOPEO_V2S2_MANIFEST, mt.OCI_IMAGE_MANIFEST)
    assert f'manifest mediaType "{mt.DOCKER_MANIFEST}" does not match' in msg
    assert f'declared media type "{mt.OCI_IMAGE_MANIFEST}"' in msg


def test_pretty_printed_manifest_parses_the_same():
    # skopeo and docker sometimes indent; whitespace must not matter to parsing.
    pretty = json.dumps(json.loads(SKOPEO_V2S2_MANIFEST), indent=3).encode()
    assert parse_manifest(pretty) == parse_manifest(SKOPEO_V2S2_MANIFEST)


# --- other valid shapes


def test_docker_manifest_list_with_platforms():
    doc = {
        "schemaVersion": 2,
        "mediaType": mt.DOCKER_MANIFEST_LIST,
        "manifests": [
            desc(D1, mt.DOCKER_MANIFEST) | {"platform": {"architecture": "amd64", "os": "linux"}},
            desc(D2, mt.DOCKER_MANIFEST)
            | {"platform": {"architecture": "arm", "os": "linux", "variant": "v7"}},
        ],
    }
    m = parse_manifest(dump(doc), mt.DOCKER_MANIFEST_LIST)
    assert (m.kind, m.media_type) == ("index", mt.DOCKER_MANIFEST_LIST)
    assert [c.platform for c in m.children] == [
        {"architecture": "amd64", "os": "linux"},
        {"architecture": "arm", "os": "linux", "variant": "v7"},
    ]


def test_oci_artifact_with_empty_config_and_subject():
    """OCI 1.1 artifact (e.g. a signature): empty config, artifactType, subject, no layers."""
    doc = image(
        artifactType="application/vnd.example.sig",
        config={"mediaType": mt.OCI_EMPTY, "digest": EMPTY_JSON_DIGEST, "size": 2},
        layers=[],
        subject=desc(D3, mt.OCI_IMAGE_MANIFEST, 345),
        annotations={"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    )
    m = parse_manifest(dump(doc))
    assert m.artifact_type == "application/vnd.example.sig"
    assert m.subject == Descriptor(mt.OCI_IMAGE_MANIFEST, D3, 345)
    assert m.required_blobs == (Descriptor(mt.OCI_EMPTY, EMPTY_JSON_DIGEST, 2),)
    assert m.annotations == {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"}


def test_unknown_fields_and_nulls_are_tolerated():
    doc = image(
        futureField={"x": 1},
        annotations=None,
        layers=[desc(D2) | {"annotations": None, "urls": None, "platform": None, "data": "e30="}],
    )
    doc["subject"] = None
    m = parse_manifest(dump(doc))
    assert m.layers == (Descriptor(mt.OCI_LAYER_TAR_GZIP, D2, 10),)
    assert m.subject is None


def test_index_ignores_config_shape_when_declared():
    doc = {"schemaVersion": 2, "mediaType": mt.OCI_IMAGE_INDEX, "manifests": []}
    m = parse_manifest(dump(doc))
    assert (m.kind, m.children, m.required_blobs) == ("index", (), ())


def test_manifest_at_the_size_limit_is_accepted():
    content = dump(image())
    padded = content + b" " * (MAX_MANIFEST_BYTES - len(content))
    assert len(padded) == MAX_MANIFEST_BYTES
    assert parse_manifest(padded).layers == parse_manifest(content).layers


# --- invalid manifests


def test_manifest_too_big():
    content = dump(image()) + b" " * MAX_MANIFEST_BYTES
    msg = error_of(ResourceExhausted, parse_manifest, content)
    assert f"manifest is {len(content)} bytes, the limit is {MAX_MANIFEST_BYTES} (4 MiB)" == msg


@pytest.mark.parametrize(
    ("content", "declared", "fragment"),
    [
        (b"\xff\xfe{}", None, "manifest is not valid UTF-8: bad byte at offset 0"),
        (b"", None, "manifest is not valid JSON"),
        (b"{", None, "manifest is not valid JSON"),
        (b'{"schemaVersion":NaN}', None, "manifest is not valid JSON: NaN is not JSON"),
        (b"[" * 100_000, None, "nested too deeply"),
        (b"[]", None, "manifest must be a JSON object, got an array"),
        (b'"x"', None, "manifest must be a JSON object, got a string"),
        (b"null", None, "manifest must be a JSON object, got null"),
        (b'{"schemaVersion":1,"name":"x","fsLayers":[]}', None, "Docker schema 1 manifests"),
        (b"{}", mt.DOCKER_SCHEMA1_SIGNED_MANIFEST, "convert with skopeo"),
        (b"{}", None, "manifest.schemaVersion is missing; expected 2"),
        (b'{"schemaVersion":3}', None, "manifest.schemaVersion must be 2, got 3"),
        (b'{"schemaVersion":"2"}', None, 'manifest.schemaVersion must be 2, got "2"'),
        (b'{"schemaVersion":2.0}', None, "manifest.schemaVersion must be 2, got 2.0"),
        (b'{"schemaVersion":true}', None, "manifest.schemaVersion must be 2, got true"),
        (dump(image()), "text/plain", 'unsupported manifest media type "text/plain"'),
        (dump(image(mediaType="x/y")), None, 'unsupported manifest media type "x/y"'),
        (dump(image(mediaType=5)), None, "manifest.mediaType must be a string, got 5"),
        (dump(image(mediaType=mt.DOCKER_SCHEMA1_MANIFEST)), None, "Docker schema 1 manifests"),
        (
            dump(image()),
            mt.OCI_IMAGE_INDEX,
            f'manifest mediaType "{mt.OCI_IMAGE_MANIFEST}" does not match the declared',
        ),
        (dump(image(mediaType=None, config=None)), None, 'neither "config" nor "manifests"'),
        (
            dump(image(mediaType=None, manifests=[])),
            None,
            'both "config" and "manifests"; declare the media type',
        ),
        (
            dump(image(config=None)),
            None,
            "invalid image manifest: config is missing; expected a descriptor",
        ),
        (dump(image(config=[])), None, "invalid image manifest: config must be a descriptor"),
        (
            dump(image(layers=None)),
            None,
            "invalid image manifest: layers is missing; expected an array of descriptors",
        ),
        (dump(image(layers={})), None, "layers must be an array of descriptors, got {}"),
        (dump(image(layers=[desc(D2), "x"])), None, "layers[1] must be a descriptor object, got"),
        (
            dump(image(layers=[desc(D2), desc(D3), desc("sha256:bad")])),
            None,
            'invalid image manifest: layers[2].digest: invalid digest "sha256:bad"',
        ),
        (
            dump(image(layers=[desc(size=-1)])),
            None,
            "layers[0].size must be a non-negative integer, got -1",
        ),
        (dump(image(subject="x")), None, 'subject must be a descriptor object, got "x"'),
        (dump(image(annotations={"a": 1})), None, "annotations must be an object with string"),
        (dump(image(annotations=[])), None, "annotations must be an object with string values"),
        (dump(image(artifactType=7)), None, "artifactType must be a string, got 7"),
        (
            dump({"schemaVersion": 2, "mediaType": mt.OCI_IMAGE_INDEX}),
            None,
            "invalid image index: manifests is missing; expected an array of descriptors",
        ),
        (
            dump({"schemaVersion": 2, "manifests": [desc(D1, "")]}),
            None,
            'invalid image index: manifests[0].mediaType must be a non-empty string, got ""',
        ),
        (dump(image()), mt.OCI_IMAGE_CONFIG, "unsupported manifest media type"),
    ],
)
def test_parse_manifest_rejects(content, declared, fragment):
    assert fragment in error_of(InvalidArgument, parse_manifest, content, declared)


def test_schema1_message_names_the_tool():
    msg = error_of(InvalidArgument, parse_manifest, b'{"schemaVersion":1}')
    assert msg == (
        "manifest has schemaVersion 1: Docker schema 1 manifests are not supported; "
        "convert with skopeo"
    )


def test_unsupported_media_type_lists_the_supported_ones():
    msg = error_of(InvalidArgument, parse_manifest, dump(image()), "application/json")
    for supported in mt.MANIFEST_TYPES:
        assert supported in msg


# --- descriptors


@pytest.mark.parametrize(
    ("d", "fragment"),
    [
        (None, "layers[2] must be a descriptor object, got null"),
        ([], "layers[2] must be a descriptor object, got []"),
        ({"digest": D1, "size": 1}, "layers[2].mediaType is missing; expected a non-empty string"),
        (desc(media_type=""), 'layers[2].mediaType must be a non-empty string, got ""'),
        (desc(media_type=5), "layers[2].mediaType must be a non-empty string, got 5"),
        ({"mediaType": "a/b", "size": 1}, "layers[2].digest: invalid digest null"),
        (desc(digest="sha256:" + "A" * 64), "layers[2].digest: invalid digest"),
        (desc(digest="sha512:" + "a" * 128), "layers[2].digest: unsupported digest algorithm"),
        ({"mediaType": "a/b", "digest": D1}, "layers[2].size is missing"),
        (desc(size=-1), "layers[2].size must be a non-negative integer, got -1"),
        (desc(size=True), "layers[2].size must be a non-negative integer, got true"),
        (desc(size=1.5), "layers[2].size must be a non-negative integer, got 1.5"),
        (desc(size="10"), 'layers[2].size must be a non-negative integer, got "10"'),
        (desc(size=2**63), "layers[2].size must be a non-negative integer"),
        (desc() | {"platform": "linux"}, 'layers[2].platform must be an object with string "ar'),
        (desc() | {"platform": {"os": "linux"}}, "layers[2].platform must be an object"),
        (desc() | {"urls": "http://x"}, 'layers[2].urls must be an array of strings, got "http'),
        (desc() | {"urls": [1]}, "layers[2].urls must be an array of strings, got [1]"),
        (desc() | {"annotations": {"k": None}}, "layers[2].annotations must be an object with"),
    ],
)
def test_descriptor_from_dict_rejects(d, fragment):
    assert fragment in error_of(InvalidArgument, Descriptor.from_dict, d, "layers[2]")


def test_descriptor_round_trip_with_all_fields():
    d = Descriptor(
        mt.OCI_LAYER_NONDISTRIBUTABLE_TAR_GZIP,
        D1,
        2**40,
        annotations={"k": "v"},
        platform={"architecture": "amd64", "os": "windows", "os.version": "10.0.17763.1"},
        urls=("https://example.com/layer",),
    )
    as_dict = d.to_dict()
    assert list(as_dict) == ["mediaType", "digest", "size", "annotations", "platform", "urls"]
    assert as_dict["urls"] == ["https://example.com/layer"]
    assert Descriptor.from_dict(json.loads(encode_json(as_dict)), "x") == d


def test_descriptor_to_dict_omits_empty_optionals():
    d = Descriptor(mt.OCI_IMAGE_CONFIG, D1, 0)
    assert d.to_dict() == {"mediaType": mt.OCI_IMAGE_CONFIG, "digest": D1, "size": 0}
    assert Descriptor.from_dict(d.to_dict(), "config") == d


def test_descriptor_default_annotations_are_not_shared():
    a, b = Descriptor("a/b", D1, 1), Descriptor("a/b", D2, 1)
    assert a.annotations == {} and a.annotations is not b.annotations


# --- image config


def test_parse_image_config_minimal_defaults():
    cfg = parse_image_config(dump(config_doc()))
    assert cfg == ImageConfig(
        architecture="arm64",
        os="linux",
        config={},
        diff_ids=(D1, D2),
        history=(),
        created=None,
        raw=config_doc(),
    )


def test_parse_image_config_null_config_and_history():
    cfg = parse_image_config(dump(config_doc(config={}) | {"config": None, "history": None}))
    assert (cfg.config, cfg.history) == ({}, ())


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"nope", "image config is not valid JSON"),
        (b"[1]", "image config must be a JSON object, got an array"),
        (dump(config_doc(architecture=None)), "architecture is missing; expected a non-empty"),
        (dump(config_doc(architecture="")), 'architecture must be a non-empty string, got ""'),
        (dump(config_doc(os=5)), "invalid image config: os must be a non-empty string, got 5"),
        (dump(config_doc(config=[])), "invalid image config: config must be an object, got []"),
        (dump(config_doc(rootfs=None)), 'rootfs is missing; expected an object with "type"'),
        (dump(config_doc(rootfs="x")), 'rootfs must be an object with "type" and "diff_ids"'),
        (
            dump(config_doc(rootfs={"type": "squashfs", "diff_ids": []})),
            'invalid image config: rootfs.type must be "layers", got "squashfs"',
        ),
        (dump(config_doc(rootfs={"diff_ids": []})), 'rootfs.type is missing; expected "layers"'),
        (
            dump(config_doc(rootfs={"type": "layers"})),
            "rootfs.diff_ids is missing; expected an array of digests",
        ),
        (
            dump(config_doc(rootfs={"type": "layers", "diff_ids": [D1, "sha256:zz"]})),
            'invalid image config: rootfs.diff_ids[1]: invalid digest "sha256:zz"',
        ),
        (dump(config_doc(history={})), "history must be an array of objects, got {}"),
        (dump(config_doc(history=["x"])), 'history must be an array of objects, got ["x"]'),
        (dump(config_doc(created=1)), "invalid image config: created must be a string, got 1"),
    ],
)
def test_parse_image_config_rejects(content, fragment):
    assert fragment in error_of(InvalidArgument, parse_image_config, content)


# --- config vs manifest


def test_check_config_matches_counts_layers():
    cfg = parse_image_config(dump(config_doc()))
    check_config_matches(cfg, parse_manifest(dump(image())))
    one_layer = parse_manifest(dump(image(layers=[desc(D2)])))
    msg = error_of(InvalidArgument, check_config_matches, cfg, one_layer)
    assert msg == (
        "image config has 2 rootfs.diff_ids but the manifest has 1 layers; "
        "they must correspond one to one"
    )


def test_check_config_matches_refuses_fewer_diff_ids_than_layers():
    """Too few diff_ids must be refused as clearly as too many: otherwise the pull goes on
    and fails later with a bare ValueError."""
    cfg = parse_image_config(dump(config_doc(rootfs={"type": "layers", "diff_ids": [D1]})))
    msg = error_of(InvalidArgument, check_config_matches, cfg, parse_manifest(dump(image())))
    assert msg.startswith("image config has 1 rootfs.diff_ids but the manifest has 2 layers")


def test_check_config_matches_rejects_index():
    cfg = parse_image_config(UMOCI_CONFIG)
    msg = error_of(InvalidArgument, check_config_matches, cfg, parse_manifest(UMOCI_INDEX))
    assert f'"{mt.OCI_IMAGE_INDEX}" is an index and has no image config' in msg


# --- writing


def test_encode_json_is_compact_ordered_utf8():
    assert encode_json({"b": 1, "a": [1, {"z": None, "y": True}], "é": "ü"}) == (
        '{"b":1,"a":[1,{"z":null,"y":true}],"é":"ü"}'.encode()
    )


def test_encode_json_refuses_nan():
    with pytest.raises(ValueError):
        encode_json({"x": float("nan")})


def test_build_image_manifest_golden_bytes():
    config = Descriptor(mt.OCI_IMAGE_CONFIG, CONFIG_DIGEST, 425)
    layer = Descriptor(mt.OCI_LAYER_TAR_GZIP, LAYER_DIGEST, 102)
    content = build_image_manifest(config, [layer])
    expected = (
        b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",'
        + UMOCI_MANIFEST.removeprefix(b'{"schemaVersion":2,').removesuffix(b"\n")
    )
    assert content == expected
    # The same image as umoci's, so it parses to the same descriptors.
    assert parse_manifest(content).required_blobs == parse_manifest(UMOCI_MANIFEST).required_blobs


def test_build_image_manifest_round_trip_with_annotations():
    config = Descriptor(mt.OCI_IMAGE_CONFIG, D1, 7)
    layers = [Descriptor(mt.OCI_LAYER_TAR_ZSTD, D2, 8, annotations={"k": "v"})]
    annotations = {"org.opencontainers.image.title": "büro"}
    content = build_image_manifest(config, layers, annotations)
    assert "büro".encode() in content  # UTF-8, not \u escapes
    m = parse_manifest(content, mt.OCI_IMAGE_MANIFEST)
    assert isinstance(m, ParsedManifest)
    assert (m.config, m.layers, m.annotations) == (config, tuple(layers), annotations)
    assert build_image_manifest(config, layers, annotations) == content  # byte-stable


@pytest.mark.parametrize("annotations", [None, {}])
def test_build_image_manifest_omits_absent_annotations(annotations):
    content = build_image_manifest(Descriptor(mt.OCI_IMAGE_CONFIG, D1, 1), [], annotations)
    assert b"annotations" not in content
    assert json.loads(content)["layers"] == []


@pytest.mark.parametrize(
    ("config", "layers", "fragment"),
    [
        (Descriptor(mt.OCI_IMAGE_CONFIG, "sha256:x", 1), [], 'config.digest: invalid digest "sha'),
        (
            Descriptor(mt.OCI_IMAGE_CONFIG, D1, 1),
            [Descriptor(mt.OCI_LAYER_TAR_GZIP, D2, -5)],
            "layers[0].size must be a non-negative integer, got -5",
        ),
        (Descriptor("", D1, 1), [], "config.mediaType must be a non-empty string"),
    ],
)
def test_build_image_manifest_refuses_invalid_descriptors(config, layers, fragment):
    msg = error_of(InvalidArgument, build_image_manifest, config, layers)
    assert msg.startswith("invalid image manifest: ")
    assert fragment in msg


# --- media types


def test_manifest_type_sets():
    assert {mt.OCI_IMAGE_MANIFEST, mt.DOCKER_MANIFEST} == mt.IMAGE_MANIFEST_TYPES
    assert {mt.OCI_IMAGE_INDEX, mt.DOCKER_MANIFEST_LIST} == mt.INDEX_TYPES
    assert mt.MANIFEST_TYPES == mt.IMAGE_MANIFEST_TYPES | mt.INDEX_TYPES
    assert not mt.IMAGE_MANIFEST_TYPES & mt.INDEX_TYPES
    assert {mt.OCI_IMAGE_CONFIG, mt.DOCKER_CONFIG} == mt.CONFIG_TYPES
    assert not mt.SCHEMA1_TYPES & mt.MANIFEST_TYPES
    assert mt.OCI_EMPTY == "application/vnd.oci.empty.v1+json"


def test_layer_types():
    assert {
        "application/vnd.oci.image.layer.v1.tar",
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    } == mt.LAYER_TYPES
    assert not mt.LAYER_TYPES & (mt.MANIFEST_TYPES | mt.CONFIG_TYPES | {mt.OCI_EMPTY})


@pytest.mark.parametrize(
    ("media_type", "gzip_", "zstd"),
    [
        (mt.OCI_LAYER_TAR, False, False),
        (mt.OCI_LAYER_TAR_GZIP, True, False),
        (mt.OCI_LAYER_TAR_ZSTD, False, True),
        (mt.OCI_LAYER_NONDISTRIBUTABLE_TAR, False, False),
        (mt.OCI_LAYER_NONDISTRIBUTABLE_TAR_GZIP, True, False),
        (mt.OCI_LAYER_NONDISTRIBUTABLE_TAR_ZSTD, False, True),
        (mt.DOCKER_LAYER_TAR_GZIP, True, False),
        (mt.DOCKER_FOREIGN_LAYER, True, False),
        (mt.OCI_IMAGE_CONFIG, False, False),
        ("application/gzip", False, False),
        ("", False, False),
    ],
)
def test_layer_compression(media_type, gzip_, zstd):
    assert mt.is_gzip_layer(media_type) is gzip_
    assert mt.is_zstd_layer(media_type) is zstd
