"""dump --target and report --html write FILE in a directory other users may write in:
never through a symlink they planted there or on the way, never a partial file under FILE,
and the temporary file's mode set through its fd (split from test_new_commands_hostile.py)."""

from __future__ import annotations

import os
import stat
import subprocess
import tarfile
from pathlib import Path

from tests.conftest import Cli, needs_root
from tests.loopdev import fresh_fs

NOBODY = 65534


def _root_only(path: Path) -> Path:
    path.write_bytes(b"root only\n")
    path.chmod(0o600)
    return path


def _shared(base: Path) -> Path:
    """A directory any local user may write in (not sticky: others may rename our entries)."""
    d = base / "shared"
    d.mkdir()
    d.chmod(0o777)
    return d


def test_dump_target_is_written_whole_and_never_through_a_planted_symlink(cli: Cli, tmp_path: Path,
                                                                         shared_dir: Path) -> None:
    """dump --target opened FILE with open(..., "wb"): a symlink another user planted under
    that name was followed, so a root-only file outside was overwritten with the tar; and
    a failed dump left a partial archive under FILE."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 1000)
    assert cli("init").returncode == 0 and cli("backup", str(src)).returncode == 0
    shared = _shared(shared_dir)
    secret = _root_only(tmp_path / "secret")
    out = shared / "out.tar"
    os.symlink(secret, out)
    os.lchown(out, NOBODY, NOBODY)
    r = cli("dump", "latest", "/", "--target", str(out))
    assert r.returncode == 0, r.stderr
    assert secret.read_bytes() == b"root only\n" and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert out.is_file() and not out.is_symlink()
    with tarfile.open(out) as tf:
        assert any(m.name.endswith("/a") for m in tf.getmembers())
    # a dump that fails leaves nothing under FILE (and no temporary file)
    r = cli("dump", "latest", "/nothing-here", "--target", str(shared / "x.tar"))
    assert r.returncode != 0 and not (shared / "x.tar").exists()
    assert sorted(p.name for p in shared.iterdir()) == ["out.tar"]


def test_dump_target_through_a_symlink_of_another_user_is_refused(cli: Cli, tmp_path: Path,
                                                                  shared_dir: Path) -> None:
    """dump --target's directory was reached by path, following every symlink: nobody made
    ``shared/out`` a symlink to a directory of root's, and root's dump replaced root's file
    of FILE's name there. A symlink of another user on the way is now refused (exit 17),
    nothing written; root's own is followed."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a" * 1000)
    assert cli("init").returncode == 0 and cli("backup", str(src)).returncode == 0
    shared = _shared(shared_dir)
    precious = tmp_path / "precious"
    precious.mkdir()
    secret = _root_only(precious / "all.tar")
    os.symlink(precious, shared / "out")
    os.lchown(shared / "out", NOBODY, NOBODY)
    r = cli("dump", "latest", "/", "--target", str(shared / "out" / "all.tar"))
    assert r.returncode == 17, r.stdout + r.stderr
    assert "a symlink of another user (uid 65534)" in r.stderr
    assert secret.read_bytes() == b"root only\n" and os.listdir(precious) == ["all.tar"]
    (tmp_path / "ours").symlink_to(precious)
    r = cli("dump", "latest", "/", "--target", str(tmp_path / "ours" / "all.tar"))
    assert r.returncode == 0, r.stderr
    assert tarfile.is_tarfile(secret) and os.listdir(precious) == ["all.tar"]


_SWAPPER = r"""
import os, sys, time
d, prefix, target = sys.argv[1], sys.argv[2], sys.argv[3]
end = time.monotonic() + 120
while time.monotonic() < end:
    for name in os.listdir(d):
        if name.startswith(prefix):
            p = os.path.join(d, name)
            try:
                os.rename(p, os.path.join(d, "moved-" + name))
                os.symlink(target, p)
            except OSError:
                continue
            print("swapped", name, flush=True)
            sys.exit(0)
    time.sleep(0.0005)
sys.exit(1)
"""


def test_report_temp_file_swapped_for_a_symlink_changes_nothing_outside(cli: Cli, tmp_path: Path,
                                                                       shared_dir: Path) -> None:
    """report --html wrote a temporary file beside FILE, then chmodded it by name: in a
    directory others write in, a user who swapped the temporary file for a symlink got a
    root-only file outside chmodded 0644 (readable by all). The mode is set through the fd."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(20_000))
    assert cli("init").returncode == 0 and cli("backup", str(src)).returncode == 0
    shared = _shared(shared_dir)
    secret = _root_only(tmp_path / "secret")
    swapper = subprocess.Popen(["/usr/bin/python3", "-c", _SWAPPER, str(shared), ".r.html.", str(secret)],
                               user=NOBODY, group=NOBODY, extra_groups=[], stdout=subprocess.PIPE, text=True)
    try:
        r = cli("report", "--html", str(shared / "r.html"))
    finally:
        swapper.kill()
        swapped = swapper.communicate()[0]
    assert "swapped" in swapped, "the attacker never saw the temporary file"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.read_bytes() == b"root only\n"
    assert r.returncode != 0 or not (shared / "r.html").is_symlink()


@needs_root()
def test_report_and_dump_onto_a_full_file_system_exit_14_and_leave_nothing(cli: Cli, tmp_path: Path) -> None:
    """`report --html` onto a full disk ended with a traceback (ENOSPC from its write, exit 1,
    "internal error"), as `dump --target` had: now exit 14 naming FILE, no temporary file."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(64 * 1024))
    assert cli("init").returncode == 0 and cli("backup", str(src)).returncode == 0
    (tmp_path / "fs").mkdir()
    with fresh_fs(tmp_path / "fs", "8M", "mkfs.ext4", "-q", "-F", "-m", "0") as mnt:
        with open(mnt / "fill", "wb") as fill:  # the file system full, to its last block
            try:
                while True:
                    fill.write(b"\0" * 4096)
                    fill.flush()
            except OSError:
                pass
        for args, what in ((["report", "--html", str(mnt / "r.html")], "the report"),
                           (["dump", "latest", "/", "--target", str(mnt / "d.tar")], "the dump")):
            r = cli(*args)
            assert r.returncode == 14, (args, r.returncode, r.stderr)
            assert f"cannot write {what} to {mnt}" in r.stderr and "Traceback" not in r.stderr, r.stderr
            assert sorted(p.name for p in mnt.iterdir()) == ["fill", "lost+found"]
