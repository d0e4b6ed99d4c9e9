"""NTFS metadata that does not parse or is not valid, through file backup and restore on real
ntfs-3g mounts: security descriptors kept as bytes, stream names with '/' or ':' from a broken
driver or a hostile repository reported and never made into paths (split from test_ntfs_meta.py)."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

import deltavault.fs.ntfs as ntfsmod
from deltavault.fs.ntfs import valid_stream_name
from deltavault.fs.ntfssd import BadDescriptor, owner_group
from deltavault.model.nodes import Tree
from deltavault.model.types import BlobType
from deltavault.model.windows import Stream, WinMeta
from deltavault.objects.trees import encode_tree
from deltavault.repository.repository import Repository
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions
from tests.conftest import needs_root, needs_tools
from tests.integration.ntfs.ntfsutil import ntfs
from tests.integration.ntfs.test_ntfs_meta import backup, tree_nodes

pytestmark = [needs_root(), needs_tools("mkntfs", "ntfs-3g", "getfattr")]


def test_owner_sid_parsed_and_bad_descriptor_kept(tmp_path: Path, repo: Repository) -> None:
    with ntfs(tmp_path, "src") as src:
        d = src / "data"
        d.mkdir()
        (d / "good").write_text("g")
        (d / "bad").write_text("b")
        sd = os.getxattr(d / "bad", "system.ntfs_acl")
        # The owner offset pointed past the end: ntfs-3g refuses such a descriptor, so the
        # backup's parse is checked with one given to it directly (below).
        res = backup(repo, d)
    nodes = tree_nodes(repo, res)
    assert nodes[b"good"].win is not None and nodes[b"good"].win.owner.startswith("S-1-5-")
    bad = sd[:4] + struct.pack("<I", 10_000) + sd[8:]
    try:
        owner_group(bad)
    except BadDescriptor:
        pass
    else:
        raise AssertionError("a descriptor whose owner lies outside it parsed")


def test_descriptor_that_does_not_parse_is_kept_as_bytes(tmp_path: Path, repo: Repository,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """ntfs-3g refuses to set a malformed descriptor, so the one read is replaced on its way in."""
    garbage = b"\x07not a descriptor"
    real: Callable[[int | bytes, bytes], bytes | None] = ntfsmod._get

    def fake(target: int | bytes, name: bytes) -> bytes | None:
        return garbage if name == ntfsmod.ACL else real(target, name)

    with ntfs(tmp_path, "src") as src:
        (src / "data").mkdir()
        (src / "data" / "f").write_text("f")
        monkeypatch.setattr(ntfsmod, "_get", fake)
        res = backup(repo, src / "data")
    warned = [p for p in res.problems if "kept as bytes" in p.message]
    assert len(warned) == 2, res.problems  # data and f
    assert not res.partial
    node = tree_nodes(repo, res)[b"f"]
    assert node.win is not None and node.win.sd == garbage and node.win.owner == ""
    assert res.snapshot_id is not None


def test_stream_name_not_valid_anywhere_is_refused(tmp_path: Path, repo: Repository) -> None:
    """A snapshot naming a stream with '/' or ':' (a damaged or hostile repository) never
    makes that path: the stream is reported, the file and the rest restored."""
    assert not valid_stream_name(b"../x") and not valid_stream_name(b"a:b") and not valid_stream_name(b"")
    with ntfs(tmp_path, "src") as src:
        (src / "data").mkdir()
        (src / "data" / "f").write_text("f")
        (src / "data" / "f:ok").write_bytes(b"ok")
        res = backup(repo, src / "data")
    # Rewrite the tree with a hostile stream name next to the good one.
    nodes = tree_nodes(repo, res)
    f = nodes[b"f"]
    assert f.win is not None
    bad = Stream(name=b"../../escape", size=2, content=f.win.streams[0].content)
    liar = Stream(name=b"liar", size=1, content=f.win.streams[0].content)  # its content holds 2 bytes
    f2 = msgspec.structs.replace(f, win=WinMeta(sd=f.win.sd, attrib=f.win.attrib, times=f.win.times,
                                                streams=[*f.win.streams, bad, liar]))
    sub, _ = repo.save_blob(BlobType.TREE, encode_tree(sorted([*(n for k, n in nodes.items() if k != b"f"), f2],
                                                             key=lambda n: n.name)))
    assert res.snapshot.tree is not None
    root = msgspec.msgpack.decode(repo.load_blob(res.snapshot.tree), type=Tree).nodes
    top, _ = repo.save_blob(BlobType.TREE, encode_tree([msgspec.structs.replace(root[0], subtree=sub)]))
    repo.flush()
    with ntfs(tmp_path, "dst") as dst:
        r = FileRestorer(repo, dst, RestoreOptions())
        r.run(top)
        assert [p.message for p in r.problems if "../../escape" in p.message and "not valid" in p.message]
        assert [p.message for p in r.problems if "liar" in p.message and "records 1 bytes" in p.message]
        assert (dst / "data" / "f:ok").read_bytes() == b"ok"
        assert not (tmp_path / "escape").exists()
    ext4 = tmp_path / "ext4"  # as user. xattrs: the same checks
    ext4.mkdir()
    r = FileRestorer(repo, ext4, RestoreOptions())
    r.run(top)
    assert [p.message for p in r.problems if "liar" in p.message and "add up to 2 bytes, not 1" in p.message]
    assert os.getxattr(ext4 / "data" / "f", "user.ok") == b"ok"
    assert "user.liar" not in os.listxattr(ext4 / "data" / "f")


def test_stream_name_with_a_slash_is_never_opened(tmp_path: Path, repo: Repository,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream list naming ``../x`` (no NTFS has it; a broken driver might) is not joined
    into a path: reported, and the file's real streams are stored."""
    real: Callable[[int | bytes, bytes], bytes | None] = ntfsmod._get

    def fake(target: int | bytes, name: bytes) -> bytes | None:
        got = real(target, name)
        return b"../escape\0" + got if name == ntfsmod.STREAMS_LIST and got else got

    with ntfs(tmp_path, "src") as src:
        (src / "data").mkdir()
        (src / "data" / "f").write_text("f")
        (src / "data" / "f:ok").write_bytes(b"ok")
        (src / "escape").write_text("outside")
        monkeypatch.setattr(ntfsmod, "_get", fake)
        res = backup(repo, src / "data")
    assert [p.message for p in res.problems if "../escape" in p.message], res.problems
    win = tree_nodes(repo, res)[b"f"].win
    assert win is not None and [s.name for s in win.streams] == [b"ok"]
