"""The volume engine on plain image files (no file system, no root): block maps, page
digests, patch chains, holes, odd sizes, resizes, restore, check and reachability."""

from __future__ import annotations

import hashlib
import os
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pyroaring import BitMap

from deltavault.backup.volume.blocks import MAX_CHAIN, SegmentEncoder, SegmentPlan
from deltavault.backup.volume.options import VolumeOptions, VolumeRequest
from deltavault.backup.volume.run import run_volume_backup
from deltavault.chunking.pages import PageHasher
from deltavault.errors import UsageError
from deltavault.maintenance.check import check_repository
from deltavault.model.content import Full, Hole, Patch
from deltavault.model.types import BlobType
from deltavault.objects.reader import read_ref
from deltavault.objects.volumes import load_manifest, volume_blob_ids
from deltavault.repository.pack import pack_name
from deltavault.repository.repository import Repository
from deltavault.restore.volume import VolumeRestoreOptions, VolumeRestorer
from deltavault.tracking.volume import pagesets
from deltavault.tracking.volume.readers import FileReader
from deltavault.workers import Inflight

MiB = 1 << 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def backup(repo: Repository, path: Path, **opts: object):  # type: ignore[no-untyped-def]
    return run_volume_backup(repo, VolumeRequest(str(path), source_id="img",
                                                 options=VolumeOptions(**opts)))  # type: ignore[arg-type]


def restore(repo: Repository, sid: str, target: Path) -> Path:
    _s, snap = repo.resolve_snapshot(sid)
    assert snap.volume is not None
    st = VolumeRestorer(repo, load_manifest(repo, snap.volume), str(target),
                        VolumeRestoreOptions(overwrite=True, verify=True,
                                             page_key=repo.master.mac if repo.master else None)).run()
    assert st.pages_mismatched == 0
    return target


