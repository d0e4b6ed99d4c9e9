"""A hostile snapshot writer: one of many hosts backing up into a shared repository is taken
over, and its attacker (who holds the key) stores any tree, blob and snapshot. The admin of
another host then lists, restores and dumps them. Each test failed before its fix."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from deltavault.backends.local import LocalBackend
from deltavault.model.content import Full, Hole
from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD, Cli


def _planted(cli: Cli, nodes: list[Node], host: str = "h") -> str:
    """A snapshot of ``nodes`` written with the repository's key, as the compromised host's
    modified client would write it (nothing the model would refuse is refused on writing)."""
    if not cli.repo.exists():
        assert cli("init").returncode == 0
    repo = Repository.open(LocalBackend(cli.repo), lambda: PASSWORD, cache_root=cli.cache)
    data = repo.save_blob(BlobType.DATA, b"hello")[0]
    nodes = [msgspec.structs.replace(n, content=[Full(data, 5)], size=5) if n.type == NodeType.FILE
             and not n.content else n for n in nodes]
    root = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree(nodes)))[0]
    repo.flush()
    return repo.save_snapshot(Snapshot(time="2026-01-01T00:00:00Z", time_ns=1, hostname=host, paths=["/src"],
                                       source_id=f"{host}:/src", tree=root))


F = NodeType.FILE
# Values no Linux file system gives a backup. Each ended ls -l, restore or dump with an
# OverflowError or ValueError from os.chmod, os.chown, os.symlink, os.setxattr or tarfile
# (exit 1, "internal error (a bug)", a traceback) instead of naming the damage; a negative
# hole moved restore's write offset backwards (EINVAL, exit 3) and was listed and checked
# as sound.
UNRESTORABLE = {
    "mode past the permission bits": Node(name=b"f", type=F, mode=2**40),
    "negative mode": Node(name=b"f", type=F, mode=-1),
    "uid past uid_t": Node(name=b"f", type=F, uid=2**40),
    "negative gid": Node(name=b"f", type=F, gid=-5),
    "symlink target with NUL": Node(name=b"l", type=NodeType.SYMLINK, target=b"/etc\0x"),
    "xattr name with NUL": Node(name=b"f", type=F, xattrs=[(b"user.a\0b", b"v")]),
    "device number past dev_t": Node(name=b"c", type=NodeType.CHARDEV, rdev=2**64 - 1),
    "negative hole": Node(name=b"f", type=F, content=[Hole(-5), Hole(5)], size=0),
}


@pytest.mark.parametrize("case", sorted(UNRESTORABLE))
def test_tree_fields_no_file_system_holds_are_damage_named_not_a_traceback(cli: Cli, tmp_path: Path,
                                                                           case: str) -> None:
    """Each such tree is refused where every reader decodes trees (``objects.trees``), as
    one that does not parse: exit 13, naming what it holds; nothing written in the target."""
    sid = _planted(cli, [UNRESTORABLE[case]])
    target = tmp_path / "target"
    for args in (["ls", "-l", sid], ["restore", sid, "--target", str(target)],
                 ["dump", sid, "/", "--target", str(tmp_path / "x.tar")],
                 ["dump", "-a", "zip", sid, "/", "--target", str(tmp_path / "x.zip")], ["check"]):
        r = cli(*args)
        assert r.returncode == 13, (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr and "internal error" not in r.stderr, (args, r.stderr)
        if args[0] != "check":
            assert "tree does not parse" in r.stderr, (args, r.stderr)
    assert not target.exists() or list(target.iterdir()) == []

