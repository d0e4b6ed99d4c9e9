"""DST's root against another local user: it was written in as it was found, until its own
metadata was set, last. A root another user made, with a default ACL, handed them every
entry the run made below it, for good (the files inherited the ACL, SRC's 0640 mode let
them read); a root more open than SRC's showed SRC's 0644 files, guarded only by that
root, to every user while the run wrote them. The root is now taken for the run, as a
directory below it is: locally, and by the agent (over a real sshd, both ways), which
learns SRC's root from the sender's "hello" (sync protocol version 2)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

import deltavault.sync.sender.sender as sender_mod
from deltavault.errors import DeltavaultError, UsageError
from deltavault.sync.local.engine import Syncer
from deltavault.sync.options import SyncOptions
from deltavault.sync.pull import PullSyncer
from deltavault.sync.push import PushSyncer
from deltavault.sync.receiver.core import Receiver
from deltavault.sync.receiver.temps import Where
from deltavault.sync.ssh import RemotePath
from deltavault.testing.hostile import NOBODY
from tests.conftest import needs_root, needs_tools
from tests.hostileutil import acl_names, as_nobody, fork_as_nobody, plant_acl_dir, secret_tree
from tests.integration.sync.conftest import REMOTE
from tests.integration.sync.test_sync_errors import _Interrupt as Interrupt
from tests.integration.sync.test_sync_hostile import no_sshd, run
from tests.sshd import Server

pytestmark = [needs_root(), pytest.mark.root, needs_tools("setfacl", "setpriv")]
WHERE = ["local", pytest.param("push", marks=no_sshd), pytest.param("pull", marks=no_sshd)]


@pytest.fixture
def ssh_env(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A real sshd to this host; its client configuration, for the CLI and for this process."""
    srv: Server = request.getfixturevalue("server")
    monkeypatch.setenv("DELTAVAULT_SSH_CONFIG", str(srv.ssh_config))
    return {"DELTAVAULT_SSH_CONFIG": str(srv.ssh_config)}


def sync_cli(src: Path, dst: Path, where: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """The real CLI: a local sync, a push, or a pull (the far end is this host, through sshd)."""
    if where == "local":
        return run("sync", *flags, str(src), str(dst))
    a, b = (str(src), f"dvtest:{dst}") if where == "push" else (f"dvtest:{src}", str(dst))
    return run("sync", "--remote-command", REMOTE, *flags, a, b,
               env={"DELTAVAULT_SSH_CONFIG": os.environ["DELTAVAULT_SSH_CONFIG"]})


def sync_here(src: Path, dst: Path, where: str) -> None:
    """A sync whose receiving side runs in this process: local, or a pull (the agent is here)."""
    opts = SyncOptions(processes=1)
    if where == "local":
        r = Syncer(src, dst, opts).run()
    else:
        r = PullSyncer(RemotePath("dvtest", str(src)), dst, opts, remote=REMOTE).run()
    assert r.problems == [], r.problems


@pytest.mark.parametrize("owner", [True, False], ids=["owner", "no-owner"])
@pytest.mark.parametrize("where", WHERE)
def test_a_root_another_user_made_with_a_default_acl_gives_them_nothing(
        shared_dir: Path, where: str, owner: bool, request: pytest.FixtureRequest) -> None:
    """User nobody makes DST with an ACL and a default ACL giving them all; root syncs SRC
    (a 0750 directory holding a 0640 file) into it. The entries made below the root
    inherited the default ACL, and nobody read the file for good. The root is now ours,
    0700, without ACLs while the run writes in it; at the end it has SRC's root's mode and,
    with --owner, its owner (nobody's ACLs are not kept on a root that is no longer theirs),
    without it goes back to nobody with their ACLs."""
    if where != "local":
        request.getfixturevalue("ssh_env")
    src, home = shared_dir / "src", shared_dir / "home"
    secret_tree(src)
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)  # nobody's own directory, where the admin syncs to
    dst = home / "mirror"
    plant_acl_dir(dst)
    p = sync_cli(src, dst, where, *([] if owner else ["--no-owner"]))
    assert p.returncode == 0, p.stdout + p.stderr
    secret = dst / "private" / "secret"
    assert secret.read_bytes() == b"top secret\n"
    got = as_nobody("cat", str(secret))
    assert got.returncode != 0 and "top secret" not in got.stdout
    for path in (dst / "private", secret):
        assert acl_names(path) == [], path
    st = dst.stat()
    assert stat.S_IMODE(st.st_mode) == 0o755
    if owner:
        assert (st.st_uid, acl_names(dst)) == (0, [])
    else:
        assert st.st_uid == NOBODY and sorted(acl_names(dst)) == ["system.posix_acl_access",
                                                                    "system.posix_acl_default"]