def scribble(path: Path, rnd: random.Random, n: int, size: int) -> set[int]:
    pages = set()
    with open(path, "r+b") as f:
        for _ in range(n):
            p = rnd.randrange(size // 4096)
            f.seek(p * 4096 + rnd.randrange(4000))
            f.write(rnd.randbytes(50))
            pages.add(p)
    return pages


def test_sparse_image_incremental_and_restore(repo: Repository, tmp_path: Path) -> None:
    rnd = random.Random(1)
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(24 * MiB)
        for i in range(0, 24, 3):
            f.seek(i * MiB)
            f.write(rnd.randbytes(MiB))
    old = tmp_path / "old.img"
    old.write_bytes(img.read_bytes())
    r1 = backup(repo, img)
    assert r1.report.bytes_zero_skipped >= 14 * MiB
    assert r1.report.bytes_read <= 9 * MiB
    changed = scribble(img, rnd, 40, 24 * MiB)
    r2 = backup(repo, img)
    rep = r2.report
    assert rep.change_source == "block-digests"
    assert rep.pages_changed == len(changed)
    assert rep.bytes_added < len(changed) * 4096 + 2 * MiB  # patches, plus the page digests
    assert sha(restore(repo, r2.snapshot_id, tmp_path / "r2.img")) == sha(img)
    assert sha(restore(repo, r1.snapshot_id, tmp_path / "r1.img")) == sha(old)
    # Nothing changed: read again (no change source for a bare image), nothing new stored.
    r3 = backup(repo, img)
    assert r3.report.blocks_changed == 0 and r3.report.pages_changed == 0
    assert r3.snapshot.volume == r2.snapshot.volume  # the same manifest, block maps and digests


@pytest.mark.parametrize("size", [4096 * 3 + 512, 3 * MiB + 1234, 65 * MiB])
def test_odd_sizes(repo: Repository, tmp_path: Path, size: int) -> None:
    img = tmp_path / "odd.img"
    img.write_bytes(os.urandom(size))
    backup(repo, img, block_size=256 * 1024)
    with open(img, "r+b") as f:
        f.seek(size - 10)
        f.write(b"0123456789")
    r = backup(repo, img, block_size=256 * 1024)
    assert r.report.pages_changed == 1
    assert sha(restore(repo, r.snapshot_id, tmp_path / "r.img")) == sha(img)


def test_resize_and_block_size_change_read_everything(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(4 * MiB))
    backup(repo, img)
    with open(img, "ab") as f:
        f.write(os.urandom(MiB))
    r = backup(repo, img)
    assert any("resized" in n for n in r.report.notes)
    assert sha(restore(repo, r.snapshot_id, tmp_path / "a.img")) == sha(img)
    r2 = backup(repo, img, block_size=64 * 1024)
    assert any("block size changed" in n for n in r2.report.notes)
    assert r2.report.bytes_to_read == 5 * MiB  # other blocks: nothing to compare or dedup against
    assert sha(restore(repo, r2.snapshot_id, tmp_path / "b.img")) == sha(img)


def test_bad_options(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "x.img"
    img.write_bytes(bytes(8192))
    with pytest.raises(UsageError, match="power of two"):
        backup(repo, img, block_size=3000)
    with pytest.raises(UsageError, match="qcow2"):
        backup(repo, img, cbt="qemu")
    with pytest.raises(UsageError, match="does not exist"):
        backup(repo, tmp_path / "nope.img")


def _encoder(repo: Repository, img: Path, pool: ThreadPoolExecutor, bs: int) -> SegmentEncoder:
    return SegmentEncoder(repo, FileReader(str(img)), PageHasher(repo.master.mac if repo.master else None),
                          size=img.stat().st_size, block_size=bs, pool=pool, inflight=Inflight(64 * MiB))


def test_patch_chains_are_bounded_and_rebased(repo: Repository, tmp_path: Path) -> None:
    """The change source names only the pages written; blocks grow patch chains, which are
    merged at MAX_CHAIN and become a new base past half the block."""
    rnd = random.Random(3)
    bs = 256 * 1024
    ppb = bs // 4096
    img = tmp_path / "disk.img"
    img.write_bytes(rnd.randbytes(4 * bs))
    n = img.stat().st_size // 4096
    with ThreadPoolExecutor(2) as pool:
        res = _encoder(repo, img, pool, bs).encode(SegmentPlan(0, 0, n, pagesets.span(0, n), BitMap()))
        refs, digests = res.resolved(), res.digests
        assert all(isinstance(r, Full) for r in refs)
        chains = []
        for _run in range(3 * MAX_CHAIN):
            pages = {rnd.randrange(8) for _ in range(2)}  # block 0 only, a few hot pages
            with open(img, "r+b") as f:
                for p in pages:
                    f.seek(p * 4096)
                    f.write(rnd.randbytes(4096))
            plan = SegmentPlan(0, 0, n, BitMap(pages), BitMap(), refs, digests)
            res = _encoder(repo, img, pool, bs).encode(plan)
            before = refs
            refs, digests = res.resolved(), res.digests
            assert refs[1:] == before[1:]  # untouched blocks keep their references
            ref0 = refs[0]
            assert isinstance(ref0, Patch)
            chains.append(len(ref0.patches))
            repo.flush()
            assert read_ref(repo, ref0) == img.read_bytes()[:bs]
        assert max(chains) == MAX_CHAIN and 1 in chains[MAX_CHAIN:]  # merged, then grew again
        # More than half the block written: it becomes a new base (the rest is read).
        pages = set(range(ppb * 3 // 4))
        with open(img, "r+b") as f:
            f.seek(0)
            f.write(rnd.randbytes(len(pages) * 4096))
        res = _encoder(repo, img, pool, bs).encode(SegmentPlan(0, 0, n, BitMap(pages), BitMap(), refs, digests))
        refs = res.resolved()
        repo.flush()
        assert isinstance(refs[0], Full) and read_ref(repo, refs[0]) == img.read_bytes()[:bs]
        assert res.stats.extra_read == (ppb - len(pages)) * 4096
        assert res.stats.stale_mismatch == 0
        # Zero pages known from outside (free space): a block that becomes all zeros is a Hole.
        res = _encoder(repo, img, pool, bs).encode(SegmentPlan(0, 0, n, BitMap(), pagesets.span(ppb, 2 * ppb),
                                                               refs, res.digests))
        assert isinstance(res.resolved()[1], Hole)


def test_check_and_reachability(repo: Repository, tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(6 * MiB) + bytes(2 * MiB))
    r1 = backup(repo, img)
    scribble(img, random.Random(5), 30, 8 * MiB)
    r2 = backup(repo, img)
    rep = check_repository(repo, read_data=True)
    assert not rep.errors, [i.message for i in rep.issues]
    used = {r1.snapshot.volume, r2.snapshot.volume}
    for s in (r1, r2):
        assert s.snapshot.volume is not None
        used.update(volume_blob_ids(repo, s.snapshot.volume))
    by_pack = repo.index.entries_by_pack()
    assert used == {e.id for entries in by_pack.values() for e in entries}
    # Damage: delete the packs holding block data; both snapshots are reported, as volumes.
    for pid, entries in by_pack.items():
        if any(e.type == BlobType.DATA for e in entries):
            repo.backend.delete(pack_name(pid))
    reopened = Repository.open(repo.backend, lambda: b"test password", use_cache=False, tolerant=True)
    rep = check_repository(reopened)
    assert set(rep.affected) == {r1.snapshot_id, r2.snapshot_id}
    assert all(set(paths) == {"(volume)"} for paths in rep.affected.values())
    assert any("block(s)" in i.message for i in rep.errors)
