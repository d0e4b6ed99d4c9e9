"""A temp name of a hard link, special file or detached copy swapped by another user.

User nobody, who may write in DST's directory, renames the receiver's temp entry away and
an entry of their own to its name, right before ``rename_checked`` looks at it. The rename
is refused (``Replaced``), but ``Temps.made`` then unlinked the temp name on the way out,
deleting nobody's entry; as ``core.install`` and restore do, what they put under either
name is now left alone, and the refusal is named in the log."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import deltavault.sync.receiver.links as links_mod
import deltavault.sync.receiver.specials as specials_mod
from deltavault.errors import NoSpace
from deltavault.sync.local.engine import Syncer
from deltavault.sync.options import SyncOptions
from deltavault.sync.receiver.temps import TEMP_PREFIX
from deltavault.sync.report import SyncLog
from tests.conftest import needs_root, needs_tools
from tests.hostileutil import fork_as_nobody
from tests.integration.sync.conftest import write
from tests.integration.sync.test_sync_planted import EVIL, _plant_as_nobody, _swap_as_nobody
from tests.loopdev import run, umount

pytestmark = [needs_root(), pytest.mark.root, needs_tools("setpriv")]


def _swap_before_rename(monkeypatch: pytest.MonkeyPatch, module: Any, dst: Path) -> list[bytes]:
    """``module``'s ``rename_checked`` of a temp name, preceded by nobody's swap of that
    name for their "evil" (once). Returns the temp names swapped."""
    real = module.rename_checked
    swapped: list[bytes] = []

    def rename_checked(dir_fd: int, tmp: bytes, name: bytes, want: Any) -> None:
        if tmp.startswith(TEMP_PREFIX) and not swapped:
            _swap_as_nobody(dst, tmp)
            swapped.append(tmp)
        real(dir_fd, tmp, name, want)

    monkeypatch.setattr(module, "rename_checked", rename_checked)
    return swapped


def _dirs(shared_dir: Path) -> tuple[Path, Path, int]:
    """SRC and DST 0777 (DST as SRC: not taken, nobody may write in it), nobody's "evil"
    planted in DST. Returns its inode."""
    src, dst = shared_dir / "src", shared_dir / "dst"
    src.mkdir()
    dst.mkdir()
    for d in (src, dst):
        d.chmod(0o777)
    return src, dst, _plant_as_nobody(dst / "evil", EVIL, 0)


def _run_refused(src: Path, dst: Path, log: Path) -> dict[str, str]:
    """A sync whose problems are all "replaced" write errors, each in the log; by path."""
    problems = Syncer(src, dst, SyncOptions(processes=1), log=SyncLog(log)).run().problems
    got = {p.path: f"{p.kind}: {p.message}" for p in problems}
    assert got and all(m.startswith("write: ") and "replaced during the run" in m for m in got.values()), got
    errors = {f[5]: f[6] for f in (ln.split("\t") for ln in log.read_text().splitlines()) if f[1] == "error"}
    assert errors == got
    return got


def _left_alone(dst: Path, swapped: list[bytes], evil: int) -> None:
    """nobody's entry still stands under the temp name it was swapped to, as it was."""
    assert len(swapped) == 1
    assert [p.stat().st_ino for p in dst.glob(".dv-sync-*")] == [evil]
    assert (dst / os.fsdecode(swapped[0])).read_bytes() == EVIL


