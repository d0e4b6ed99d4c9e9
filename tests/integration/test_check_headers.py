"""Two packs of one size swapped under each other's names by the storage (a hostile or
broken store): plain ``check`` looked only at names, so it passed them while restore
refused both files. ``check --read-headers`` reads each pack's header from its end and
compares it with the index."""

from __future__ import annotations

import os
from pathlib import Path

from deltavault.model.content import Full
from deltavault.model.nodes import Node, NodeType
from deltavault.model.types import BlobType
from tests.conftest import Cli
from tests.integration.test_hostile_writer import _planted
from tests.integration.test_hostile_writer_sizes import _repo
from tests.s3proxy import Proxy

F = NodeType.FILE
MiB = 1 << 20


def test_check_read_headers_finds_two_packs_of_one_size_swapped(cli: Cli) -> None:
    repo = _repo(cli)
    blobs = []
    for _ in range(2):  # one blob a pack, of one size: the packs are of one size too
        blobs.append(repo.save_blob(BlobType.DATA, os.urandom(1000), compress=False)[0])
        repo.flush()
    packs = []
    for b in blobs:
        loc = repo.index.lookup(b)
        assert loc is not None
        packs.append(cli.repo / "data" / loc.pack_id.hex()[:2] / loc.pack_id.hex())
    assert packs[0].stat().st_size == packs[1].stat().st_size
    sid = _planted(cli, [Node(name=f"f{i}".encode(), type=F, mode=0o644, content=[Full(b, 1000)], size=1000)
                         for i, b in enumerate(blobs)])
    r = cli("--json", "check", "--read-headers")
    assert r.returncode == 0 and r.last("check_summary")["errors"] == 0, (r.stdout, r.stderr)
    assert r.last("check_summary")["headers_read"] == len(list((cli.repo / "data").rglob("*/*")))
    tmp = packs[0].with_name("swap")
    packs[0].rename(tmp)
    packs[1].rename(packs[0])
    tmp.rename(packs[1])

    assert cli("restore", sid, "--target", str(cli.repo.parent / "out")).returncode == 13
    assert cli("check").returncode == 0  # names only: the swap passes
    r = cli("check", "--read-headers")
    assert r.returncode == 13, (r.stdout, r.stderr)
    for b, p in zip(blobs, packs, strict=True):
        assert f"blob {b.hex()[:16]}: index and pack {p.name[:16]} header disagree" in r.stdout, r.stdout
    assert f"  {sid[:8]}: f0, f1" in r.stdout, r.stdout
    r = cli("check", "--read-headers", "--read-data-subset", f"{int(packs[0].name[:2], 16) % 2 + 1}/2")
    assert r.returncode == 13 and r.stdout.count("header disagree") == 2, r.stdout  # read whole or by header


def test_check_read_headers_on_s3_gets_each_header_alone(scli: Cli, s3proxy: Proxy, tmp_path: Path) -> None:
    """A pack of 3,000 small files has a header past 64 KiB: read as 64 KiB from the end and
    then the rest, the second read was taken by the read-ahead for a scan and brought the
    pack whole (126 MB received for 7 packs of the benchmark's trees). Now the span the index
    leaves after the blobs is read at once: one GET a pack, the headers' bytes only."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3000):
        (src / f"f{i}").write_bytes(os.urandom(8000))
    assert scli("init").returncode == 0
    assert scli("backup", str(src)).returncode == 0
    r = scli("--json", "check")
    assert r.returncode == 0
    before = s3proxy.snapshot()
    r = scli("--json", "check", "--read-headers")
    t = s3proxy.snapshot().since(before)
    assert r.returncode == 0 and r.last("check_summary")["headers_read"] >= 2, (r.stdout, r.stderr)
    pack_gets = {k: n for (m, k), n in t.by_key.items() if m == "GET" and "/data/" in k}
    assert len(pack_gets) == r.last("check_summary")["headers_read"], pack_gets
    assert all(n == 1 for n in pack_gets.values()), pack_gets
    assert t.received < 4 * MiB, t.received  # the data pack alone is 24 MB


def test_a_pack_longer_than_its_index_implies_is_not_read_whole(cli: Cli) -> None:
    """The first read of a header is the span the index leaves after the blobs, up to
    GUESS_MAX: a 12 MiB pack swapped under a small one's name was read whole (as its
    "header"), eight at a time: 8 GiB for packs of 1 GiB."""
    from deltavault.maintenance.check import check_repository
    from deltavault.repository.packcheck import GUESS_MAX

    repo = _repo(cli)
    small = repo.save_blob(BlobType.DATA, os.urandom(1000), compress=False)[0]
    repo.flush()
    big = repo.save_blob(BlobType.DATA, os.urandom(12 * MiB), compress=False)[0]
    repo.flush()
    paths = []
    for b in (small, big):
        loc = repo.index.lookup(b)
        assert loc is not None
        paths.append(cli.repo / "data" / loc.pack_id.hex()[:2] / loc.pack_id.hex())
    tmp = paths[0].with_name("swap")
    paths[0].rename(tmp)
    paths[1].rename(paths[0])
    tmp.rename(paths[1])
    repo = _repo(cli)  # opened again: the index as stored
    reads: list[int] = []
    get = repo.backend.get

    def counted(name: str, offset: int = 0, length: int | None = None) -> bytes:
        data = get(name, offset, length)
        if "/data/" in name or name.startswith("data/"):
            reads.append(len(data))
        return data

    repo.backend.get = counted  # type: ignore[method-assign]
    rep = check_repository(repo, headers=True)
    assert sum("header disagree" in i.message for i in rep.errors) == 2
    assert reads and max(reads) <= GUESS_MAX, reads
