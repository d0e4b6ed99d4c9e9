"""File backup and restore through the real engine on real files. Restore's own cases (chosen
paths, tampered or damaged snapshots, directory metadata) are in test_file_restore.py; the
catalog across mount points and btrfs snapshots in test_file_backup_snapshots.py."""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
import threading
import time
from pathlib import Path

from deltavault.backup.files.options import FileBackupOptions, Source
from deltavault.backup.files.run import BackupRequest, BackupResult, run_backup, scan_totals
from deltavault.backup.volume.options import VolumeRequest
from deltavault.backup.volume.run import run_volume_backup
from deltavault.model.content import Patch
from deltavault.model.types import BlobType
from deltavault.objects.walk import find
from deltavault.progress import NullReporter
from deltavault.repository.repository import Repository
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions
from tests.conftest import needs_tools
from tests.treeutil import allocated, manifest

RACY = 50_000_000  # 50 ms: tests wait this long instead of the default 2 s


def settle() -> None:
    time.sleep(0.06)


def backup(repo: Repository, *paths: Path, **kw: object) -> BackupResult:
    opts = FileBackupOptions(racy_window_ns=RACY, **kw.pop("options", {}))  # type: ignore[arg-type]
    settle()
    res = run_backup(repo, BackupRequest(paths=[str(p) for p in paths], options=opts, **kw))  # type: ignore[arg-type]
    settle()
    return res


def restore(repo: Repository, res: BackupResult, target: Path, **kw: object) -> FileRestorer:
    r = FileRestorer(repo, target, RestoreOptions(**kw))  # type: ignore[arg-type]
    assert res.snapshot.tree is not None
    r.run(res.snapshot.tree)
    return r


def rich_tree(root: Path) -> None:
    rnd = random.Random(7)
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "docs" / "a.txt").write_text("alpha\n" * 1000)
    (root / "docs" / "deep" / "er" / "b.bin").write_bytes(rnd.randbytes(3_000_000))
    (root / "empty.txt").write_bytes(b"")
    (root / "emptydir").mkdir()
    (root / "link").symlink_to("docs/a.txt")
    (root / "dangling").symlink_to("/nonexistent/target")
    (root / "loop").symlink_to("loop")  # a symlink loop is stored, never followed
    os.link(root / "docs" / "a.txt", root / "hardlink-to-a")
    os.mkfifo(root / "fifo")
    (root / os.fsdecode(b"latin1-\xe9t\xe9")).write_text("not UTF-8\n")
    (root / "new\nline").write_text("a newline in the name\n")
    (root / "exec.sh").write_text("#!/bin/sh\n")
    (root / "exec.sh").chmod(0o4755)
    (root / "docs").chmod(0o750)
    os.setxattr(root / "docs" / "a.txt", "user.tag", b"\x00binary\xff")
    subprocess.run(["setfacl", "-m", "u:nobody:rw,g:nogroup:r", str(root / "docs" / "a.txt")], check=True)
    subprocess.run(["setfacl", "-d", "-m", "u:nobody:rx", str(root / "docs")], check=True)
    with open(root / "sparse.img", "wb") as f:  # 5 GiB apparent, 2 small data islands
        f.seek(1 << 20)
        f.write(rnd.randbytes(300_000))
        f.seek(5 << 30)
        f.write(b"tail")
    os.utime(root / "docs" / "a.txt", ns=(1_000_000_123, 1_500_000_456_789))
    if os.geteuid() == 0:
        os.chown(root / "exec.sh", 65534, 65534)
        os.mknod(root / "null-dev", stat.S_IFCHR | 0o644, os.makedev(1, 3))


@needs_tools("setfacl")
def test_roundtrip_keeps_content_and_metadata(tmp_path: Path, repo: Repository) -> None:
    src = tmp_path / "src"
    src.mkdir()
    rich_tree(src)
    res = backup(repo, src)
    assert not [p for p in res.problems if p.partial]
    out = tmp_path / "out"
    r = restore(repo, res, out, verify=True)
    assert not r.problems, r.problems
    assert manifest(out / "src") == manifest(src)
    # sparse stays sparse: 5 GiB apparent, well under 2 MiB allocated
    assert (out / "src" / "sparse.img").stat().st_size == (5 << 30) + 4
    assert allocated(out / "src" / "sparse.img") < 2 << 20
    # every data byte was read back; the 5 GiB of holes were checked without reading them
    data_bytes = (6000 + 3_000_000 + 303_104 + 4  # the sparse island is stored page-aligned
                  + len("not UTF-8\n") + len("a newline in the name\n") + len("#!/bin/sh\n"))
    assert r.stats.bytes_verified == data_bytes


