"""The sftp backend against a server that lies (tests/hostile_sftp.py, paramiko's server
side, where a real sshd cannot be made to): READ replies longer than asked, READs never
answered, listings with names that climb out of the folder listed. Each ends in a precise
error (exit 15) or is ignored; nothing outside the repository is read, and the stored
objects stay as they were."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from bench.sparse_memory import run_measured

from deltavault.backends.sftp import SFTPBackend
from deltavault.backends.ssh import parse_location
from deltavault.errors import BackendError, ExitCode, ObjectTooLarge
from tests.conftest import Cli, init_and_back_up
from tests.hostile_sftp import HUGE, HostileServer, hostile_sftp, is_dir

PACK = "data/ab/ab" + "0" * 62
BODY = os.urandom(300_000)
MiB = 1024 * 1024


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[HostileServer]:
    with hostile_sftp(tmp_path) as server:
        repo = server.root / "repo"
        (repo / "data" / "ab").mkdir(parents=True)
        (repo / PACK).write_bytes(BODY)
        (server.root / "secret").mkdir()
        (server.root / "secret" / "key").write_bytes(b"not yours")
        yield server


def backend(server: HostileServer) -> SFTPBackend:
    return SFTPBackend(parse_location(server.url(str(server.root / "repo"))), config_file=str(server.ssh_config),
                       timeout=2, read_timeout=2)


def test_an_honest_server_first(hostile: HostileServer) -> None:
    b = backend(hostile)
    assert b.get(PACK, 1000, 5000) == BODY[1000:6000]
    assert [o.name for o in b.list("data/")] == [PACK]


def test_a_read_answered_with_more_than_asked(hostile: HostileServer) -> None:
    """READ replies longer than asked were taken whole: get returned more bytes than the
    range (the wrong bytes after the first reply)."""
    hostile.lies.extra_read = 7
    b = backend(hostile)
    for read in (lambda: b.get(PACK, 1000, 5000), lambda: b.get(PACK), lambda: b.get(PACK, -100)):
        with pytest.raises(BackendError, match="more than the") as err:
            read()
        assert err.value.exit_code == ExitCode.BACKEND
    hostile.lies.extra_read = 0
    assert backend(hostile).get(PACK, 1000, 5000) == BODY[1000:6000]
    assert (hostile.root / "repo" / PACK).read_bytes() == BODY


def test_a_read_never_answered(hostile: HostileServer) -> None:
    """A server that takes READs and never answers: a get waited for ever; now the read
    timeout ends it (a retryable backend error)."""
    b = backend(hostile)
    assert b.get(PACK, 0, 10) == BODY[:10]
    hostile.lies.stall_reads = True
    with pytest.raises(BackendError, match="lost") as err:
        b.get(PACK, 1000, 5000)
    assert err.value.exit_code == ExitCode.BACKEND and err.value.retryable


def test_listing_names_that_climb_out(hostile: HostileServer) -> None:
    """Entries named '..', '../../secret' or 'a/b' (paramiko drops only '.' and '..' exactly):
    the walk went into the folders they name, outside the repository, and listed their
    files as objects ('../secret/key')."""
    hostile.lies.entries = [("..", is_dir()), ("../../secret", is_dir()), ("x/../../../secret", is_dir()),
                            ("a/b", 0o100644), ("", 0o100644)]
    names = [o.name for o in backend(hostile).list("")]
    assert names == [PACK]


def test_a_whole_object_of_gigabytes_is_refused(hostile: HostileServer) -> None:
    """A key file or index file the server says is 2 GiB (or gives no size for, and sends
    without end): a whole get read all of it (or, without a size, read nothing and took
    b"" for the object). Now a size over the kind's limit is refused before any READ, and
    without a size the reads stop one byte past the limit."""
    repo = hostile.root / "repo"
    for folder in ("keys", "index", "locks"):
        (repo / folder).mkdir()
        (repo / folder / ("c" * 64)).write_bytes(b"{}")
    hostile.lies.huge = ("keys", "index", "locks")
    b = backend(hostile)
    for folder, limit in (("keys", MiB), ("index", 256 * MiB)):
        with pytest.raises(ObjectTooLarge, match=f"answered {HUGE} bytes for an? .* at most {limit} bytes") as err:
            b.get(f"{folder}/" + "c" * 64)
        assert err.value.exit_code == ExitCode.BACKEND and not err.value.retryable
    hostile.lies.huge_unsized = True
    with pytest.raises(ObjectTooLarge, match=f"more than {MiB} bytes .* lock record") as err:
        b.get("locks/" + "c" * 64)
    assert err.value.exit_code == ExitCode.BACKEND
    hostile.lies.huge = ()
    assert b.get("keys/" + "c" * 64) == b"{}" and b.get(PACK) == BODY


@pytest.mark.parametrize(("folder", "unsized"), [("keys", False), ("snapshots", True), ("index", False)])
def test_commands_on_a_server_answering_gigabytes_exit_15_with_little_memory(
        hostile: HostileServer, cli: Cli, tmp_path: Path, folder: str, unsized: bool) -> None:
    """End to end: a repository read over the hostile server, whose key file, snapshot or
    index file is 2 GiB there: the command exits 15 naming the object, with its memory far
    below that, and nothing in the repository changes."""
    repo = hostile.root / "clirepo"
    cli.env["DELTAVAULT_REPOSITORY"] = str(repo)
    init_and_back_up(cli, tmp_path / "src", {"a": os.urandom(200_000)})
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    hostile.lies.huge, hostile.lies.huge_unsized = (folder,), unsized
    cli.env.update(DELTAVAULT_REPOSITORY=hostile.url(str(repo)), DELTAVAULT_SSH_CONFIG=str(hostile.ssh_config))
    r = run_measured([sys.executable, "-m", "deltavault", "ls", "latest", "--no-cache"], cli.env)
    peak = r.peak_main
    assert r.returncode == ExitCode.BACKEND, r.stderr
    assert f"{folder}/" in r.stderr and "refused unread" in r.stderr, r.stderr
    assert peak < 600 * MiB, f"peak RSS {peak >> 20} MiB for a 2 GiB object"
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before
    hostile.lies.huge = ()
    r = cli("ls", "latest", "--no-cache", timeout=300)
    assert r.returncode == 0 and "/a" in r.stdout, r.stderr
