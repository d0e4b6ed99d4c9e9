"""NTFS streams against hostile users. Of any size, held in bounded memory: the real CLI
under the suite's memory limit (tests/memlimit.py, 143 MiB), a stream made huge by a sparse
truncate (it costs its owner nothing on ntfs-3g). Written where another user who may write
in DST's directory cannot redirect them (fs/ntfsstage.py). Locally and over the suite's sshd."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import blake3
import pytest

from deltavault.backup.files.options import FileBackupOptions
from deltavault.backup.files.run import BackupRequest, run_backup
from deltavault.repository.repository import Repository
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions
from tests.conftest import Cli, needs_root, needs_tools
from tests.integration.ntfs.ntfsutil import ntfs, streams_of
from tests.integration.ntfs.test_ntfs_meta import RACY
from tests.integration.ntfs.test_ntfs_sync import BIG, populate
from tests.integration.sync.conftest import REMOTE, dv, summary
from tests.memlimit import MemoryLimit
from tests.sshd import Server, missing_tools

pytestmark = [needs_root(), needs_tools("mkntfs", "ntfs-3g", "getfattr"), pytest.mark.root]

HUGE = 3 << 30  # over DELTA_MAX (2 GiB): more than remote delta may hold


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    e.update(extra)
    return e


def digest(path: Path) -> bytes:
    h = blake3.blake3()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


# The stream's owner truncates it to HUGE right after the sender opens it for reading, and
# back to its size once the sender closes it (the one open only, for the old code to end).
GROW = """
import os, runpy
real_open, real_close, grown = os.open, os.close, {}
def open_(path, flags, mode=0o777, *, dir_fd=None):
    fd = real_open(path, flags, mode, dir_fd=dir_fd)
    if not flags & os.O_PATH and flags & os.O_ACCMODE == os.O_RDONLY and not grown:
        where = os.readlink(f"/proc/self/fd/{fd}")
        if where.endswith("doc.txt:big"):
            grown[fd] = (where, os.stat(where).st_size)
            os.truncate(where, HUGE)
    return fd
def close_(fd):
    where, size = grown.get(fd, (None, 0))
    if where is not None:
        os.truncate(where, size)
        grown[fd] = (None, 0)
    real_close(fd)
