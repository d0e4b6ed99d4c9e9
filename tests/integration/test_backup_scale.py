"""A file backup's memory does not grow with the number of files (issue #18: a no-change
incremental of 1M files in under 200 MB). Measured with tracemalloc, which counts the
Python allocations themselves, so the bound is exact, not timed or sampled."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from deltavault.backup.files.options import FileBackupOptions
from deltavault.backup.files.run import BackupRequest, run_backup
from deltavault.repository.repository import Repository
from tests.integration.test_file_backup import RACY, settle

DIRS, FILES = 50, 200  # 10,000 files, as the scale benchmark lays them out (bench/scale_tree.py)


def _tree(root: Path) -> None:
    for d in range(DIRS):
        leaf = root / f"d{d // 10}" / f"s{d:03d}"
        leaf.mkdir(parents=True)
        for f in range(FILES):
            (leaf / f"f{f:03d}").write_bytes(b"%d/%d\n" % (d, f) * (1 + f % 7))


def _peak_of_backup(repo: Repository, src: Path) -> tuple[int, int]:
    """(peak traced bytes of one backup run, files it found unmodified)."""
    settle()
    tracemalloc.start()
    try:
        res = run_backup(repo, BackupRequest(paths=[str(src)], options=FileBackupOptions(racy_window_ns=RACY)))
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, res.stats.files_unmodified


def test_a_no_change_incremental_holds_one_directory_not_the_whole_tree(tmp_path: Path,
                                                                        repo: Repository) -> None:
    # Each finished directory kept its entries (and its previous listing) alive through its
    # parent until the root was done: about 1.2 KB a file, 1.2 GB for 1M files.
    src = tmp_path / "src"
    _tree(src)
    settle()
    run_backup(repo, BackupRequest(paths=[str(src)], options=FileBackupOptions(racy_window_ns=RACY)))
    peak, unmodified = _peak_of_backup(repo, src)
    assert unmodified == DIRS * FILES
    # 10,000 entries held at once would be about 12 MB; a directory of 200 about 0.25 MB,
    # and the run's fixed costs (catalog, index, thread pool) about 1 MB.
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MiB"
