"""The Windows metadata model and the security descriptor parser, without a mount."""

from __future__ import annotations

import msgspec
import pytest

from deltavault.fs.ntfssd import BadDescriptor, owner_group, sid_text
from deltavault.model.content import Full
from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.model.windows import Stream, WinMeta, creation_time_ns
from deltavault.objects.trees import encode_tree

# What ntfs-3g gave a new file (system.ntfs_acl): owner and group Administrators, Everyone full control.
SD = bytes.fromhex("0100048014000000240000000000000034000000010200000000000520000000200200000102000000000005"
                   "200000002002000002001c000100000000031400ff011f00010100000000000100000000")


def test_owner_and_group_sids() -> None:
    assert owner_group(SD) == ("S-1-5-32-544", "S-1-5-32-544")
    assert sid_text(SD, 0x34 + 16) == "S-1-1-0"  # after the ACL and ACE headers and the mask: Everyone


@pytest.mark.parametrize("bad", [b"", SD[:10], b"\x02" + SD[1:], SD[:2] + b"\0\0" + SD[4:],
                                 SD[:4] + (10_000).to_bytes(4, "little") + SD[8:]])
def test_bad_descriptors_refused(bad: bytes) -> None:
    with pytest.raises(BadDescriptor):
        owner_group(bad)


class OldNode(msgspec.Struct, omit_defaults=True, kw_only=True):
    """A node as a reader before WinMeta saw it (the fields that matter here)."""

    name: bytes
    type: str
    size: int = 0


class OldTree(msgspec.Struct):
    nodes: list[OldNode]
    v: int = 1


def test_format_is_additive() -> None:
    plain = Node(name=b"a", type=NodeType.FILE, size=3)
    raw = encode_tree([plain])
    assert b"win" not in raw  # a node without Windows metadata is encoded as before
    assert msgspec.msgpack.decode(raw, type=Tree).nodes[0].win is None
    win = WinMeta(sd=SD, owner="S-1-5-32-544", attrib=0x20, times=(130_000_000_000_000_000).to_bytes(8, "little") * 4,
                  streams=[Stream(name=b"s", size=3, content=[Full(b"\1" * 32, 3)])])
    raw = encode_tree([msgspec.structs.replace(plain, win=win)])
    assert msgspec.msgpack.decode(raw, type=Tree).nodes[0].win == win
    old = msgspec.msgpack.decode(raw, type=OldTree).nodes[0]  # an older reader ignores it
    assert (old.name, old.size) == (b"a", 3)
    assert creation_time_ns(win) == (130_000_000_000_000_000 - 116_444_736_000_000_000) * 100
    assert creation_time_ns(WinMeta()) is None


def test_access_time_alone_is_no_change() -> None:
    from deltavault.backup.files.nodes import same_meta

    def node(*ticks: int, atime: int = 0) -> Node:
        times = b"".join(t.to_bytes(8, "little") for t in ticks)
        return Node(name=b"d", type=NodeType.DIR, atime=atime, win=WinMeta(sd=SD, attrib=0x10, times=times))

    prev = node(1, 2, 3, 4, atime=5)
    assert same_meta(node(1, 2, 99, 4, atime=6), prev)  # listing moved the access times
    assert not same_meta(node(9, 2, 3, 4), prev)  # creation time
    assert not same_meta(node(1, 2, 3, 9), prev)  # NTFS change time: metadata changed
