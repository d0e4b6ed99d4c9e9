"""Fixtures for sync tests: loop-mounted file systems (always detached), source trees, the CLI."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from tests.sshd import Server, sshd

MKFS = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"], "btrfs": ["mkfs.btrfs", "-q", "-f"]}
MIN_MB = {"ext4": 8, "xfs": 300, "btrfs": 120}


def remote_command() -> str:
    """deltavault at the far end of ssh: this Python, with this process's PYTHONPATH (ssh
    passes no environment), so that a checkout's code runs at both ends, not an installed one."""
    path = os.environ.get("PYTHONPATH")
    return (f"env PYTHONPATH={shlex.quote(path)} " if path else "") + f"{sys.executable} -m deltavault"


REMOTE = remote_command()


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def _umount(path: Path) -> None:
    for _ in range(20):
        if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def loopfs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """loopfs("xfs", 300) -> mount point of a fresh file system on a loop device of ours."""
    with ExitStack() as stack:
        def make(fstype: str, size_mb: int | None = None, name: str | None = None) -> Path:
            name = name or f"{fstype}{len(list(tmp_path.glob('*.img')))}"
            img = tmp_path / f"{name}.img"
            with open(img, "wb") as f:
                f.truncate((size_mb or MIN_MB[fstype]) << 20)
            _run(*MKFS[fstype], str(img))
            loop = _run("losetup", "-f", "--show", str(img)).strip()
            stack.callback(_run, "losetup", "-d", loop)
            mnt = tmp_path / f"{name}.mnt"
            mnt.mkdir()
            _run("mount", loop, str(mnt))
            stack.callback(_umount, mnt)
            return mnt
        yield make


@pytest.fixture
def btrfs_src(loopfs: Callable[..., Path]) -> tuple[Path, Path]:
    """A btrfs subvolume "data" on a loop device (mount point, subvolume), with a file
    (an xattr on it), a 5 MiB file and a symlink."""
    mnt = loopfs("btrfs", 150)
    subprocess.run(["btrfs", "subvolume", "create", str(mnt / "data")], check=True, capture_output=True)
    src = mnt / "data"
    write(src / "docs/a.txt", b"version 1")
    write(src / "big.bin", os.urandom(5 << 20))
    os.symlink("docs/a.txt", src / "link")
    os.setxattr(src / "docs/a.txt", "user.k", b"v")
    return mnt, src


def dv(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = (),
       timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real CLI."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    e.update(env or {})
    return subprocess.run([*prefix, sys.executable, "-m", "deltavault", *args], env=e,
                          capture_output=True, text=True, timeout=timeout)


def summary(p: subprocess.CompletedProcess[str]) -> dict:
    import json

    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    found = [x for x in lines if x.get("type") == "summary"]
    assert found, f"no summary:\n{p.stdout}\n{p.stderr}"
    return found[-1]


def write(path: Path, data: bytes, mode: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mode is not None:
        os.chmod(path, mode)
    return path


def nothing_to_do(src: Path, dst: Path, *flags: str) -> str:
    """rsync's itemized list of what it would still change, comparing content: '' when equal."""
    return _run("rsync", "-n", "-i", "-a", "--checksum", "-H", *flags, f"{src}/", f"{dst}/").strip()


def unreadable_tree(src: Path, dst: Path) -> None:
    """A source with a file and a directory that root without CAP_DAC_* cannot read, and a
    DST entry under that directory, which --delete must not remove."""
    write(src / "a-ok", b"fine")
    write(src / "b-secret", b"secret", 0o000)
    os.chown(src / "b-secret", 65534, 65534)
    (src / "c-locked").mkdir()
    write(src / "c-locked/inside", b"unseen")
    os.chmod(src / "c-locked", 0o000)
    os.chown(src / "c-locked", 65534, 65534)
    write(dst / "c-locked/old", b"kept: SRC could not be listed here")


@contextmanager
def growing(path: Path) -> Iterator[None]:
    """A writer that appends to ``path`` a byte at a time until the block ends: a file that
    keeps changing while it is copied."""
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        "f = open(sys.argv[1], 'ab', buffering=0)\n"
        "print('go', flush=True)\n"
        "while True:\n"
        "    f.write(b'x'); time.sleep(0.0002)\n"), str(path)], stdout=subprocess.PIPE)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == b"go\n"
        time.sleep(0.05)
        yield
    finally:
        writer.kill()
        writer.wait()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with sshd(tmp_path) as srv:
        yield srv
