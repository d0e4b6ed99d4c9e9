#!/usr/bin/env python3
"""The main job, end to end, through the real CLI:

create a local repository, back up a sample tree, change it (edits, new and deleted files,
a database-like file changed in place), back up again, restore both snapshots with
--verify, compare them with the source as it was at each point, check the repository and
print a summary.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "demo-work"
PAGE = 4096


def dv(*args: str, check: bool = True) -> list[dict]:
    env = dict(os.environ, DELTAVAULT_PASSWORD_FILE=str(WORK / "password"),
               DELTAVAULT_REPOSITORY=str(WORK / "repo"), DELTAVAULT_CACHE_DIR=str(WORK / "cache"))
    env.pop("DELTAVAULT_PASSWORD", None)
    p = subprocess.run([sys.executable, "-m", "deltavault", "--json", *args], env=env,
                       capture_output=True, text=True)
    if check and p.returncode != 0:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(f"demo: 'deltavault {' '.join(args)}' failed with exit code {p.returncode}")
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def make_tree(src: Path, rnd: random.Random) -> None:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    for d in range(12):
        sub = src / f"project-{d:02d}" / "src"
        sub.mkdir(parents=True)
        for f in range(25):
            text = "\n".join(" ".join(rnd.choice(words) for _ in range(12)) for _ in range(rnd.randint(5, 300)))
            (sub / f"module_{f:02d}.py").write_text(text + "\n")
        (sub.parent / "blob.bin").write_bytes(rnd.randbytes(rnd.randint(10_000, 2_000_000)))
    (src / "empty-dir").mkdir()
    (src / "project-00" / "latest").symlink_to("src")
    (src / "project-01" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "project-01" / "run.sh").chmod(0o755)
    (src / "odd name\nwith newline.txt").write_text("names may hold newlines\n")
    (src / os.fsdecode(b"latin1-\xe9t\xe9.txt")).write_text("not UTF-8\n")
    try:
        os.setxattr(src / "project-01" / "run.sh", "user.origin", b"demo")
    except OSError:
        pass
    # A 64 MiB "database": fixed pages, later updated in place.
    with open(src / "app.db", "wb") as f:
        for _ in range(64 * 1024 * 1024 // PAGE):
            f.write(rnd.randbytes(PAGE // 2) + b"row data " * (PAGE // 18) + bytes(PAGE // 2 - 9 * (PAGE // 18)))


def change_tree(src: Path, rnd: random.Random) -> dict[str, int]:
    files = sorted(p for p in src.rglob("*.py"))
    edited = rnd.sample(files, 30)
    for p in edited:
        with open(p, "a") as f:
            f.write("# changed\n")
    for p in rnd.sample([f for f in files if f not in edited], 8):
        p.unlink()
    for i in range(10):
        (src / "project-03" / "src" / f"new_{i}.py").write_text(f"print({i})\n" * 50)
    db = src / "app.db"
    pages = db.stat().st_size // PAGE
    changed = rnd.sample(range(pages), pages // 100)  # 1% of the pages, in place
    with open(db, "r+b") as f:
        for pg in changed:
            f.seek(pg * PAGE)
            f.write(rnd.randbytes(PAGE))
    (src / "project-02" / "blob.bin").chmod(0o600)
    return {"edited": len(edited), "deleted": 8, "added": 10, "db_pages_changed": len(changed)}


def manifest(root: Path) -> dict[str, tuple]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = os.fsencode(p.relative_to(root)).hex()
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                digest = os.readlink(p)
            else:
                digest = ""
            mtime = st.st_mtime_ns if not stat.S_ISDIR(st.st_mode) else 0
            out[rel] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), mtime, digest)
    return out


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    (WORK / "password").write_text("demo password\n")
    src = WORK / "data"
    src.mkdir()
    rnd = random.Random(42)
    make_tree(src, rnd)
    time.sleep(2.1)  # let the tree age past the racy-timestamp window of the first run
    m1 = manifest(src)

    dv("init")
    b1 = dv("backup", str(src))[-1]
    changes = change_tree(src, rnd)
    m2 = manifest(src)
    b2 = dv("backup", str(src))[-1]
    rows = []
    for n, (snap, want) in enumerate(((b1, m1), (b2, m2)), start=1):
        target = WORK / f"restore-{n}"
        r = dv("restore", snap["snapshot"], "--target", str(target), "--verify")[-1]
        got = manifest(target / "data")
        rows.append((snap["snapshot"][:8], r["files"], r["bytes_written"], r["errors"], got == want))
    check = dv("check", "--read-data")[-1]
    stats = dv("stats")[-1]

    mb = lambda n: f"{n / 1e6:8.1f} MB"  # noqa: E731
    print("deltavault demo")
    print(f"  repository: {WORK / 'repo'} (encrypted, password in demo-work/password)")
    print(f"  changes between runs: {changes}")
    print("  run          files new/changed/unmodified    read        added    downloaded   time")
    for label, b in (("full", b1), ("incremental", b2)):
        print(f"  {label:<12} {b['files_new']:>5}/{b['files_changed']:>5}/{b['files_unmodified']:>5}"
              f"          {mb(b['bytes_read'])} {mb(b['bytes_added'])} {mb(b['bytes_downloaded'])}"
              f"  {b['seconds']:.2f} s   (compared via {b['change_source']})")
    for sid, files, nbytes, errors, same in rows:
        print(f"  restore {sid}: {files} files, {mb(nbytes)}, verify errors {errors}, "
              f"equal to the source at that time: {'yes' if same else 'NO'}")
    print(f"  check --read-data: {check['blobs_checked']} blobs, {check['errors']} errors")
    print(f"  repository: {stats['packs']} packs, {mb(stats['pack_bytes'])} stored, "
          f"dedup {stats['dedup_ratio']:.2f}x, compression {stats['compression_ratio']:.2f}x")
    ok = all(r[3] == 0 and r[4] for r in rows) and check["errors"] == 0
    print("  result:", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
