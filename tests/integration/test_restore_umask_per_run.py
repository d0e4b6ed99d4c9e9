"""A restore creates a file with its final mode where the umask keeps it whole
(restore/target.py MadeIn.exact), so the umask it goes by must be the one its files are
created with: read for each run, not once for the process, whose umask may change between
two restores (a program using the library, or these tests)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from deltavault.repository.repository import Repository
from tests.integration.test_file_backup import backup, restore


def test_each_restore_in_a_process_goes_by_its_own_umask(tmp_path: Path, repo: Repository) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for rel, mode in (("d/f644", 0o644), ("d/f755", 0o755), ("d/f600", 0o600)):
        (src / rel).write_bytes(rel.encode())
        os.chmod(src / rel, mode)
    res = backup(repo, src)
    old = os.umask(0o022)
    try:
        restore(repo, res, tmp_path / "first")
        os.umask(0o077)  # (a run with umask 022 came first in this process)
        r = restore(repo, res, tmp_path / "second")
    finally:
        os.umask(old)
    assert not r.problems
    for rel, mode in (("d/f644", 0o644), ("d/f755", 0o755), ("d/f600", 0o600)):
        for out in ("first", "second"):
            got = stat.S_IMODE((tmp_path / out / "src" / rel).stat().st_mode)
            assert got == mode, (out, rel, oct(got))
