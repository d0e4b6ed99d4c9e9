"""A hostile snapshot writer (see test_hostile_writer.py) storing content references whose
sizes or patches no backup writes: a reference far larger than its blob, a patch that does
not parse, a file of 4 EiB of hole. Each test failed before its fix."""

from __future__ import annotations

import tarfile
from contextlib import AbstractContextManager
from pathlib import Path

import msgspec
import pytest

from deltavault.backends.local import LocalBackend
from deltavault.model.content import ContentRef, Full, Hole, Patch
from deltavault.model.nodes import Node, NodeType
from deltavault.model.types import BlobType
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD, Cli, needs_root
from tests.integration.test_hostile_writer import _planted, _planted_volume
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


def _not_a_patch(cli: Cli) -> bytes:
    repo = _repo(cli)
    bid = repo.save_blob(BlobType.DATA, b"not a patch at all")[0]
    repo.flush()
    return bid


def _fails_check_read_data(cli: Cli, says: list[str]) -> None:
    """Plain ``check`` passes (it reads no blob); ``check --read-data`` exits 13 saying ``says``."""
    assert cli("check").returncode == 0
    r = cli("check", "--read-data")
    assert r.returncode == 13, (r.returncode, r.stdout, r.stderr)
    out = r.stdout + r.stderr
    assert all(s in out for s in says), out
    assert "Traceback" not in out


def test_check_read_data_parses_a_files_patches_as_restore_does(cli: Cli, tmp_path: Path) -> None:
    """A large file's ``Patch`` whose patch blob does not parse: every blob matches its id,
    so ``check --read-data`` passed it, while restore refused the file (exit 13). Now each
    patch is parsed as restore parses it (``objects.patch.decode_patch``)."""
    bad = _not_a_patch(cli)
    hello = _repo(cli).blob_id(b"hello")
    sid = _planted(cli, [Node(name=b"patched", type=F, mode=0o644, content=[Patch(hello, [bad], 5, b"\1")], size=5),
                         Node(name=b"plain", type=F, mode=0o644)])
    r = cli("restore", sid, "--target", str(tmp_path / "out"))
    assert r.returncode == 13 and "patched" in r.stderr, r.stderr
    _fails_check_read_data(cli, [f"snapshot {sid[:8]}: patched: restore refuses its content: patch "
                                 f"{bad.hex()[:16]} does not apply: patch blob: bad magic"])


def test_check_read_data_parses_a_volume_blocks_patches_as_restore_does(cli: Cli, tmp_path: Path) -> None:
    """The same for a volume block: restore refused the volume, check passed it."""
    bad = _not_a_patch(cli)
    block = _repo(cli).blob_id(b"\1" * 4096)
    sid = _planted_volume(cli, [Full(block, 4096), Patch(block, [bad], 4096, b"\1")])
    r = cli("restore", "--volume", sid, "--target", str(tmp_path / "disk.img"))
    assert r.returncode == 13, r.stderr
    _fails_check_read_data(cli, [f"snapshot {sid[:8]}: (volume): 1 block(s) of 4096 bytes that restore refuses",
                                 f"at byte offsets 4096 (patch {bad.hex()[:16]} does not apply: patch blob: bad magic"])


@pytest.mark.parametrize("kind", ["Full", "Patch"])
def test_check_finds_a_reference_larger_than_its_blob(cli: Cli, kind: str) -> None:
    """A ``Full`` (or a ``Patch``'s base) of 1 TiB naming a 5-byte blob passed ``check`` and
    ``check --read-data``, which only asked whether the blob was indexed (or matched its
    id). Restore refuses such a file: check now says so too, by the length the index
    records (the data pass compares it with each blob)."""
    hello = _repo(cli).blob_id(b"hello")
    ref: ContentRef = Full(hello, TIB) if kind == "Full" else Patch(hello, [], TIB, b"")
    sid = _planted(cli, [Node(name=b"lie", type=F, mode=0o644, content=[ref], size=TIB)])
    for args in (["check"], ["check", "--read-data"]):
        r = cli(*args)
        assert r.returncode == 13, (args, r.stdout, r.stderr)
        assert (f"snapshot {sid[:8]}: lie: restore refuses its content: blob {hello.hex()[:16]} has 5 bytes, "
                "tree says 1099511627776") in r.stdout + r.stderr, (args, r.stdout, r.stderr)


