"""NTFS streams over ssh with peers that differ: an agent or source of an older version
(without the NTFS feature), and a hand-made sender naming hostile streams (split from
test_ntfs_sync_remote.py)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from deltavault.sync.options import SyncOptions
from tests.conftest import needs_root, needs_tools
from tests.integration.ntfs.ntfsutil import ntfs
from tests.integration.ntfs.test_ntfs_sync import (
    BIG,
    populate,
)
from tests.integration.sync.conftest import REMOTE, dv, summary
from tests.sshd import Server, missing_tools

pytestmark = [needs_root(), needs_tools("mkntfs", "ntfs-3g", "getfattr"), pytest.mark.root,
              pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")]

OLDER = REMOTE.replace("-m deltavault", "-c " + shlex.quote(
    "import runpy, deltavault.sync.wire as w; w.FEATURES.clear(); "
    "runpy.run_module('deltavault', run_name='__main__', alter_sys=True)"))


def notes(log: Path) -> dict[str, str]:
    """The log's "note" lines, by path (a file's own line may come before or after it)."""
    return {f[5]: f[6] for f in (ln.split("\t") for ln in log.read_text().splitlines()) if f[1] == "note"}


def warnings(r: CompletedProcess[str]) -> list[str]:
    return [o["message"] for o in map(json.loads, r.stdout.splitlines()) if o.get("type") == "warning"]


def test_agent_without_the_ntfs_feature_gets_the_data(server: Server, tmp_path: Path) -> None:
    """A push to an agent that lists no "ntfs" feature (an older deltavault): the data and
    POSIX metadata are copied, one warning says the peer cannot take NTFS metadata or
    streams, and the log names, entry by entry, what was not kept, counted as onto ext4
    (exit 0, ``ntfs_not_kept``). With --xattrs small streams travel as user. xattrs, which
    such an agent mirrors."""
    assert OLDER != REMOTE
    env = {"DELTAVAULT_SSH_CONFIG": str(server.ssh_config)}
    acl = "security descriptor, DOS attributes, creation time"
    with ntfs(tmp_path, "src") as src:
        populate(src)
        for n, (flags, want) in enumerate([
                (["--acl", "--streams"], {"doc.txt": f"stream big ({BIG} bytes), stream small (10 bytes), {acl}",
                                          "readonly.txt": acl, "sub": acl, ".": acl}),
                (["--streams"], {"doc.txt": f"stream big ({BIG} bytes), stream small (10 bytes)"}),
                (["--acl", "--streams", "--xattrs"], {"doc.txt": f"stream big ({BIG} bytes), {acl}",
                                                      "readonly.txt": acl, "sub": acl, ".": acl})]):
            dst, log = tmp_path / f"dst{n}", tmp_path / f"sync{n}.log"
            r = dv("--json", "sync", "--remote-command", OLDER, "--log", str(log), *flags, str(src / "data"),
                   f"dvtest:{dst}", env=env)
            assert r.returncode == 0, r.stdout + r.stderr
            w = warnings(r)
            assert len(w) == 1 and "cannot take NTFS metadata or streams" in w[0] and "upgrade it" in w[0], w
            s = summary(r)
            assert s["problems"] == [] and s["ntfs_not_kept"] == len(want), (flags, s)
            assert notes(log) == {k: "NTFS not kept on DST: " + v for k, v in want.items()}, (flags, notes(log))
            assert (dst / "doc.txt").read_text() == "hello\n" and (dst / "readonly.txt").read_text() == "ro\n"
            assert (dst / "sub").is_dir()
            small = [x for x in os.listxattr(dst / "doc.txt") if x.startswith("user.")]
            assert small == (["user.small"] if "--xattrs" in flags else []), small
            if small:
                assert os.getxattr(dst / "doc.txt", "user.small") == b"0123456789"
    # The same agent syncs a tree that is not on NTFS, --acl and all, without a warning.
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "f").write_text("f")
    r = dv("--json", "sync", "--remote-command", OLDER, "--acl", "--streams", str(tmp_path / "plain"),
           f"dvtest:{tmp_path / 'dst'}", env=env)
    assert r.returncode == 0 and warnings(r) == [], r.stdout + r.stderr
    assert (tmp_path / "dst" / "f").read_text() == "f"


def test_pull_from_an_older_source_warns(server: Server, tmp_path: Path) -> None:
    """A pull from a deltavault that reads no NTFS metadata (an older one): the data comes,
    and one warning says NTFS metadata and streams were not copied (which entries had them
    cannot be told from this side)."""
    with ntfs(tmp_path, "src") as src:
        populate(src)
        r = dv("--json", "sync", "--remote-command", OLDER, "--acl", "--streams", f"dvtest:{src / 'data'}",
               str(tmp_path / "dst"), env={"DELTAVAULT_SSH_CONFIG": str(server.ssh_config)})
    assert r.returncode == 0, r.stdout + r.stderr
    w = warnings(r)
    assert len(w) == 1 and "reads no NTFS metadata or streams" in w[0], w
    assert (tmp_path / "dst" / "doc.txt").read_text() == "hello\n"


def test_agent_never_joins_a_hostile_stream_name(tmp_path: Path) -> None:
    """A sender (this test, speaking the protocol to a real ``deltavault sync-agent``) names
    streams ``../evil`` and ``a:b``: the agent asks only for the valid one, names the others
    (not valid on DST), and installs the file; nothing is made outside DST."""
    import sys

    import blake3

    from deltavault.framing import read_frame, write_frame
    from deltavault.fs.ntfs import ReadResult
    from deltavault.sync.wire import VERSION, entry, options_wire, win_wire

    (tmp_path / "model").write_bytes(b"data")
    st, st_dir = os.stat(tmp_path / "model"), os.stat(tmp_path)
    with ntfs(tmp_path, "dst") as dst:
        agent = subprocess.Popen([sys.executable, "-m", "deltavault", "sync-agent"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE)
        assert agent.stdin is not None and agent.stdout is not None
        w, r = agent.stdin, agent.stdout

        def recv() -> dict:  # type: ignore[type-arg]
            got = read_frame(r)
            assert got is not None
            return got[0]  # type: ignore[no-any-return]

        try:
            write_frame(w, {"op": "hello", "version": VERSION, "dest": str(dst / "d"), "features": ["ntfs"],
                            "ntfs": True, "options": options_wire(SyncOptions(streams=True)),
                            "root": entry(b"_", "d", st_dir)})
            hello = recv()
            assert hello.get("ntfs") == {"streams": "windows"}, hello
            meta = ReadResult(b"", "", None, b"", b"", [])
            win = win_wire(meta, streams={b"../evil": 4, b"a:b": 4, b"ok": 2})
            e = entry(b"f", "f", st, win=win)
            write_frame(w, {"op": "dir", "path": b"", "entries": [e], "protected": [], "included": True, "id": 1})
            assert recv()["want"] == [[b"f", "whole"]]
            write_frame(w, {"op": "put", "path": b"", "e": e})
            write_frame(w, {"d": b"data"})
            write_frame(w, {"end": blake3.blake3(b"data").digest()})
            asked = []
            while (req := recv()).get("op") != "bye":
                asked.append((req["op"], req["path"]))
                write_frame(w, {"d": b"ok"})
                write_frame(w, {"end": blake3.blake3(b"ok").digest()})
            assert asked == [("whole", b"ok")]
            write_frame(w, {"op": "enddir", "path": b"", "e": entry(b"_", "d", st_dir)})
            write_frame(w, {"op": "finish", "problems": [], "stopped": False, "id": 2})
            records = recv()["records"]
        finally:
            w.close()
            agent.wait(timeout=60)
        errors = [rec for rec in records if rec[0] == "error"]
        assert len(errors) == 2 and all(rec[1] == b"f" and "name not valid on DST" in rec[6] for rec in errors), records
        assert (dst / "d" / "f").read_bytes() == b"data"
        assert Path(f"{dst / 'd' / 'f'}:ok").read_bytes() == b"ok"
        assert sorted(p.name for p in dst.iterdir()) == ["d"] and not (dst / "evil").exists()