@pytest.mark.parametrize("where", ["local", pytest.param("pull", marks=no_sshd)])
def test_a_root_more_open_than_the_sources_shows_nothing_written_in_it(
        shared_dir: Path, where: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """DST's root is ours but 0755 where SRC's is 0700 (closed since the last sync): SRC's
    0644 file in it, guarded only by the root, was put in place while the root still let
    every user in. The root is now 0700 before anything is written in it, SRC's mode at
    the end. User nobody tries right after the file is put in place."""
    if where != "local":
        request.getfixturevalue("ssh_env")
    src, dst = shared_dir / "src", shared_dir / "dst"
    src.mkdir()
    (src / "secret").write_bytes(b"top secret\n")
    (src / "secret").chmod(0o644)
    src.chmod(0o700)
    dst.mkdir()
    dst.chmod(0o755)
    seen: list[str] = []
    real = Receiver.install

    def install(self: Receiver, dfd: int, where_: Where, name: bytes, *a: Any, **kw: Any) -> None:
        real(self, dfd, where_, name, *a, **kw)
        if name == b"secret":
            seen.append(as_nobody("cat", str(dst / "secret")).stdout)

    monkeypatch.setattr(Receiver, "install", install)
    sync_here(src, dst, where)
    assert seen == [""]  # the attacker read nothing
    assert (dst / "secret").read_bytes() == b"top secret\n"
    assert stat.S_IMODE(dst.stat().st_mode) == 0o700


def test_a_user_cannot_sync_into_a_root_of_another_user(shared_dir: Path) -> None:
    """Not as root, a root of another user cannot be taken: the sync (user nobody's, into a
    directory of root's open to all) now writes nothing in it and says why (exit 17); it
    wrote there, in reach of that directory's owner."""
    src, dst = shared_dir / "src", shared_dir / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"data\n")
    src.chmod(0o755)
    (src / "f").chmod(0o644)
    dst.mkdir()
    dst.chmod(0o777)  # root's, open to all
    r, w = os.pipe()

    def sync_as_nobody() -> None:  # (the engine this process imported: nobody cannot run its Python)
        os.close(r)
        try:
            Syncer(src, dst, SyncOptions(processes=1)).run()
        except DeltavaultError as exc:
            os.write(w, exc.message.encode())
            os._exit(int(exc.exit_code))

    pid = fork_as_nobody(sync_as_nobody)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        said = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 17, said
    assert "belongs to another user (uid 0)" in said
    assert os.listdir(dst) == []


