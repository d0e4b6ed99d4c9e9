"""A local repository this user may not read or write: exit 19 (ACCESS_REFUSED) naming the
path and what was refused, not 15, for a real process running as nobody."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import needs_root, needs_tools

pytestmark = [needs_root(), needs_tools("setpriv")]


def test_a_repository_the_user_may_not_read_or_write_exits_19(shared_dir: Path) -> None:
    src, home, pw = shared_dir / "src", shared_dir / "home", shared_dir / "pw"
    src.mkdir()
    (src / "f").write_text("data")
    home.mkdir()
    os.chown(home, 65534, 65534)
    pw.write_text("pw")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    env.update(DELTAVAULT_PASSWORD_FILE=str(pw), HOME=str(home))

    def dv(repo: Path, *args: str, nobody: bool = True) -> subprocess.CompletedProcess[str]:
        who = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if nobody else []
        cache = home / "cache" if nobody else shared_dir / "root-cache"
        return subprocess.run([*who, sys.executable, "-m", "deltavault", "-r", str(repo), *args], timeout=300,
                              env=dict(env, DELTAVAULT_CACHE_DIR=str(cache)), capture_output=True, text=True)

    def refused(p: subprocess.CompletedProcess[str], *words: str) -> None:
        assert p.returncode == 19, p.stdout + p.stderr
        assert p.stderr.startswith("deltavault: permission denied to ") and p.stderr.count("\n") == 1, p.stderr
        assert all(w in p.stderr for w in words), p.stderr

    # root's repository, its folder 0700: nothing in it can be read, nor made
    repo = shared_dir / "repo"
    assert dv(repo, "init", nobody=False).returncode == 0
    assert dv(repo, "backup", str(src), nobody=False).returncode == 0
    repo.chmod(0o700)
    refused(dv(repo, "backup", str(src)), f"read config ({repo}/config)")
    p = dv(repo, "restore", "latest", "--target", str(home / "out"))
    refused(p, f"read config ({repo}/config)")
    assert "--no-lock" not in p.stderr  # it would not help
    empty = shared_dir / "empty"
    empty.mkdir(mode=0o700)
    refused(dv(empty, "init"), f"{empty}/config")
    assert list(empty.iterdir()) == []

    # readable, not writable: the lock cannot be written (restore --no-lock reads it all)
    subprocess.run(["chmod", "-R", "a+rX", str(repo)], check=True)
    refused(dv(repo, "backup", str(src)), "write locks/", f"({repo}/locks)")
    refused(dv(repo, "restore", "latest", "--target", str(home / "out")), "write locks/",
            "can run with --no-lock")  # a reader is told how to go on
    assert "--no-lock" not in dv(repo, "backup", str(src)).stderr  # a writer cannot skip it
    p = dv(repo, "restore", "latest", "--no-lock", "--target", str(home / "out"))
    assert p.returncode == 0 and (home / "out" / "src" / "f").read_text() == "data", p.stderr

    # a folder of it that cannot be listed
    (repo / "snapshots").chmod(0o700)
    refused(dv(repo, "snapshots", "--no-lock"), f"list {repo}/snapshots")
