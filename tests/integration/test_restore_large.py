"""Large files restore in parallel segments (restore/content.py): several threads read,
check and write one file's ranges at once, into space allocated first. The bytes, the holes
and the failure of one damaged range must come out as a serial restore gives them."""

from __future__ import annotations

import os
from pathlib import Path

from deltavault.backends.local import LocalBackend
from deltavault.model.content import Full
from deltavault.model.nodes import NodeType
from deltavault.objects.trees import load_nodes
from deltavault.repository.pack import pack_name
from deltavault.repository.repository import Repository
from deltavault.restore.content import SEGMENT_BYTES
from tests.conftest import PASSWORD, Cli

MiB = 1024 * 1024


def _sparse(path: Path, pieces: list[tuple[int, bytes]], size: int) -> None:
    with open(path, "wb") as f:
        for off, data in pieces:
            f.seek(off)
            f.write(data)
        f.truncate(size)


def _temp_files(root: Path) -> list[str]:
    return [n for _d, _s, names in os.walk(root) for n in names if n.startswith(".dv-restore-")]


def test_large_sparse_files_restore_exactly(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    a, b = os.urandom(12 * MiB), os.urandom(10 * MiB)
    # data, an 8 MiB hole, data, a 4 MiB hole at the end: 34 MiB, over four segments
    _sparse(src / "sparse.bin", [(0, a), (20 * MiB, b)], 34 * MiB)
    dense = os.urandom(3 * SEGMENT_BYTES + 12345)
    (src / "dense.bin").write_bytes(dense)
    for i in range(40):
        (src / f"small{i}").write_bytes(os.urandom(i * 1000))
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    out = tmp_path / "out"
    r = cli("--json", "restore", "latest", "--target", str(out), "--verify")
    assert r.returncode == 0, r.stderr
    summary = r.last("summary")
    assert summary["errors"] == 0 and summary["files"] == 42
    got = out / "src"  # a source is kept under its last name
    assert (got / "dense.bin").read_bytes() == dense
    data = (got / "sparse.bin").read_bytes()
    assert len(data) == 34 * MiB
    assert data[:12 * MiB] == a and data[20 * MiB:30 * MiB] == b
    assert data[12 * MiB:20 * MiB].count(0) == 8 * MiB and data[30 * MiB:].count(0) == 4 * MiB
    # the holes were not allocated (neither written nor preallocated)
    assert os.stat(got / "sparse.bin").st_blocks * 512 < 23 * MiB
    for i in range(40):
        assert (got / f"small{i}").read_bytes() == (src / f"small{i}").read_bytes()
    assert not _temp_files(out)


def test_a_damaged_range_of_a_large_file_fails_that_file_alone(cli: Cli, tmp_path: Path) -> None:
    # One segment fails while the file's other segments are being written on other threads:
    # none of them may write after the file is given up (its fd closed, its number reused
    # by the next file), so the other files come out whole.
    src = tmp_path / "src"
    src.mkdir()
    files = {"a-big.bin": os.urandom(5 * SEGMENT_BYTES), "b-big.bin": os.urandom(5 * SEGMENT_BYTES)}
    files.update({f"c-small{i}": os.urandom(2000 + i) for i in range(30)})
    for name, data in files.items():
        (src / name).write_bytes(data)
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0

    repo = Repository.open(LocalBackend(cli.repo, fsync=False), lambda: PASSWORD, use_cache=False)
    _sid, snap = repo.resolve_snapshot("latest")
    assert snap.tree is not None
    tree = next(n for n in load_nodes(repo, snap.tree) if n.name == b"src").subtree
    assert tree is not None
    big = next(n for n in load_nodes(repo, tree) if n.name == b"a-big.bin" and n.type == NodeType.FILE)
    refs = [r for r in big.content if isinstance(r, Full)]
    victim = refs[len(refs) // 2]  # a blob in a middle segment
    loc = repo.index.lookup(victim.id)
    assert loc is not None
    pack = cli.repo / pack_name(loc.pack_id)
    with open(pack, "r+b") as f:
        f.seek(loc.offset + loc.length // 2)
        byte = f.read(1)
        f.seek(loc.offset + loc.length // 2)
        f.write(bytes([byte[0] ^ 0x40]))

    out = tmp_path / "out"
    r = cli("--json", "restore", "latest", "--target", str(out))
    assert r.returncode != 0
    summary = r.last("summary")
    assert summary["errors"] == 1, summary["problems"]
    problem = summary["problems"][0]
    assert problem["path"].endswith("a-big.bin") and problem["kind"] == "corrupt", problem
    got = out / "src"  # a source is kept under its last name
    assert not (got / "a-big.bin").exists()
    for name, data in files.items():
        if name != "a-big.bin":
            assert (got / name).read_bytes() == data, name
    assert not _temp_files(out)