@no_sshd
def test_an_agent_and_a_sender_of_another_protocol_version_are_refused(
        shared_dir: Path, ssh_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Version 1 had no root in "hello": an agent of version 1 would write in a root it never
    took. Each end now refuses the other's version, naming both, exit 2, and writes nothing."""
    src, dst = shared_dir / "src", shared_dir / "dst"
    src.mkdir()
    (src / "f").write_bytes(b"data\n")
    with monkeypatch.context() as m, pytest.raises(
            UsageError, match="agent speaks sync protocol version 2, the sender version 1"):
        m.setattr(sender_mod, "VERSION", 1)  # this sender speaks version 1
        PushSyncer(src, RemotePath("dvtest", str(dst)), SyncOptions(), remote=REMOTE).run()
    old_agent = ("import sys, deltavault.sync.receiver.agent as a; a.VERSION = 1; "
                 "from deltavault.cli.main import main; sys.exit(main(sys.argv[1:]))")
    remote = REMOTE.replace("-m deltavault", f"-c '{old_agent}'")
    p = run("sync", "--remote-command", remote, str(src), f"dvtest:{dst}", env=ssh_env)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "agent speaks sync protocol version 1, the sender version 2" in p.stdout + p.stderr
    assert not dst.exists() or os.listdir(dst) == []


@pytest.mark.parametrize("where", ["local", pytest.param("push", marks=no_sshd)])
@pytest.mark.parametrize("through", ["leaf", "parent"])
def test_a_symlink_of_another_user_on_the_destination_path_is_refused(
        shared_dir: Path, where: str, through: str, request: pytest.FixtureRequest) -> None:
    """Root syncs with --delete into nobody's home/mirror (or home/mirror/sub, not there
    yet); nobody made mirror a symlink to a directory of root's. The sync followed it:
    root's files there were deleted and SRC written in their place. A symlink of another
    user on the destination's path is now refused (exit 17), nothing touched; root's own
    symlinks are still followed."""
    if where != "local":
        request.getfixturevalue("ssh_env")
    src, home, precious = shared_dir / "src", shared_dir / "home", shared_dir / "precious"
    src.mkdir()
    (src / "f").write_bytes(b"data\n")
    precious.mkdir()
    (precious / "keep").write_bytes(b"root's\n")
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    made = as_nobody("ln", "-s", str(precious), str(home / "mirror"))
    assert made.returncode == 0, made.stderr
    dst = home / "mirror" if through == "leaf" else home / "mirror" / "sub"
    p = sync_cli(src, dst, where, "--delete")
    assert p.returncode == 17, p.stdout + p.stderr
    assert "a symlink of another user (uid 65534)" in p.stdout + p.stderr
    assert sorted(os.listdir(precious)) == ["keep"] and (precious / "keep").read_bytes() == b"root's\n"
    (shared_dir / "ours").symlink_to(precious)  # root's own: followed
    p = sync_cli(src, shared_dir / "ours" / "sub", where)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (precious / "sub" / "f").read_bytes() == b"data\n"


@pytest.mark.parametrize("where", ["local", pytest.param("pull", marks=no_sshd)])
def test_a_run_cut_short_leaves_the_root_as_a_finished_run_would(
        shared_dir: Path, where: str, request: pytest.FixtureRequest) -> None:
    """Ctrl-C in the middle (of a local sync, and of the agent of a pull): the root, taken
    from nobody, was left 0700 and root's, and nobody shut out of their own directory for
    good (with --no-owner no later run gives it back). It now gets SRC's root's mode and
    its owner back as a finished run gives them; nobody still reads nothing written there."""
    if where != "local":
        request.getfixturevalue("ssh_env")
    src, home = shared_dir / "src", shared_dir / "home"
    for i in range(20):
        (src / "private").mkdir(parents=True, exist_ok=True)
        (src / "private" / f"f{i:02}").write_bytes(b"top secret\n")
        (src / "private" / f"f{i:02}").chmod(0o640)
    src.chmod(0o750)
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    dst = home / "mirror"
    plant_acl_dir(dst)
    opts = SyncOptions(processes=1, threads=1, owner=False)
    with pytest.raises(KeyboardInterrupt):
        if where == "local":
            Syncer(src, dst, opts, reporter=Interrupt(5)).run()  # type: ignore[arg-type]
        else:
            PullSyncer(RemotePath("dvtest", str(src)), dst, opts, reporter=Interrupt(5),  # type: ignore[arg-type]
                       remote=REMOTE).run()
    st = dst.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o750)
    assert (dst / "private").is_dir()  # (the run was cut short in it)
    for p in [dst / "private", *(dst / "private").iterdir()]:
        assert acl_names(p) == [], p
    got = as_nobody("sh", "-c", f"cat '{dst}'/private/*")
    assert "top secret" not in got.stdout


@pytest.mark.parametrize("where", ["local", pytest.param("pull", marks=no_sshd)])
def test_a_root_moved_away_and_replaced_by_a_symlink_during_the_run_changes_nothing(
        shared_dir: Path, where: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """The root is opened once and used only by its descriptor: nobody, who owns its parent,
    renames it away after the first file is in place and puts a symlink to a directory of
    root's under its name. The run goes on in the directory it opened; nothing is written
    or deleted through the symlink, nor would the next run follow it."""
    if where != "local":
        request.getfixturevalue("ssh_env")
    src, home, precious = shared_dir / "src", shared_dir / "home", shared_dir / "precious"
    for i in range(5):
        (src / "d").mkdir(parents=True, exist_ok=True)
        (src / "d" / f"f{i}").write_bytes(b"data\n")
    precious.mkdir()
    (precious / "keep").write_bytes(b"root's\n")
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    dst = home / "mirror"
    real = Receiver.install
    swapped: list[int] = []

    def install(self: Receiver, dfd: int, where_: Where, name: bytes, *a: Any, **kw: Any) -> None:
        real(self, dfd, where_, name, *a, **kw)
        if not swapped:
            p = as_nobody("sh", "-c", f"mv '{dst}' '{home}/moved' && ln -s '{precious}' '{dst}'")
            swapped.append(p.returncode)

    with monkeypatch.context() as m:
        m.setattr(Receiver, "install", install)
        if where == "local":
            r = Syncer(src, dst, SyncOptions(processes=1, threads=1, delete=True)).run()
        else:
            r = PullSyncer(RemotePath("dvtest", str(src)), dst, SyncOptions(delete=True), remote=REMOTE).run()
    assert swapped == [0] and r.problems == []
    assert sorted(os.listdir(home / "moved" / "d")) == [f"f{i}" for i in range(5)]
    assert os.listdir(precious) == ["keep"]
    p = sync_cli(src, dst, where, "--delete")
    assert p.returncode == 17 and os.listdir(precious) == ["keep"], p.stdout + p.stderr
