"""berthd.node.idmap's arithmetic: container ids to host ids and back, the forms runc and
/proc take, file capabilities in a layer. The mounts themselves are tested for real in
tests/integration/test_userns.py."""

from __future__ import annotations

import struct

import pytest

from berthd.common.errors import InvalidArgument
from berthd.node.idmap import OVERFLOW_ID, IdMap

DEFAULT = IdMap(100000, 65536)


def test_parse_and_show() -> None:
    assert IdMap.parse("100000:65536") == DEFAULT
    assert str(DEFAULT) == "100000:65536"
    assert DEFAULT.root == (100000, 100000)
    assert DEFAULT.oci() == [{"containerID": 0, "hostID": 100000, "size": 65536}]
    assert DEFAULT.proc_map() == "0 100000 65536\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("100000", "expected START:SIZE"),
        ("a:b", "expected START:SIZE"),
        ("-1:5", "expected START:SIZE"),
        ("0:65536", "it must start above 0"),  # host root would be in the range
        ("100000:0", "it must start above 0"),
        ("4294967290:10", "end at or below 4294967294"),
    ],
)
def test_bad_ranges(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        IdMap.parse(text)


def test_container_ids_to_host_ids() -> None:
    assert DEFAULT.to_host(0) == 100000
    assert DEFAULT.to_host(65534) == 165534
    assert DEFAULT.to_host(65535) == 165535
    for outside in (-1, 65536):
        with pytest.raises(InvalidArgument, match="outside the remapped user namespace"):
            DEFAULT.to_host(outside)


@pytest.mark.parametrize(
    ("host", "container"),
    [
        (100000, 0),
        (101000, 1000),
        (165535, 65535),
        # Outside the range: the kernel's overflow id, as the container sees such files.
        (0, OVERFLOW_ID),
        (99999, OVERFLOW_ID),
        (165536, OVERFLOW_ID),
    ],
)
def test_host_ids_back_to_container_ids(host: int, container: int) -> None:
    assert DEFAULT.to_container(host) == container


def test_check_names_what_is_outside() -> None:
    small = IdMap(200000, 1000)
    small.check("uid", [0, 999])
    with pytest.raises(InvalidArgument, match=r"secret x's gid 1000 is outside .* 0 to 999"):
        small.check("secret x's gid", [5, 1000])


def caps(revision: int, effective: bool, permitted: int, rootid: int | None = None) -> bytes:
    magic = revision | (1 if effective else 0)
    data = struct.pack("<IIIII", magic, permitted, 0, 0, 0)
    return data if rootid is None else data + struct.pack("<I", rootid)


def test_file_capabilities_of_the_remapped_root_become_revision_2() -> None:
    net_bind = 1 << 10
    v3 = caps(0x03000000, True, net_bind, rootid=100000)
    assert DEFAULT.xattr_to_container("security.capability", v3) == caps(0x02000000, True, net_bind)
    # Another owner in the range keeps revision 3, with the container's id.
    other = caps(0x03000000, False, net_bind, rootid=101000)
    assert DEFAULT.xattr_to_container("security.capability", other) == caps(
        0x03000000, False, net_bind, rootid=1000
    )
    # Revision 2 and other xattrs pass through.
    v2 = caps(0x02000000, True, net_bind)
    assert DEFAULT.xattr_to_container("security.capability", v2) == v2
    assert DEFAULT.xattr_to_container("user.note", v3) == v3
