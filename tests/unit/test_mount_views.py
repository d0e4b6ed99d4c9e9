"""Random access to stored content without FUSE: files from full blobs, holes and page
patches; volumes from block maps; partitions as windows; the bounded cache; the layout's
names from untrusted snapshot fields."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from deltavault.backup.volume.options import VolumeOptions, VolumeRequest
from deltavault.backup.volume.run import run_volume_backup
from deltavault.errors import CorruptionError
from deltavault.model.content import Full, Hole, Patch
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from deltavault.objects.patch import encode_patch
from deltavault.objects.volumes import load_manifest
from deltavault.repository.repository import Repository
from deltavault.restore.mount.blobs import ByteCache, MountBlobs
from deltavault.restore.mount.layout import SnapRoot, SynthDir, SynthLink, build_layout
from deltavault.restore.mount.views import ContentView, VolumeView, WindowView

KiB = 1024


def test_reads_anywhere_equal_the_bytes_through_full_holes_and_patches(repo: Repository) -> None:
    rnd = random.Random(1)
    a, b = rnd.randbytes(300 * KiB), rnd.randbytes(64 * KiB)
    patched = bytearray(b)
    p1 = [(4096, rnd.randbytes(4096)), (40960, rnd.randbytes(8192))]
    p2 = [(4096, rnd.randbytes(100))]
    for patch in (p1, p2):
        for off, d in patch:
            patched[off:off + len(d)] = d
    ida, _ = repo.save_blob(BlobType.DATA, a)
    idb, _ = repo.save_blob(BlobType.DATA, b)
    pid1, _ = repo.save_blob(BlobType.DATA, encode_patch(p1))  # type: ignore[arg-type]
    pid2, _ = repo.save_blob(BlobType.DATA, encode_patch(p2))  # type: ignore[arg-type]
    repo.flush()
    refs = [Full(ida, len(a)), Hole(128 * KiB), Patch(idb, [pid1, pid2], len(b), b"\x03"), Hole(5)]
    want = a + bytes(128 * KiB) + bytes(patched) + bytes(5)
    blobs = MountBlobs(repo, cache_bytes=1 << 20)
    view = ContentView(blobs, refs, len(want))
    for _ in range(1000):
        off = rnd.randrange(0, len(want) + 10)
        n = rnd.randrange(0, 200 * KiB)
        assert view.read(off, n) == want[off:off + n]
    assert view.read(0, len(want)) == want  # sequential: read-ahead on the way
    assert view.seek(0, os.SEEK_HOLE) == len(a)
    assert view.seek(len(a) + 7, os.SEEK_DATA) == len(a) + 128 * KiB
    assert view.seek(len(want) - 3, os.SEEK_HOLE) == len(want) - 3
    with pytest.raises(OSError) as exc:
        view.seek(len(want) - 3, os.SEEK_DATA)
    assert exc.value.errno == errno.ENXIO
    with pytest.raises(CorruptionError):
        ContentView(blobs, refs, len(want) + 1)  # a tree that lies about the size
    blobs.close()


def test_the_cache_stays_within_its_bound_and_loads_each_blob_once() -> None:
    cache = ByteCache(1000)
    loads: list[bytes] = []

    def load(k: bytes) -> Callable[[], bytes]:
        return lambda: loads.append(k) or k * 100  # type: ignore[func-returns-value]

    for k in (b"a", b"b", b"a", b"c", b"d", b"e"):
        cache.get(k, load(k))
    assert loads == [b"a", b"b", b"c", b"d", b"e"]
    assert sum(len(v) for v in cache._items.values()) <= 1000


def test_a_volume_view_and_its_partition_windows_equal_the_image(make_repo: Callable[..., Repository],
                                                                  tmp_path: Path) -> None:
    repo = make_repo()
    rnd = random.Random(2)
    img = tmp_path / "v.img"
    data = bytearray(24 << 20)
    for off in (0, 5 << 20, (17 << 20) + 4096):
        data[off:off + (1 << 20)] = rnd.randbytes(1 << 20)
    img.write_bytes(bytes(data))
    res = run_volume_backup(repo, VolumeRequest(str(img), source_id="t", parent=None,
                                                options=VolumeOptions(block_size=256 * KiB)))
    _sid, snap = repo.resolve_snapshot(res.snapshot_id)
    assert snap.volume is not None
    blobs = MountBlobs(repo)
    view = VolumeView(blobs, load_manifest(repo, snap.volume))
    for _ in range(500):
        off = rnd.randrange(0, len(data))
        n = rnd.randrange(1, 3 << 20)
        assert view.read(off, n) == bytes(data[off:off + n])
    assert view.seek(1 << 20, os.SEEK_HOLE) == 1 << 20
    assert view.seek(1 << 20, os.SEEK_DATA) == 5 << 20
    win = WindowView(view, 4 << 20, 4 << 20)
    assert win.read(0, 8 << 20) == bytes(data[4 << 20:8 << 20])
    assert win.seek(0, os.SEEK_DATA) == 1 << 20
    assert win.seek(2 << 20, os.SEEK_HOLE) == 2 << 20
    blobs.close()


def _snap(host: str, path: str, t: int, kind: str = "files") -> Snapshot:
    return Snapshot(time="", time_ns=t * 10**9, hostname=host, paths=[path], kind=kind, tree=b"\0" * 32)


def test_the_layout_names_and_links_and_what_it_refuses() -> None:
    problems: list[tuple[str, str]] = []
    snaps = [("aa" * 32, _snap("web1", "/srv/data", 100)), ("bb" * 32, _snap("web1", "/srv/data", 200)),
             ("cc" * 32, _snap("../etc", "/x", 300)), ("dd" * 32, _snap("web1", "/srv/../../etc", 400)),
             ("ee" * 32, _snap("db", "/dev/vg0/db", 500, "volume"))]
    root = build_layout(snaps, lambda where, msg: problems.append((where, msg)))
    assert sorted(root.children) == [b"by-host", b"snapshots", b"volumes"]
    top = root.children[b"snapshots"]
    assert isinstance(top, SynthDir)
    names = sorted(n for n in top.children if n != b"latest")
    assert names == [b"1970-01-01T00:01:40Z_aaaaaaaa", b"1970-01-01T00:03:20Z_bbbbbbbb",
                     b"1970-01-01T00:05:00Z_cccccccc", b"1970-01-01T00:06:40Z_dddddddd"]
    assert all(isinstance(top.children[n], SnapRoot) for n in names)
    by_host = root.children[b"by-host"]
    assert isinstance(by_host, SynthDir) and sorted(by_host.children) == [b"db", b"web1"]
    data = by_host.children[b"web1"]
    for comp in (b"srv", b"data"):
        assert isinstance(data, SynthDir)
        data = data.children[comp]
    assert isinstance(data, SynthDir)
    latest = data.children[b"latest"]
    assert isinstance(latest, SynthLink) and latest.target == b"1970-01-01T00:03:20Z"
    link = data.children[b"1970-01-01T00:03:20Z"]
    assert isinstance(link, SynthLink)
    assert link.target == b"../../../../snapshots/1970-01-01T00:03:20Z_bbbbbbbb/data"
    assert len(problems) == 2 and all("left out of by-host" in m for _w, m in problems)
