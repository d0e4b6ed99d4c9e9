"""A hostile snapshot writer (see test_hostile_writer.py) storing content references whose
sizes or patches no backup writes: a reference far larger than its blob, a patch that does
not parse, a file of 4 EiB of hole. Each test failed before its fix."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from deltavault.backends.local import LocalBackend
from deltavault.model.content import ContentRef, Full, Patch
from deltavault.model.nodes import Node, NodeType
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD, Cli, needs_root
from tests.integration.test_hostile_writer import _planted
from tests.loopdev import fresh_fs

F = NodeType.FILE
TIB = 1 << 40


def _small_fs(tmp_path: Path) -> AbstractContextManager[Path]:
    """An ext4 of 8 MiB, loop-mounted, empty but for lost+found."""
    (tmp_path / "fs").mkdir()
    return fresh_fs(tmp_path / "fs", "8M", "mkfs.ext4", "-q", "-F", "-m", "0")


def _repo(cli: Cli) -> Repository:
    if not cli.repo.exists():
        assert cli("init").returncode == 0
    return Repository.open(LocalBackend(cli.repo), lambda: PASSWORD, cache_root=cli.cache)


@needs_root()
@pytest.mark.root
@pytest.mark.parametrize("kind", ["Full", "Patch"])
def test_a_reference_larger_than_its_blob_is_damage_named_not_a_full_target(cli: Cli, tmp_path: Path,
                                                                           kind: str) -> None:
    """A large file's data ranges were preallocated before its blobs were read: a ``Full``
    (or a ``Patch`` on a base) of 1 TiB naming a 5-byte blob ended a restore onto a small
    file system "restore target is full" (exit 14), the other files unrestored, and the
    user sent to free space. Each reference is now checked against its blob's length as
    the index records it first: exit 13 naming the file, the rest restored."""
    hello = _repo(cli).blob_id(b"hello")
    ref: ContentRef = Full(hello, TIB) if kind == "Full" else Patch(hello, [], TIB, b"")
    sid = _planted(cli, [Node(name=b"a-lie", type=F, mode=0o644, content=[ref], size=TIB),
                         Node(name=b"b-good", type=F, mode=0o644)])
    with _small_fs(tmp_path) as mnt:
        r = cli("restore", sid, "--target", str(mnt / "out"))
        assert r.returncode == 13, (r.returncode, r.stderr)
        assert "a-lie" in r.stderr and "tree says 1099511627776" in r.stderr, r.stderr
        assert "full" not in r.stderr, r.stderr
        assert (mnt / "out" / "b-good").read_bytes() == b"hello"
        assert sorted(p.name for p in (mnt / "out").iterdir()) == ["b-good"]