def test_a_swapped_temp_name_of_a_hard_link_is_left_alone(shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst, evil = _dirs(shared_dir)
    write(src / "a", b"linked content\n")
    os.link(src / "a", src / "b")
    swapped = _swap_before_rename(monkeypatch, links_mod, dst)
    got = _run_refused(src, dst, shared_dir / "sync.log")
    _left_alone(dst, swapped, evil)
    (linked,) = got
    assert swapped[0].endswith(b"." + linked.encode())
    (first,) = {"a", "b"} - {linked}
    assert os.stat(dst / "stolen").st_ino == os.stat(dst / first).st_ino  # the link made, moved away
    assert not (dst / linked).exists()


def test_a_swapped_temp_name_of_a_special_file_is_left_alone(shared_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst, evil = _dirs(shared_dir)
    os.mkfifo(src / "fifo", 0o640)
    write(src / "other", b"other\n")
    swapped = _swap_before_rename(monkeypatch, specials_mod, dst)
    assert list(_run_refused(src, dst, shared_dir / "sync.log")) == ["fifo"]
    _left_alone(dst, swapped, evil)
    assert not (dst / "fifo").exists() and (dst / "other").read_bytes() == b"other\n"


def test_a_swapped_temp_name_of_a_detached_copy_is_left_alone(shared_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """DST's "g1" is kept (SRC's content and metadata) but is also a name of a file outside
    DST: before "g2" is linked to it, it is replaced by a copy (``links.detach``), made
    under a temp name, which nobody swaps."""
    src, dst, evil = _dirs(shared_dir)
    outside = write(shared_dir / "outside", b"group content\n", 0o644)
    write(src / "g1", outside.read_bytes(), 0o644)
    os.utime(src / "g1", ns=(outside.stat().st_atime_ns, outside.stat().st_mtime_ns))
    os.link(src / "g1", src / "g2")
    os.link(outside, dst / "g1")
    detached: list[bytes] = []
    real_detach = links_mod.detach

    def detach(root: int, first: bytes, *a: Any) -> Any:
        detached.append(first)
        return real_detach(root, first, *a)

    monkeypatch.setattr(links_mod, "detach", detach)
    monkeypatch.setattr("deltavault.sync.receiver.core.detach", detach)
    swapped = _swap_before_rename(monkeypatch, links_mod, dst)
    got = _run_refused(src, dst, shared_dir / "sync.log")
    assert detached == [b"g1"] and swapped[0].endswith(b".g1")
    assert list(got) == ["g2"] and got["g2"].startswith("write: hard link to g1: replaced during the run")
    _left_alone(dst, swapped, evil)
    assert os.stat(dst / "g1").st_ino == outside.stat().st_ino  # as it was: nothing linked to it
    assert outside.stat().st_nlink == 2


def _swap_when_made(monkeypatch: pytest.MonkeyPatch, dst: Path, then: Callable[[], None] = lambda: None) -> list[bytes]:
    """Between a new special file's mkfifo and the handle opened on it, nobody moves it away
    and puts their FIFO "theirs" (made here) under its temp name, then runs ``then``.
    Returns the temp names swapped."""
    _, status = os.waitpid(fork_as_nobody(lambda: os.mkfifo(dst / "theirs", 0o666)), 0)
    assert os.waitstatus_to_exitcode(status) == 0
    real = specials_mod.created_handle
    swapped: list[bytes] = []

    def created_handle(dir_fd: int, tmp: bytes, fmt: int, *rest: Any) -> Any:
        def swap() -> None:
            os.rename(dst / os.fsdecode(tmp), dst / "stolen")
            os.rename(dst / "theirs", dst / os.fsdecode(tmp))
            then()

        _, st = os.waitpid(fork_as_nobody(swap), 0)
        assert os.waitstatus_to_exitcode(st) == 0
        swapped.append(tmp)
        return real(dir_fd, tmp, fmt, *rest)

    monkeypatch.setattr(specials_mod, "created_handle", created_handle)
    return swapped


def test_a_special_file_swapped_right_after_it_was_made_is_refused(shared_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Between the mkfifo and the handle opened on it, nobody swaps the temp name for a FIFO
    of theirs. Their entry shows their owner, not the one our entries get here (ours,
    which the owner probe confirms): refused, left alone, and no probe file left behind."""
    src, dst, _ = _dirs(shared_dir)
    os.mkfifo(src / "fifo", 0o640)
    swapped = _swap_when_made(monkeypatch, dst)
    theirs = (dst / "theirs").stat().st_ino
    got = _run_refused(src, dst, shared_dir / "sync.log")
    assert list(got) == ["fifo"] and "not the entry just created" in got["fifo"]
    assert [(p.name.encode(), p.stat().st_ino) for p in dst.glob(".dv-sync-*")] == [(swapped[0], theirs)]
    assert not (dst / "fifo").exists()


def test_a_swapped_special_file_is_left_alone_when_the_owner_probe_fails(shared_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """nobody swaps the temp name of a new FIFO for theirs, then takes the file system's last
    inodes, so the owner probe (a file made to learn the owner our entries get) fails with
    ENOSPC. Their entry is not known to be ours: it is left alone, as a refused swap is; the
    probe's error used to make ``Temps.made`` unlink the temp name, deleting their entry."""
    src, dst = shared_dir / "src", shared_dir / "dst"
    src.mkdir()
    dst.mkdir()
    src.chmod(0o777)  # DST as SRC: not taken, nobody may write in it
    os.mkfifo(src / "fifo", 0o640)
    run("mount", "-t", "tmpfs", "-o", "size=4m,nr_inodes=64,mode=0777", "tmpfs", str(dst))
    try:
        def fill() -> None:
            for i in range(1000):  # every inode left: nothing more can be made
                try:
                    (dst / f"fill{i}").touch()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    return

        swapped = _swap_when_made(monkeypatch, dst, fill)
        theirs = (dst / "theirs").stat().st_ino
        try:
            Syncer(src, dst, SyncOptions(processes=1), log=SyncLog(shared_dir / "sync.log")).run()
        except NoSpace:
            pass  # the file system is full: whether the run goes on is not the point
        assert len(swapped) == 1
        assert [(p.name.encode(), p.stat().st_ino) for p in dst.glob(".dv-sync-*")] == [(swapped[0], theirs)]
        assert not (dst / "fifo").exists()
    finally:
        umount(dst)
