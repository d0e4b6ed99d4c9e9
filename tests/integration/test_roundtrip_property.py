"""Property: random trees with metadata -> backup -> random changes -> incremental ->
restore both -> byte-for-byte and metadata equality with the source at each point."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltavault.backends.local import LocalBackend
from deltavault.backup.files.options import FileBackupOptions
from deltavault.backup.files.run import BackupRequest, run_backup
from deltavault.repository.config import ChunkerParams
from deltavault.repository.repository import Repository
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions
from tests.conftest import FAST_SCRYPT, PASSWORD
from tests.treeutil import manifest

NAME_BYTES = [b"a", b"b", b"Z", b"0", b" ", b"-", b"\n", b"\xe9", b"\xff", b"\xc3\xa9", b".x"]
RACY = 30_000_000

names = st.lists(st.sampled_from(NAME_BYTES), min_size=1, max_size=3).map(b"".join).filter(
    lambda n: n not in (b".", b".."))
sizes = st.sampled_from([0, 1, 100, 4096, 5000, 70_000, 200_000, 300_000])
entry = st.tuples(st.lists(names, min_size=1, max_size=3),
                  st.sampled_from(["file", "file", "file", "dir", "symlink", "hardlink", "fifo"]),
                  sizes, st.integers(0, 2**31), st.sampled_from([0o644, 0o600, 0o755, 0o4750, 0o1777]),
                  st.booleans())
change = st.tuples(st.sampled_from(["overwrite", "append", "truncate", "delete", "add", "chmod", "xattr",
                                    "same-size-same-mtime", "to-dir", "pages"]),
                   st.integers(0, 1000), st.integers(0, 2**31))


def build(root: Path, entries: list, rnd: random.Random) -> None:
    root.mkdir()
    files: list[Path] = []
    for parts, kind, size, mtime, mode, xattr in entries:
        *dirs, leaf = [os.fsdecode(p) for p in parts]
        parent = root.joinpath(*dirs) if dirs else root
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except (NotADirectoryError, FileExistsError):
            continue  # a component is a file or symlink already
        if parent.is_symlink() or not parent.is_dir():
            continue
        path = parent / leaf
        if os.path.lexists(path):
            continue
        if kind == "file":
            path.write_bytes(rnd.randbytes(size))
            files.append(path)
        elif kind == "dir":
            path.mkdir()
        elif kind == "symlink":
            path.symlink_to(os.fsdecode(rnd.choice(NAME_BYTES)))
        elif kind == "hardlink" and files:
            os.link(rnd.choice(files), path)
        elif kind == "fifo":
            os.mkfifo(path)
        else:
            continue
        if not path.is_symlink():
            if kind != "hardlink":
                path.chmod(mode if kind != "dir" else mode | 0o700)
            if xattr and kind in ("file", "dir"):
                os.setxattr(path, "user.k", os.urandom(rnd.randint(0, 50)))
            if kind == "file":
                os.utime(path, ns=(mtime, mtime * 1000 + 123))


def mutate(root: Path, changes: list, rnd: random.Random) -> None:
    for op, pick, seed in changes:
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
        target = files[pick % len(files)] if files else None
        r = random.Random(seed)
        if op == "add" or target is None:
            (root / f"new-{seed}").write_bytes(r.randbytes(r.choice([0, 10, 80_000])))
            continue
        size = target.stat().st_size
        if op == "overwrite" and size:
            with open(target, "r+b") as f:
                f.seek(r.randrange(size))
                f.write(r.randbytes(r.randint(1, 5000)))
        elif op == "pages" and size > 8192:
            with open(target, "r+b") as f:  # in-place page writes, as a database does
                for _ in range(r.randint(1, 5)):
                    f.seek(r.randrange(size // 4096) * 4096)
                    f.write(r.randbytes(4096))
        elif op == "append":
            with open(target, "ab") as f:
                f.write(r.randbytes(r.randint(1, 100_000)))
        elif op == "truncate":
            os.truncate(target, r.randint(0, size))
        elif op == "delete":
            target.unlink()
        elif op == "chmod":
            target.chmod(r.choice([0o600, 0o640, 0o700]))
        elif op == "xattr":
            os.setxattr(target, "user.changed", r.randbytes(8))
        elif op == "same-size-same-mtime" and size:
            st_ = target.stat()
            with open(target, "r+b") as f:
                f.write(bytes(b ^ 0xFF for b in f.read(1)))
            os.utime(target, ns=(st_.st_atime_ns, st_.st_mtime_ns))  # only ctime tells
        elif op == "to-dir":
            target.unlink()
            target.mkdir()
            (target / "inside").write_bytes(r.randbytes(100))


@settings(max_examples=int(os.environ.get("DELTAVAULT_PROPERTY_EXAMPLES", "60")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.lists(entry, min_size=1, max_size=25), changes=st.lists(change, max_size=8),
       seed=st.integers(0, 2**32 - 1))
def test_backup_change_incremental_restore_roundtrip(entries: list, changes: list, seed: int) -> None:
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        src = tmp / "src"
        build(src, entries, rnd)
        # small chunks and a low delta threshold so chunking and page patches are exercised
        repo = Repository.init(LocalBackend(tmp / "repo", fsync=False), PASSWORD, scrypt=FAST_SCRYPT,
                               cache_root=tmp / "cache",
                               chunker=ChunkerParams(min=8 * 1024, avg=16 * 1024, max=64 * 1024))
        opts = FileBackupOptions(racy_window_ns=RACY, delta_threshold=64 * 1024)
        time.sleep(0.04)
        want1 = manifest(src)
        r1 = run_backup(repo, BackupRequest(paths=[str(src)], options=opts))
        time.sleep(0.04)
        mutate(src, changes, rnd)
        time.sleep(0.04)
        want2 = manifest(src)
        r2 = run_backup(repo, BackupRequest(paths=[str(src)], options=opts))
        assert not r1.problems and not r2.problems
        assert r2.change_source == "catalog"
        for res, want, name in ((r1, want1, "o1"), (r2, want2, "o2")):
            reopened = Repository.open(LocalBackend(tmp / "repo"), lambda: PASSWORD, cache_root=tmp / "cache")
            restorer = FileRestorer(reopened, tmp / name, RestoreOptions(verify=True))
            assert res.snapshot.tree is not None
            restorer.run(res.snapshot.tree)
            assert not restorer.problems, restorer.problems
            assert manifest(tmp / name / "src") == want
        shutil.rmtree(tmp / "o1")