def test_check_read_data_finds_an_index_that_lies_about_a_blobs_length(cli: Cli) -> None:
    """Restore and check take a blob's length from the index, which a writer with the key
    also writes: an index file saying 1 GiB for a 5-byte blob, with a tree saying the
    same, passed ``check --read-data``. The data pass now compares each blob with its
    indexed length and names the lie; the files it hits are reported."""
    sid = _planted(cli, [Node(name=b"f", type=F, mode=0o644)])
    repo = _repo(cli)
    hello = repo.blob_id(b"hello")
    packs = [(pid, [msgspec.structs.replace(e, raw_length=1 << 30) if e.id == hello else e for e in entries])
             for pid, entries in repo.index.entries_by_pack().items()]
    repo.write_index_file(packs, supersedes=repo.index_names())
    lie = Node(name=b"lie", type=F, mode=0o644, content=[Full(hello, 1 << 30)], size=1 << 30)
    lie_sid = _planted(cli, [lie], host="h2")
    r = cli("check")  # by the index alone: the true file is the one that disagrees
    assert r.returncode == 13 and f"snapshot {sid[:8]}: f: restore refuses its content" in r.stdout, r.stdout
    r = cli("check", "--read-data")
    assert r.returncode == 13, (r.stdout, r.stderr)
    assert f"blob {hello.hex()[:16]} in pack" in r.stdout and "holds 5 bytes, the index records 1073741824" in r.stdout
    for s, name in ((sid, "f"), (lie_sid, "lie")):
        assert f"snapshot {s[:8]}: {name}: 1 of its blobs are missing or damaged" in r.stdout, r.stdout


EIB = 1 << 60


@needs_root()
@pytest.mark.root
def test_dump_refuses_a_file_larger_than_it_writes_before_writing_any_of_it(cli: Cli, tmp_path: Path) -> None:
    """A file the tree says is 4 EiB of hole (a few bytes of tree): ``dump`` wrote 4 EiB of
    zeros, as tar and as zip, until the target filled or the reader stopped. Files larger
    than ``MAX_DUMPED`` (16 TiB) are now refused before any of their bytes, exit 17, naming
    the file. The archives go to a small file system, so a dump that writes the zeros
    fills it (exit 14) rather than the test's disk."""
    sid = _planted(cli, [Node(name=b"big", type=F, mode=0o644, content=[Hole(4 * EIB)], size=4 * EIB),
                         Node(name=b"small", type=F, mode=0o644)])
    with _small_fs(tmp_path) as mnt:
        for args in (["/"], ["-a", "zip", "/"], ["/big"]):
            out = mnt / "out"
            r = cli("dump", sid, *args, "--target", str(out), timeout=120)
            assert r.returncode == 17, (args, r.returncode, r.stderr)
            assert "big: 4611686018427387904 bytes, more than dump writes" in r.stderr, (args, r.stderr)
            assert not out.exists() and list(mnt.iterdir()) == [mnt / "lost+found"], list(mnt.iterdir())
        r = cli("dump", sid, "/small", "--target", str(mnt / "small"))
        assert r.returncode == 0 and (mnt / "small").read_bytes() == b"hello"


@needs_root()
@pytest.mark.root
def test_dump_of_a_sparse_file_streams_its_zeros_and_a_full_target_exits_14(cli: Cli, tmp_path: Path) -> None:
    """A file of holes within the limit dumps as its zeros (``tarfile`` reads it back whole).
    Onto a file system it does not fit, ``dump --target`` ended with a traceback (ENOSPC,
    exit 1, "internal error"); now exit 14, the temporary file removed."""
    size = 64 << 20
    sid = _planted(cli, [Node(name=b"sparse", type=F, mode=0o644, content=[Hole(size)], size=size)])
    assert cli("dump", sid, "/", "--target", str(tmp_path / "x.tar")).returncode == 0
    with tarfile.open(tmp_path / "x.tar") as tar:
        f = tar.extractfile("sparse")
        assert f is not None
        n = 0
        while chunk := f.read(1 << 20):
            assert not chunk.strip(b"\0")
            n += len(chunk)
        assert n == size
    with _small_fs(tmp_path) as mnt:
        for args in (["/"], ["-a", "zip", "/"], ["/sparse"]):
            r = cli("dump", sid, *args, "--target", str(mnt / "out"))
            if args[:2] == ["-a", "zip"]:  # 64 MiB of zeros deflate to 64 KiB: it fits
                assert r.returncode == 0, r.stderr
                (mnt / "out").unlink()
                continue
            assert r.returncode == 14, (args, r.returncode, r.stderr)
            assert "cannot write the dump to" in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert list(mnt.iterdir()) == [mnt / "lost+found"]
