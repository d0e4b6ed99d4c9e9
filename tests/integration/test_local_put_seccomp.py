"""A local repository's packs are written with copy_file_range; where a seccomp filter
refuses it with EPERM (older container profiles), the plain copy is used, not a
"permission denied" for every pack (the target is our own new temp file)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHILD = """
import errno, os, sys
from tests.seccomp import refuse
from deltavault.backends.local import LocalBackend
refuse("copy_file_range", errno.EPERM)
r, w = os.pipe()
try:
    os.copy_file_range(r, w, 1)
except OSError as exc:
    assert exc.errno == errno.EPERM, exc  # the filter is in force
else:
    raise AssertionError("copy_file_range was not refused")
fd = os.open(sys.argv[2], os.O_RDONLY)
LocalBackend(sys.argv[1]).put_file("data/ab/pack", fd, int(sys.argv[3]))
"""


def test_copy_file_range_refused_by_seccomp_falls_back_to_a_copy(tmp_path: Path) -> None:
    src = tmp_path / "spooled"
    data = os.urandom(3 * 1024 * 1024 + 5)
    src.write_bytes(data + b"tail not asked for")
    repo = tmp_path / "repo"
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "src"), str(root)]))
    p = subprocess.run([sys.executable, "-c", CHILD, str(repo), str(src), str(len(data))], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert (repo / "data" / "ab" / "pack").read_bytes() == data
    assert [x.name for x in (repo / "data" / "ab").iterdir()] == ["pack"]  # no temp file left