os.open, os.close = open_, close_
runpy.run_module("deltavault", run_name="__main__", alter_sys=True)
""".replace("HUGE", str(HUGE))


def delta_with(hook: str, how: str, server: Server, tmp_path: Path, memory_limit: MemoryLimit) -> None:
    """``populate``'s tree synced (``how``: push or pull), 4 KiB of its 5 MiB stream changed,
    then synced again by the CLI with ``hook`` run first, under the limit: the stream goes
    by remote delta and DST ends with SRC's streams."""
    with ntfs(tmp_path, "src") as src, ntfs(tmp_path, "dst") as dst:
        populate(src)
        e = env(DELTAVAULT_SSH_CONFIG=str(server.ssh_config))
        ends = [str(src / "data"), f"dvtest:{dst / 'data'}"] if how == "push" else \
            [f"dvtest:{src / 'data'}", str(dst / "data")]
        args = ["--json", "sync", "--remote-command", REMOTE, "--acl", "--streams", *ends]
        r = dv(*args, env=e)
        assert r.returncode == 0, r.stdout + r.stderr
        with open(src / "data" / "doc.txt:big", "r+b") as f:
            f.seek(BIG // 2)
            f.write(os.urandom(4096))
        r = memory_limit.run([sys.executable, "-c", hook, *args], env=e, text=True, timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        s = summary(r)
        assert s["problems"] == [] and 0 < s["delta_wire_bytes"] < BIG, s
        assert os.stat(src / "data" / "doc.txt:big").st_size == BIG
        want = streams_of(src / "data" / "doc.txt")
    with ntfs(tmp_path, "dst") as dst:  # (afresh: the kernel keeps pages of name:stream past a rename)
        assert streams_of(dst / "data" / "doc.txt") == want


@pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")
def test_stream_grown_past_delta_max_is_not_loaded_for_a_delta(server: Server, tmp_path: Path,
                                                                 memory_limit: MemoryLimit) -> None:
    """The agent asks for a remote delta of a stream listed at 5 MiB; by the time the sender
    opens it, it is 3 GiB. The sender loaded whatever size it found (the file's own data
    falls back to a whole send past DELTA_MAX): 3 GiB in memory, killed under the limit. Now
    it tells the agent the file changed, and sends it again: the stream goes by delta (the
    owner's step was undone once the sender closed the stream)."""
    delta_with(GROW, "push", server, tmp_path, memory_limit)


# DST's stream's owner truncates it to HUGE once the receiver has judged it worth a delta
# (after its size is checked, as its cached pages are dropped).
EXTEND_SEED = """
import os, runpy
real, done = os.posix_fadvise, []
def fadvise(fd, offset, length, advice):
    where = os.readlink(f"/proc/self/fd/{fd}")
    if not done and where.endswith("/dst/data/doc.txt:big"):
        done.append(where)
        os.truncate(where, HUGE)
    return real(fd, offset, length, advice)
os.posix_fadvise = fadvise
runpy.run_module("deltavault", run_name="__main__", alter_sys=True)
""".replace("HUGE", str(HUGE))


@pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")
def test_seed_stream_grown_after_it_was_judged_is_read_to_its_size_then(server: Server, tmp_path: Path,
                                                                        memory_limit: MemoryLimit) -> None:
    """A pull (the receiver here, under the limit): DST's older version of a 5 MiB stream is
    the seed of its remote delta; its owner truncates it to 3 GiB once it was judged. The
    receiver read the seed to EOF: 3 GiB in memory, killed. Now it reads the 5 MiB judged."""
    delta_with(EXTEND_SEED, "pull", server, tmp_path, memory_limit)


def test_huge_directory_stream_is_copied_in_bounded_memory(tmp_path: Path, memory_limit: MemoryLimit) -> None:
    """A directory's stream of 192 MiB (locally onto ntfs-3g any size goes): it was read
    whole into memory, twice over, and the sync killed under the limit. Now it is copied
    through the sync's buffer, and compared so when it is there already."""
    size = 192 << 20
    with ntfs(tmp_path, "src", size="512M") as src, ntfs(tmp_path, "dst", size="512M") as dst:
        d = src / "data" / "sub"
        d.mkdir(parents=True)
        stream = Path(f"{d}:huge")
        stream.write_bytes(os.urandom(4096))
        with open(stream, "r+b") as f:
            f.truncate(size)
            f.seek(size - 4096)
            f.write(os.urandom(4096))
        args = [sys.executable, "-m", "deltavault", "--json", "sync", "--streams", str(src / "data"),
                str(dst / "data")]
        for change in (False, True, False):
            if change:
                with open(stream, "r+b") as f:
                    f.seek(size // 2)
                    f.write(b"changed")
            r = memory_limit.run(args, env=env(), text=True, timeout=600)
            assert r.returncode == 0 and summary(r)["problems"] == [], r.stdout + r.stderr
            copy = Path(f"{dst / 'data' / 'sub'}:huge")
            assert os.stat(copy).st_size == size and digest(copy) == digest(stream), change


SECRET = b"root's stream " * 100
# Another user (nobody), who may write in DST's directory, acts once root writes the first
# bytes of the stream "secret" of a file (or "dsecret" of a directory): renames the entry it
# belongs to away and one of its own (``planted``, ``planted-dir``) that has such a stream
# to that name (ntfs-3g then writes root's bytes into that one).
HOOK = """
import os, subprocess, sys
real, tried = os.pwrite, set()
ATTACK = "import os, sys; t = sys.argv[1]; d = os.path.dirname(t); os.rename(t, d + '/away-' + sys.argv[2]); os.rename(d + '/' + sys.argv[2], t)"
def pwrite(fd, data, offset):
    where = os.readlink(f"/proc/self/fd/{fd}")
    for stream, planted in ((":secret", "planted"), (":dsecret", "planted-dir")):
        if where.endswith(stream) and stream not in tried:
            tried.add(stream)
            subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                            "-c", ATTACK, where[:-len(stream)], planted], capture_output=True)
            with open(LOG, "a") as f:
                f.write(where + "\\n")
    return real(fd, data, offset)
"""
SWAP = HOOK + """
import runpy
os.pwrite = pwrite
runpy.run_module("deltavault", run_name="__main__", alter_sys=True)
"""


def plant(where: Path) -> None:
    """nobody's own entries in ``where``, each with a stream of the name root will write."""
    planted = where / "planted"
    planted.write_bytes(b"nobody's file")
    Path(f"{planted}:secret").write_bytes(b"nobody's stream")
    (where / "planted-dir").mkdir()
    Path(f"{where / 'planted-dir'}:dsecret").write_bytes(b"nobody's stream")
    for p in (planted, where / "planted-dir"):
        os.chown(p, 65534, 65534)


@pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")
@pytest.mark.parametrize("how", ["local", "push"])
def test_stream_writes_cannot_be_redirected_by_another_user(shared_dir: Path, tmp_path: Path, how: str,
                                                            request: pytest.FixtureRequest) -> None:
    """DST on ntfs-3g with permissions checked (``permissions``, ``allow_other``), its
    directory writable by nobody. ntfs-3g finds ``name:stream`` by path on every write: the
    file staged under a temp name renamed away and nobody's own put in its place, root's
    stream went into nobody's file, which was then installed as DST's; a directory's
    stream, written in place, went into nobody's directory. Now the file and the directory
    lie in a directory of root's, mode 0700, while their streams are written: nobody cannot
    rename them; its own entries are untouched and DST gets SRC's."""
    log = shared_dir / "tried"
    hook = SWAP.replace("LOG", repr(str(log)))
    with ntfs(tmp_path, "src") as src, ntfs(shared_dir, "dst", options="permissions,allow_other") as dst:
        (src / "d" / "sub").mkdir(parents=True)
        (src / "d" / "f").write_bytes(b"data")
        Path(f"{src / 'd' / 'f'}:secret").write_bytes(SECRET)
        Path(f"{src / 'd' / 'sub'}:dsecret").write_bytes(SECRET)
        (dst / "d" / "sub").mkdir(parents=True)
        os.chmod(dst / "d", 0o777)
        plant(dst / "d")
        if how == "local":
            argv, e = [sys.executable, "-c", hook, "--json", "sync", "--streams", str(src / "d"), str(dst / "d")], env()
        else:
            remote = REMOTE.replace("-m deltavault", "-c " + shlex.quote(hook))
            argv = [sys.executable, "-m", "deltavault", "--json", "sync", "--remote-command", remote, "--streams",
                    str(src / "d"), f"dvtest:{dst / 'd'}"]
            e = env(DELTAVAULT_SSH_CONFIG=str(request.getfixturevalue("server").ssh_config))
        r = subprocess.run(argv, env=e, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert summary(r)["problems"] == [], summary(r)
        tried = log.read_text().splitlines()
        assert len(tried) == 2, tried  # (nobody acted, once for each)
    with ntfs(shared_dir, "dst", options="permissions,allow_other") as dst:
        assert (dst / "d" / "f").read_bytes() == b"data" and streams_of(dst / "d" / "f") == {"secret": SECRET}
        assert streams_of(dst / "d" / "sub") == {"dsecret": SECRET}
        assert (dst / "d" / "planted").read_bytes() == b"nobody's file"
        assert streams_of(dst / "d" / "planted") == {"secret": b"nobody's stream"}
        assert streams_of(dst / "d" / "planted-dir") == {"dsecret": b"nobody's stream"}
        assert sorted(os.listdir(dst / "d")) == ["f", "planted", "planted-dir", "sub"]  # (no private directory left)
    assert all("/.dv-streams-" in t for t in tried), tried  # (root wrote in its own directory, where nobody could not rename)


def test_restored_streams_cannot_be_redirected_by_another_user(shared_dir: Path, tmp_path: Path, repo: Repository,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore onto ntfs-3g (permissions checked) whose target others may write in: the
    entries at its top are made there, a file staged under a temp name, a directory's streams
    written in place. Nobody renamed them away once root wrote the first bytes of a stream
    and its own entries to their names: the streams went into nobody's file and directory
    (and nobody's file was installed). The restore writes them in a directory of its own now."""
    with ntfs(tmp_path, "src") as src:
        (src / "data").mkdir()
        Path(f"{src / 'data'}:dsecret").write_bytes(SECRET)
        (src / "f").write_bytes(b"data")
        Path(f"{src / 'f'}:secret").write_bytes(SECRET)
        res = run_backup(repo, BackupRequest(paths=[str(src / "data"), str(src / "f")],
                                             options=FileBackupOptions(racy_window_ns=RACY)))
        assert not res.problems and res.snapshot.tree is not None, res.problems
    log = shared_dir / "tried"
    hook: dict[str, Any] = {}
    exec(HOOK.replace("LOG", repr(str(log))), hook)  # (nobody's step, in this process: the restore runs here)
    with ntfs(shared_dir, "dst", options="permissions,allow_other") as dst:
        os.chmod(dst, 0o777)
        plant(dst)
        monkeypatch.setattr(os, "pwrite", hook["pwrite"])
        r = FileRestorer(repo, dst, RestoreOptions())
        r.run(res.snapshot.tree)
        monkeypatch.undo()
        assert not r.problems, r.problems
        tried = log.read_text().splitlines()
        assert len(tried) == 2, tried
    with ntfs(shared_dir, "dst", options="permissions,allow_other") as dst:
        assert (dst / "f").read_bytes() == b"data" and streams_of(dst / "f") == {"secret": SECRET}
        assert streams_of(dst / "data") == {"dsecret": SECRET}
        assert (dst / "planted").read_bytes() == b"nobody's file"
        assert streams_of(dst / "planted") == {"secret": b"nobody's stream"}
        assert streams_of(dst / "planted-dir") == {"dsecret": b"nobody's stream"}
    assert all("/.dv-streams-" in t for t in tried), tried


@pytest.mark.memory_limit
def test_thousands_of_streams_read_as_xattrs_are_bounded(tmp_path: Path, cli: Cli) -> None:
    """ntfs-3g's default interface shows each stream as the xattr ``user.NAME`` (up to 64 KiB
    each): a file with 3,000 of them (188 MiB; 9,000 fit in the names listxattr returns) was
    read whole, values and all, by the xattrs and again by the NTFS metadata: the backup was
    killed under the limit. Past 16 MiB of them one entry's are not read: named, the run
    partial; the streams before, and the other files, are stored."""
    assert cli("init").returncode == 0
    with ntfs(tmp_path, "src", streams=None, size="400M") as src:
        d = src / "data"
        d.mkdir()
        (d / "f").write_bytes(b"f")
        value = os.urandom(65536)
        for i in range(3000):
            os.setxattr(d / "f", f"user.s{i:04}", value)
        os.setxattr(d / "f", "user.small", b"small")
        (d / "g").write_bytes(b"g")
        r = cli("--json", "backup", str(d))
    assert r.returncode == 3, r.stdout + r.stderr
    problems = [o for o in r.json if o.get("type") == "problem"]
    assert problems and all(p["path"].endswith("data/f") for p in problems), problems
    assert any("2745 streams (the first: s0256) not read" in p["message"] and "16 MiB" in p["message"]
               for p in problems), problems
    js = cli("--json", "ls", "latest", "data/f").json[0]["windows"]
    assert [s["name"] for s in js["streams"]] == [f"s{i:04}" for i in range(256)], js  # (16 MiB, in name order)
    assert cli("--json", "ls", "latest", "data/g").json, "g was not stored"


@pytest.mark.memory_limit
def test_thousands_of_streams_sent_as_xattrs_are_bounded(tmp_path: Path, cli: Cli) -> None:
    """Onto a DST that keeps streams as ``user.`` xattrs (here ntfs-3g's default interface),
    a file's and a directory's streams of up to 64 KiB were each read whole, all of them:
    2,000 of 64 KiB on each (the names of some 9,000 fit in the stream list) and the sync
    was killed under the limit. Now up to 16 MiB of one entry's go; the rest are named in
    the log as not kept, as a stream over 64 KiB is."""
    value = os.urandom(65536)
    with ntfs(tmp_path, "src", size="512M") as src, ntfs(tmp_path, "dst", streams=None) as dst:
        (src / "d" / "sub").mkdir(parents=True)
        (src / "d" / "f").write_bytes(b"f")
        for i in range(2000):
            Path(f"{src / 'd' / 'f'}:s{i:04}").write_bytes(value)
            Path(f"{src / 'd' / 'sub'}:s{i:04}").write_bytes(value)
        log = tmp_path / "sync.log"
        r = cli("--json", "sync", "--streams", "--log", str(log), str(src / "d"), str(dst / "d"))
        assert r.returncode == 0 and r.last("summary")["ntfs_not_kept"] == 2, r.stdout + r.stderr
        for entry in ("f", "sub"):
            kept = sorted(os.fsencode(n) for n in os.listxattr(dst / "d" / entry) if n.startswith("user."))
            assert kept == [b"user.s%04d" % i for i in range(256)], (entry, len(kept))
    notes = {f[5]: f[6] for f in (ln.split("\t") for ln in log.read_text().splitlines()) if f[6] != "-"}
    for entry in ("f", "sub"):
        assert notes[entry].startswith("NTFS not kept on DST: stream s0256 (65536 bytes), ") and \
            notes[entry].count("stream s") == 2000 - 256, notes[entry][:200]
