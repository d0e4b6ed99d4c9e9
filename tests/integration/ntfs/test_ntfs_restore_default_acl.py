"""A restore into an ntfs-3g mount with ``acl``, whose target has a default ACL another user
may have set: no restored entry may keep an ACL inherited from it. ntfs-3g gives such an
ACL but lists no ACL names, so the restore, which removed the ACLs listxattr showed, kept
it: user nobody read a 0640 file of root's."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Cli, needs_root, needs_tools
from tests.hostileutil import as_nobody
from tests.integration.ntfs.ntfsutil import ntfs

pytestmark = [needs_root(), pytest.mark.root, needs_tools("mkntfs", "ntfs-3g", "setfacl", "setpriv")]


def _named(p: Path) -> list[int]:
    """The tags of the named entries (user, group) of its access ACL (ntfs-3g gives one for
    every file, a minimal one where the mode says it all, but lists none)."""
    raw = os.getxattr(p, "system.posix_acl_access")
    tags = [struct.unpack_from("<H", raw, at)[0] for at in range(4, len(raw), 8)]
    return [t for t in tags if t in (0x02, 0x08)]


def test_a_default_acl_on_an_ntfs_target_reaches_nothing_restored(cli: Cli, tmp_path: Path,
                                                                  shared_dir: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for rel, mode in (("f640", 0o640), ("d/f640", 0o640), ("d/f600", 0o600)):
        (src / rel).write_bytes(b"not for nobody\n")
        os.chmod(src / rel, mode)
    assert cli("init").returncode == 0 and cli("backup", str(src)).returncode == 0
    with ntfs(shared_dir, "dst", streams=None, options="acl") as mnt:
        mnt.chmod(0o755)
        target = mnt / "target"
        target.mkdir()
        subprocess.run(["setfacl", "-d", "-m", "u:nobody:rwx", str(target)], check=True)
        r = cli("restore", "latest", "--target", str(target))
        assert r.returncode == 0, r.stdout + r.stderr
        for rel in ("f640", "d/f640", "d/f600"):
            p = target / "src" / rel
            got = as_nobody("cat", str(p))
            assert got.returncode != 0 and "not for nobody" not in got.stdout, rel
            assert _named(p) == [], rel
        for rel in ("", "d"):
            with pytest.raises(OSError) as exc:
                os.getxattr(target / "src" / rel, "system.posix_acl_default")
            assert exc.value.errno == errno.ENODATA, rel
