"""A directory another user planted in a restore target, with a default ACL granting them
everything. The restore reused it as it was: every entry it made below inherited the ACL,
and with the snapshot's mode set the ACL mask let the planted user read (0640) files of
directories (0750) they should never reach, after the restore as during it; and the
directory, theirs until its metadata was set last, let them take what was written in it.
Now an existing directory is made the restore's own, 0700, before anything is written in
it, and every entry ends with exactly the snapshot's ACLs."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from deltavault.testing.hostile import NOBODY
from tests.conftest import Cli, needs_root, needs_tools

pytestmark = [needs_root(), pytest.mark.root, needs_tools("setfacl", "setpriv")]

ACL = "system.posix_acl_access"


def _as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
                          capture_output=True, text=True, timeout=60)


def test_a_planted_directory_with_a_default_acl_gives_its_maker_nothing(cli: Cli, tmp_path: Path,
                                                                         shared_dir: Path) -> None:
    src = tmp_path / "src"
    (src / "private").mkdir(parents=True)
    (src / "private" / "secret").write_bytes(b"top secret\n")
    (src / "private" / "secret").chmod(0o640)
    (src / "private").chmod(0o750)
    src.chmod(0o755)
    assert cli("init").returncode == 0 and cli("backup", str(src)).returncode == 0
    target = shared_dir / "target"
    target.mkdir()
    target.chmod(0o777)  # a scratch directory others may write in
    planted = target / "src"
    p = _as_nobody("sh", "-c", f"mkdir '{planted}' && setfacl -m u:nobody:rwx '{planted}' "
                               f"&& setfacl -d -m u:nobody:rwx '{planted}'")
    assert p.returncode == 0, p.stderr
    r = cli("restore", "latest", "--target", str(target))
    assert r.returncode == 0, r.stdout + r.stderr
    secret = planted / "private" / "secret"
    assert secret.read_bytes() == b"top secret\n"
    p = _as_nobody("cat", str(secret))
    assert p.returncode != 0 and "top secret" not in p.stdout, p.stdout
    for path, mode in ((planted, 0o755), (planted / "private", 0o750), (secret, 0o640)):
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, mode), path
        assert ACL not in os.listxattr(path), path  # the snapshot's entries have no ACL
    assert "system.posix_acl_default" not in os.listxattr(planted)
