"""Error paths with real causes: unreadable files (root without CAP_DAC_*), a destination
file system that fills up, files that change or vanish while being copied, a bad disk
(simulated: the one fault we cannot make happen), --stop-on-error, Ctrl-C."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import deltavault.sync.local.files as files_mod
import deltavault.sync.sender.source as source_mod
from deltavault.errors import NoSpace
from deltavault.sync.local.engine import Syncer
from deltavault.sync.options import SyncOptions
from deltavault.sync.report import SyncLog
from tests.conftest import needs_root, needs_tools
from tests.integration.sync.conftest import dv, growing, summary, unreadable_tree, write

pytestmark = [needs_root(), pytest.mark.root]

NO_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search",
          "--inh-caps=-dac_override,-dac_read_search")


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".dv-sync-" in p.name]


@needs_tools("setpriv")
def test_unreadable_files_are_listed_and_the_rest_is_synced(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    unreadable_tree(src, dst)
    write(src / "d-ok", b"also fine")
    log = tmp_path / "log"
    p = dv("--json", "sync", "--delete", "--log", str(log), str(src), str(dst), prefix=NO_DAC)
    assert p.returncode == 3, p.stdout + p.stderr
    s = summary(p)
    kinds = {(x["path"], x["kind"]) for x in s["problems"]}
    assert kinds == {("b-secret", "unreadable"), ("c-locked", "unreadable")}
    assert all("Permission denied" in x["message"] for x in s["problems"])
    assert (dst / "a-ok").read_bytes() == b"fine" and (dst / "d-ok").read_bytes() == b"also fine"
    assert not (dst / "b-secret").exists()
    assert (dst / "c-locked/old").exists()  # never delete what could not be compared
    errors = [ln.split("\t") for ln in log.read_text().splitlines() if ln.split("\t")[1] == "error"]
    assert sorted(e[5] for e in errors) == ["b-secret", "c-locked"]


@needs_tools("setpriv")
def test_stop_on_error_stops_at_the_first(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "a-secret", b"secret", 0o000)
    os.chown(src / "a-secret", 65534, 65534)
    for i in range(20):
        write(src / f"z{i:02}", b"later")
    p = dv("--json", "sync", "--stop-on-error", str(src), str(dst), prefix=NO_DAC)
    s = summary(p)
    assert p.returncode == 3 and s["stopped"] and s["errors"] == 1
    assert s["files_new"] == 0 and not list(dst.glob("z*"))


@needs_tools("mkfs.ext4")
def test_full_destination_exits_14_and_leaves_no_partial_file(tmp_path: Path, loopfs) -> None:
    dst = loopfs("ext4", 8) / "mirror"
    src = tmp_path / "src"
    small = {f"a{i}": os.urandom(200_000) for i in range(5)}
    for n, d in small.items():
        write(src / n, d)
    write(src / "b-huge", os.urandom(12 << 20))  # more than the whole file system
    write(src / "c-after", b"never reached")
    p = dv("--json", "sync", str(src), str(dst))
    assert p.returncode == 14, p.stdout + p.stderr
    err = [x for x in map(__import__("json").loads, p.stdout.splitlines()) if x.get("type") == "error"][-1]
    assert err["error"] == "NoSpace" and "is full" in err["message"] and "b-huge" in err["message"]
    s = summary(p)
    assert any(x["path"] == "b-huge" and "no space" in x["message"] for x in s["problems"])
    for n, d in small.items():
        assert (dst / n).read_bytes() == d  # what was synced is complete
    assert not (dst / "b-huge").exists() and not temp_files(dst)


def test_file_that_keeps_changing_is_reported_not_installed(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "growing.log", os.urandom(48 << 20))
    write(src / "steady", b"steady")
    with growing(src / "growing.log"):
        p = dv("--json", "sync", str(src), str(dst))
    assert p.returncode == 3, p.stdout + p.stderr
    probs = summary(p)["problems"]
    assert [(x["path"], x["kind"]) for x in probs] == [("growing.log", "changed")]
    assert "3 times" in probs[0]["message"]
    assert not (dst / "growing.log").exists() and (dst / "steady").exists() and not temp_files(dst)


def test_vanished_file_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file deleted between listing and opening it: the race a live tree has."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "gone", b"soon gone")
    write(src / "stays", b"here")
    real = source_mod.open_source

    def vanishing(sfd: int, name: bytes) -> int:
        if name == b"gone":
            os.unlink(name, dir_fd=sfd)
        return real(sfd, name)

    monkeypatch.setattr(source_mod, "open_source", vanishing)
    r = Syncer(src, dst, SyncOptions()).run()
    assert [(p.path, p.kind) for p in r.problems] == [("gone", "vanished")]
    assert (dst / "stays").exists() and not (dst / "gone").exists()


def test_verify_mismatch_is_renamed_aside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk that stores other bytes than it was given cannot be made on demand, so the
    write path is made to flip a bit after the source digest was taken."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    write(src / "bad", os.urandom(100_000))
    write(src / "good", os.urandom(100_000))
    write(dst / "bad", b"previous version")
    real = files_mod.copy_data

    def flaky(sfd: int, tfd: int, st: os.stat_result, *a: object, **kw: object) -> int:
        n = real(sfd, tfd, st, *a, **kw)  # type: ignore[arg-type]
        if os.readlink(f"/proc/self/fd/{sfd}").endswith("/bad"):
            b = os.pread(sfd, 1, 500)
            os.pwrite(tfd, bytes([b[0] ^ 1]), 500)
        return n

    monkeypatch.setattr(files_mod, "copy_data", flaky)
    log = tmp_path / "log"
    sl = SyncLog(log)
    r = Syncer(src, dst, SyncOptions(verify=True), log=sl).run()
    sl.close()
    assert [(p.path, p.kind) for p in r.problems] == [("bad", "verify")]
    assert "direct" in r.problems[0].message  # read back with O_DIRECT on this file system
    assert (dst / "bad").read_bytes() == b"previous version"  # the bad copy is not in place
    aside = list(dst.glob("bad.dv-verify-failed-*"))
    assert len(aside) == 1 and aside[0].read_bytes() != (src / "bad").read_bytes()
    assert (dst / "good").read_bytes() == (src / "good").read_bytes()
    assert r.stats.files_verified == 2


def test_verify_on_tmpfs_falls_back_to_dropping_the_cache(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm tmpfs")
    dst = shm / f"dv-sync-test-{os.getpid()}"
    src = tmp_path / "src"
    write(src / "f", os.urandom(50_000))
    try:
        r = Syncer(src, dst, SyncOptions(verify=True)).run()
        assert not r.problems and r.stats.files_verified == 1
        assert (dst / "f").read_bytes() == (src / "f").read_bytes()
    finally:
        subprocess.run(["rm", "-rf", str(dst)], check=True)


class _Interrupt:
    """A reporter that presses Ctrl-C after some files."""

    wants_totals = False

    def __init__(self, after: int) -> None:
        self.after = after

    def start(self, phase: str, **kw: object) -> None: ...
    def set_totals(self, **kw: object) -> None: ...
    def problem(self, path: str, kind: str, message: str) -> None: ...
    def finish(self) -> None: ...

    def advance(self, *, nbytes: int = 0, items: int = 0, current: str | None = None) -> None:
        self.after -= items
        if self.after <= 0:
            raise KeyboardInterrupt


def test_interrupt_leaves_no_temp_files(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    for i in range(30):
        write(src / f"small{i:02}", os.urandom(5000))
    for i in range(4):
        write(src / f"big{i}", os.urandom(6 << 20))
    with pytest.raises(KeyboardInterrupt):
        Syncer(src, dst, SyncOptions(threads=2, bufsize=1 << 20), reporter=_Interrupt(10)).run()  # type: ignore[arg-type]
    assert not temp_files(dst)
    for p in dst.iterdir():  # whatever is there is complete
        assert p.read_bytes() == (src / p.name).read_bytes()


def test_nospace_is_raised_from_the_engine(tmp_path: Path, loopfs) -> None:
    dst = loopfs("ext4", 8)
    src = tmp_path / "src"
    write(src / "huge", os.urandom(10 << 20))
    s = Syncer(src, dst / "m", SyncOptions())
    with pytest.raises(NoSpace):
        s.run()
    assert not temp_files(dst)