def test_sockets_are_skipped_with_a_note(tmp_path: Path, repo: Repository) -> None:
    import socket

    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(src / "sock"))
    try:
        res = backup(repo, src)
    finally:
        s.close()
    assert [(p.kind, p.partial) for p in res.problems] == [("skipped", False)]
    assert not res.partial


class TotalsReporter(NullReporter):
    """A terminal's progress bar: it asks for totals, which a background scan supplies."""

    wants_totals = True

    def __init__(self) -> None:
        self.totals = threading.Event()
        self.total_bytes: int | None = None
        self.total_items: int | None = None

    def set_totals(self, *, total_bytes: int | None = None, total_items: int | None = None) -> None:
        self.total_bytes, self.total_items = total_bytes, total_items
        self.totals.set()


def test_excluded_entries_are_neither_stored_nor_counted_in_the_progress_totals(tmp_path: Path,
                                                                                repo: Repository) -> None:
    """--exclude holds for the archiver and for the scan that sums sizes for the progress
    bar: an excluded 3 MB log and an excluded cache directory count for nothing."""
    src = tmp_path / "src"
    (src / "cache").mkdir(parents=True)
    (src / "keep.txt").write_bytes(b"k" * 1000)
    (src / "big.log").write_bytes(b"l" * 3_000_000)
    (src / "cache" / "blob").write_bytes(b"c" * 2_000_000)
    opts = FileBackupOptions(excludes=["*.log", "cache"], racy_window_ns=RACY)
    sources = [Source(os.fsencode(src), b"src")]
    assert scan_totals(sources, opts) == (1000, 1)
    rep = TotalsReporter()
    res = run_backup(repo, BackupRequest(paths=[str(src)], options=opts), reporter=rep)
    assert rep.totals.wait(10)
    assert (rep.total_bytes, rep.total_items) == (1000, 1)
    assert res.snapshot.tree is not None
    assert find(repo, res.snapshot.tree, "src/keep.txt") is not None
    assert find(repo, res.snapshot.tree, "src/big.log") is None
    assert find(repo, res.snapshot.tree, "src/cache") is None
    assert res.stats.bytes_total == 1000


def test_incremental_reads_only_changes_and_downloads_nothing(tmp_path: Path, repo: Repository) -> None:
    src = tmp_path / "src"
    for d in range(20):
        (src / f"d{d}").mkdir(parents=True)
        for f in range(20):
            (src / f"d{d}" / f"f{f}").write_bytes(os.urandom(5000))
    first = backup(repo, src)
    assert first.change_source == "none" and first.stats.files_new == 400
    (src / "d3" / "f3").write_bytes(os.urandom(7000))
    (src / "d9" / "new").write_bytes(b"new file")
    (src / "d12" / "f1").unlink()
    downloaded_before = repo.traffic.bytes_read
    second = backup(repo, src)
    assert second.change_source == "catalog"
    assert (second.stats.files_new, second.stats.files_changed, second.stats.files_unmodified) == (1, 1, 398)
    assert second.stats.bytes_read == 7000 + len(b"new file")
    assert repo.traffic.bytes_read == downloaded_before  # nothing pulled back from the repository
    # unchanged directories keep their tree ids
    a, b = first.snapshot.tree, second.snapshot.tree
    assert a is not None and b is not None
    n1, n2 = find(repo, a, "src/d5"), find(repo, b, "src/d5")
    assert n1 is not None and n2 is not None and n1.subtree == n2.subtree
    out = tmp_path / "out"
    restore(repo, second, out)
    assert manifest(out / "src") == manifest(src)


