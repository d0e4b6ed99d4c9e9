"""The copy that replaces a kept hard-link group file linked outside DST (``links.detach``)
gets that file's metadata; what it cannot get is named in the per-file log (exit 3), as
any other metadata problem. Its xattrs were read with ``read_xattrs``, which drops what is
past fs.meta.INLINE_MAX (16 MiB together) without a word, and the problems of setting its
metadata were collected and never reported: the copy lacked them silently, exit 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_root, needs_tools
from tests.integration.sync.conftest import write
from tests.loopdev import fresh_fs

pytestmark = [needs_root(), pytest.mark.root]

ROOT = Path(__file__).resolve().parents[3]
# The CLI, with fsetxattr answered EOPNOTSUPP by the kernel (a real seccomp filter).
NO_FSETXATTR = """
import errno, runpy
from tests.seccomp import refuse
refuse("fsetxattr", errno.EOPNOTSUPP)
runpy.run_module("deltavault", run_name="__main__", alter_sys=True)
"""


def _group(base: Path) -> tuple[Path, Path, Path]:
    """SRC with the group g1, g2; DST's g1 SRC's (content and metadata) but also a name of
    "outside", a file outside DST: kept, so replaced by a copy before g2 is linked."""
    src, dst, outside = base / "src", base / "dst", write(base / "outside", b"group content\n", 0o644)
    write(src / "g1", outside.read_bytes(), 0o644)
    os.utime(src / "g1", ns=(outside.stat().st_atime_ns, outside.stat().st_mtime_ns))
    os.link(src / "g1", src / "g2")
    dst.mkdir()
    os.link(outside, dst / "g1")
    return src, dst, outside


def _sync(src: Path, dst: Path, log: Path, *prefix: str) -> dict[str, str]:
    """The CLI's sync (``prefix``: the Python code that runs it), exit 3: its log's errors."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    env["PYTHONPATH"] = os.pathsep.join(x for x in (env.get("PYTHONPATH"), str(ROOT)) if x)
    p = subprocess.run([sys.executable, *(prefix or ("-m", "deltavault")), "--json", "sync", "--log", str(log),
                        str(src), str(dst)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 3, p.stdout[-3000:] + p.stderr[-3000:]
    return {f[5]: f[6] for f in (ln.split("\t") for ln in log.read_text().splitlines()) if f[1] == "error"}


def _detached(dst: Path, outside: Path) -> None:
    assert os.stat(dst / "g1").st_ino == os.stat(dst / "g2").st_ino != outside.stat().st_ino
    assert outside.stat().st_nlink == 1 and (dst / "g2").read_bytes() == outside.read_bytes()


def _user_xattrs(path: Path) -> list[str]:
    return sorted(n for n in os.listxattr(path) if n.startswith("user."))


@needs_tools("mkfs.xfs")
def test_a_detached_copy_names_the_xattrs_past_16_mib_it_lacks(tmp_path: Path) -> None:
    """The outside file has 300 xattrs of 64 KiB (XFS): the copy gets the first 16 MiB of
    them, in name order, and the rest is named."""
    with fresh_fs(tmp_path, "400M", "mkfs.xfs", "-q", "-f") as mnt:
        src, dst, outside = _group(mnt)
        value = os.urandom(65536)
        for i in range(300):
            os.setxattr(outside, f"user.x{i:04}", value)
        errors = _sync(src, dst, tmp_path / "sync.log")
        assert errors == {"g1": "metadata: 44 xattrs (the first: user.x0256) not read: one entry's xattrs stop "
                                "at 16 MiB together; not kept"}, errors
        _detached(dst, outside)
        assert _user_xattrs(dst / "g1") == [f"user.x{i:04}" for i in range(256)]
        assert os.getxattr(dst / "g1", "user.x0255") == value


def test_a_detached_copy_names_the_xattrs_it_could_not_set(tmp_path: Path) -> None:
    """Where setting an xattr fails (here a seccomp filter refuses fsetxattr), the copy's
    problem is named, not dropped."""
    src, dst, outside = _group(tmp_path)
    os.setxattr(outside, "user.k", b"v")
    errors = _sync(src, dst, tmp_path / "sync.log", "-c", NO_FSETXATTR)
    assert errors == {"g1": "metadata: xattr user.k: Operation not supported"}, errors
    _detached(dst, outside)
    assert _user_xattrs(dst / "g1") == []
