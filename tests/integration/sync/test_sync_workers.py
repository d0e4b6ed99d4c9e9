"""Subtrees synced by worker processes: the same results as one process, including hard
links that span subtrees, errors inside workers, --delete, --skip-empty-dirs, the log,
a full disk and Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltavault.sync.local.pool import DIE_ENV
from tests.conftest import needs_root, needs_tools
from tests.integration.sync.conftest import dv, nothing_to_do, summary, write

pytestmark = [needs_root(), needs_tools("rsync", "setfacl"), pytest.mark.root]


def wide_tree(root: Path, dirs: int = 40, files: int = 6) -> None:
    for d in range(dirs):
        for f in range(files):
            write(root / f"top{d:02}/sub/f{f}", os.urandom(100 + d * 10 + f))
        os.utime(root / f"top{d:02}/sub", ns=(1, 1_000_000_000_000_000_000 + d))
    (root / "top05/emptydir").mkdir()
    os.link(root / "top01/sub/f0", root / "top30/sub/link-to-top01")  # spans two subtrees
    os.link(root / "top01/sub/f0", root / "top31/other-link")
    os.link(root / "top10/sub/f1", root / "top10/sub/same-subtree-link")
    subprocess.run(["setfacl", "-m", "u:1234:rx", str(root / "top07")], check=True)
    os.setxattr(root / "top08", "user.x", b"delegated dir")
    os.utime(root / "top30/sub", ns=(1, 1_100_000_000_000_000_000))
    os.utime(root / "top31", ns=(1, 1_200_000_000_000_000_000))


def test_workers_give_the_same_mirror(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    wide_tree(src)
    write(dst / "top03/sub/extra", b"removed by --delete inside a worker")
    log = tmp_path / "log"
    p = dv("--json", "sync", "--delete", "--acl", "--xattrs", "--log", str(log), str(src), str(dst))
    assert p.returncode == 0, p.stdout + p.stderr
    s = summary(p)
    assert s["workers"] == 2 and s["deleted"] == 1
    assert s["files_new"] + s["hardlinks"] == 40 * 6 + 3
    assert nothing_to_do(src, dst, "-A", "-X", "--delete") == ""
    ino = os.stat(dst / "top01/sub/f0").st_ino
    assert os.stat(dst / "top30/sub/link-to-top01").st_ino == ino == os.stat(dst / "top31/other-link").st_ino
    assert os.stat(dst / "top30/sub").st_mtime_ns == 1_100_000_000_000_000_000  # re-stamped after relinking
    lines = log.read_text().splitlines()
    assert all(len(ln.split("\t")) == 7 for ln in lines)  # no torn lines from concurrent writers
    last = {ln.split("\t")[5]: ln.split("\t")[1] for ln in lines}  # each path's last action
    group = ["top01/sub/f0", "top30/sub/link-to-top01", "top31/other-link"]
    assert sorted(last[g] for g in group) == ["hardlink", "hardlink", "new"]  # which is first varies
    assert sum(a == "new" for a in last.values()) == s["files_new"]
    again = summary(dv("--json", "sync", "--delete", "--acl", "--xattrs", str(src), str(dst)))
    assert again["bytes_written"] == 0 and again["files_new"] == 0 and again["hardlinks"] == 0


def test_workers_and_one_process_agree(tmp_path: Path) -> None:
    src = tmp_path / "src"
    wide_tree(src)
    for n in (1, 3):
        dst = tmp_path / f"dst{n}"
        s = summary(dv("--json", "sync", "--skip-empty-dirs", "--processes", str(n), str(src), str(dst)))
        assert s["workers"] == (0 if n == 1 else 3)
        assert not (dst / "top05/emptydir").exists()
    assert subprocess.run(["diff", "-r", str(tmp_path / "dst1"), str(tmp_path / "dst3")]).returncode == 0


@needs_tools("setpriv")
def test_errors_inside_workers_are_listed(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    wide_tree(src, files=2)
    write(src / "top20/sub/secret", b"s", 0o000)
    os.chown(src / "top20/sub/secret", 65534, 65534)
    p = dv("--json", "sync", str(src), str(dst),
           prefix=("setpriv", "--bounding-set=-dac_override,-dac_read_search",
                   "--inh-caps=-dac_override,-dac_read_search"))
    s = summary(p)
    assert p.returncode == 3 and s["workers"] == 2
    assert [(x["path"], x["kind"]) for x in s["problems"]] == [("top20/sub/secret", "unreadable")]
    assert "unreadable: top20/sub/secret" in p.stdout or "top20/sub/secret" in p.stdout


def test_full_disk_inside_a_worker(tmp_path: Path, loopfs) -> None:
    dst = loopfs("ext4", 8) / "m"
    src = tmp_path / "src"
    wide_tree(src, files=2)
    write(src / "top15/sub/huge", os.urandom(12 << 20))
    p = dv("--json", "sync", str(src), str(dst))
    assert p.returncode == 14, p.stdout + p.stderr
    assert not [x for x in dst.rglob("*") if ".dv-sync-" in x.name]


def test_interrupt_with_workers_leaves_no_temp_files(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    for d in range(40):
        for f in range(200):  # enough work that a stalled test process still interrupts it mid-run
            write(src / f"d{d:02}/x/f{f}", os.urandom(3000))
    proc = subprocess.Popen([sys.executable, "-m", "deltavault", "sync", "--verify", str(src), str(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (dst.exists() and sum(1 for _ in dst.rglob("f*")) > 50):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert not [x for x in dst.rglob("*") if ".dv-sync-" in x.name]
    for f in dst.rglob("f*"):
        assert f.read_bytes() == (src / f.relative_to(dst)).read_bytes()


@pytest.mark.parametrize("when", ["take", "send"])
def test_a_worker_killed_fails_its_subtree_and_the_sync_ends(tmp_path: Path, when: str) -> None:
    """A worker SIGKILLed (the test hook of sync/local/pool.py) as it takes a subtree, or
    half way through sending its result: with one task queue and one result queue for all
    workers, it died holding a queue's lock, and the other workers and the main process
    waited on it for ever (the sync hung). Now its subtree is reported as not synced, the
    other workers sync the rest, and a re-run completes."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    wide_tree(src, files=2)
    p = dv("--json", "sync", str(src), str(dst), env={DIE_ENV: f"{when}:top12"}, timeout=120)
    assert p.returncode == 3, p.stdout + p.stderr
    s = summary(p)
    assert [(x["path"], x["kind"]) for x in s["problems"]] == [("top12", "write")]
    assert "worker process syncing it died" in s["problems"][0]["message"]
    assert "top12" in p.stdout
    assert (dst / "top12/sub/f1").exists() == (when == "send")  # taken: nothing of it was copied
    for d in range(40):
        if d != 12:
            assert (dst / f"top{d:02}/sub/f1").read_bytes() == (src / f"top{d:02}/sub/f1").read_bytes()
    p = dv("--json", "sync", str(src), str(dst), timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert nothing_to_do(src, dst) == ""