def test_without_catalog_the_parent_trees_are_used(tmp_path: Path, make_repo, cache_root: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    for i in range(30):
        (src / "a" / f"{i}").write_bytes(os.urandom(20_000))
    repo = make_repo()
    backup(repo, src)
    shutil.rmtree(cache_root)  # the local catalog is gone
    (src / "a" / "7").write_bytes(os.urandom(100))
    repo2 = make_repo(reopen=True)
    res = backup(repo2, src)
    assert res.change_source == "parent-trees"
    assert res.stats.files_unmodified == 29 and res.stats.bytes_read == 100
    # it read trees (small), never file data
    assert repo2.traffic.read_by_kind.get("data", 0) < 64 * 1024
    res3 = backup(repo2, src)
    assert res3.change_source == "catalog"


def test_large_file_changed_in_place_stores_only_changed_pages(tmp_path: Path, repo: Repository) -> None:
    src = tmp_path / "src"
    src.mkdir()
    db = src / "app.db"
    rnd = random.Random(5)
    db.write_bytes(rnd.randbytes(40 << 20))
    backup(repo, src, options={"delta_threshold": 32 << 20})
    pages = rnd.sample(range((40 << 20) // 4096), 100)
    with open(db, "r+b") as f:
        for p in pages:
            f.seek(p * 4096)
            f.write(rnd.randbytes(4096))
    before = repo.write_stats.bytes_added_stored
    res = backup(repo, src, options={"delta_threshold": 32 << 20})
    added = repo.write_stats.bytes_added_stored - before
    # 100 random pages = 400 KiB of incompressible data, plus page digests (10,240 x 16 B)
    assert added < 100 * 4096 + 200_000 + 100_000, added
    assert res.snapshot.tree is not None
    node = find(repo, res.snapshot.tree, "src/app.db")
    assert node is not None and any(isinstance(r, Patch) for r in node.content)
    out = tmp_path / "out"
    restore(repo, res, out, verify=True)
    assert (out / "src" / "app.db").read_bytes() == db.read_bytes()


def test_a_file_written_just_before_the_backup_still_gets_page_deltas(tmp_path: Path, repo: Repository) -> None:
    """A live database is always freshly written. Its page digests must stay usable even
    when its ctime falls in the racy window (the file is then re-read, as a delta)."""
    src = tmp_path / "src"
    src.mkdir()
    db = src / "live.db"
    rnd = random.Random(9)
    db.write_bytes(rnd.randbytes(40 << 20))
    opts = FileBackupOptions(delta_threshold=32 << 20)  # default 2 s racy window
    run_backup(repo, BackupRequest(paths=[str(src)], options=opts))
    with open(db, "r+b") as f:
        for p in rnd.sample(range((40 << 20) // 4096), 50):
            f.seek(p * 4096)
            f.write(rnd.randbytes(4096))
    before = repo.write_stats.bytes_added_stored
    res = run_backup(repo, BackupRequest(paths=[str(src)], options=opts))
    assert repo.write_stats.bytes_added_stored - before < 50 * 4096 + 300_000
    out = tmp_path / "out"
    restore(repo, res, out, verify=True)
    assert (out / "src" / "live.db").read_bytes() == db.read_bytes()


class PhaseReporter(NullReporter):
    """Records each phase with the bytes read in it and the packs in the repository at its start."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self.phases: list[tuple[str, int]] = []  # (phase, packs stored when it started)
        self.read: dict[str, int] = {}
        self.finished = 0

    def start(self, phase: str, *, total_bytes: int | None = None, total_items: int | None = None) -> None:
        self.phases.append((phase, sum(1 for _ in self.repo.backend.list("data"))))

    def advance(self, *, nbytes: int = 0, items: int = 0, current: str | None = None) -> None:
        phase = self.phases[-1][0]
        self.read[phase] = self.read.get(phase, 0) + nbytes

    def finish(self) -> None:
        self.finished += 1


def test_the_last_packs_go_up_in_an_upload_phase_after_every_file_is_read(tmp_path: Path,
                                                                          repo: Repository) -> None:
    """A progress bar must not sit full while the last packs and the index are sent: reading
    ends its phase, and the upload is a phase of its own, also for volumes."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(random.Random(1).randbytes(300_000))
    rep = PhaseReporter(repo)
    run_backup(repo, BackupRequest(paths=[str(src)], options=FileBackupOptions(racy_window_ns=RACY)), reporter=rep)
    assert [p for p, _ in rep.phases] == ["backup", "upload"]
    assert rep.read == {"backup": 300_000}
    assert rep.phases[1][1] == 0, "a pack was stored before the upload phase began"
    packs = sum(1 for _ in repo.backend.list("data"))
    assert packs >= 1
    assert rep.finished == 2

    img = tmp_path / "disk.img"
    img.write_bytes(random.Random(2).randbytes(1 << 20))
    vrep = PhaseReporter(repo)
    run_volume_backup(repo, VolumeRequest(path=str(img)), vrep)
    assert [p for p, _ in vrep.phases] == ["volume", "upload"]
    assert vrep.phases[1][1] == packs and sum(1 for _ in repo.backend.list("data")) > packs
    assert vrep.finished == 2


def test_chunks_are_those_of_the_whole_file_and_a_reread_adds_no_data(tmp_path: Path, repo: Repository) -> None:
    """Chunks travel to the workers in batches (small files' chunks, a large file's read
    window) and are sealed together: each file's content must still be the chunks FastCDC
    cuts from the whole file, each under the id of its own bytes, so the same data dedups
    as before; and reading everything again (``read_all``) must add no data blob."""
    from deltavault.backup.files.run import chunker_for
    from deltavault.model.content import Full

    src = tmp_path / "src"
    src.mkdir()
    rnd = random.Random(11)
    text = b"".join(b"%d: a line of a source file, compressible\n" % i for i in range(200_000))
    files: dict[str, bytes] = {}
    for i in range(300):  # small files, some of them equal
        files[f"small/{i:03d}"] = rnd.randbytes(rnd.randint(0, 60_000)) if i % 3 else text[i * 100:i * 100 + rnd.randint(0, 60_000)]
    files["small/copy"] = files["small/001"]
    for i in range(20):  # cut into several chunks, batched
        n = rnd.randint(100_000, 900_000)
        files[f"medium/{i:02d}"] = text[:n] if i % 2 else rnd.randbytes(n)
    files["large/mixed"] = (text + rnd.randbytes(3 << 20))[: 9 << 20]  # streamed, several windows
    files["large/db"] = rnd.randbytes(12 << 20)  # over the delta threshold: page digests too
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    res = backup(repo, src, options={"delta_threshold": 10 << 20})
    chunker = chunker_for(repo)
    assert res.snapshot.tree is not None
    for name, data in files.items():
        node = find(repo, res.snapshot.tree, f"src/{name}")
        assert node is not None, name
        want = [Full(repo.blob_id(data[o:o + n]), n) for o, n in chunker.cut(data)]
        assert node.content == want, name
    assert find(repo, res.snapshot.tree, "src/large/db").pages  # type: ignore[union-attr]
    before = set(repo.index.blob_ids())
    again = backup(repo, src, options={"delta_threshold": 10 << 20, "read_all": True})
    assert again.stats.bytes_read == sum(len(d) for d in files.values())
    added = {e.type for bid, _, e, _ in repo.index.iter_records() if bid not in before}
    assert added <= {int(BlobType.TREE)}, added  # at most trees (access times), never data


def test_a_dry_run_counts_what_the_real_run_then_adds(repo: Repository, tmp_path: Path) -> None:
    """--dry-run saves small files' chunks in batches as a real run does, and counts the
    same blobs, and the same bytes before compression, as the real run then adds."""
    rnd = random.Random(7)
    src = tmp_path / "src"
    for i in range(300):  # every third file the same: duplicates within and across batches
        p = src / f"d{i % 5}" / f"f{i}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(rnd.randbytes(rnd.randrange(100, 20_000)) if i % 3 else b"same content " * 50)
    (src / "big.bin").write_bytes(rnd.randbytes(3 << 20))
    dry = backup(repo, src, dry_run=True)
    assert dry.snapshot_id is None and repo.write_stats.blobs_added == 0
    real = backup(repo, src)
    d, r = dry.snapshot.summary, real.snapshot.summary
    assert d.blobs_added == r.blobs_added > 200
    assert d.bytes_added == r.bytes_added_raw > 3 << 20
    again = backup(repo, src, dry_run=True)
    assert again.snapshot.summary.blobs_added == 0 and again.bytes_added == 0
