"""snapshots --path/--latest, forget --tag/--path/--prune, stats modes, unlock, cache and
key export/import on real repositories, with their bad input."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from deltavault.backends.local import LocalBackend
from deltavault.repository.locks import LockInfo, LockManager
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD, Cli
from tests.treeutil import manifest


def _three_sources(tmp_path: Path, cli: Cli) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_bytes(os.urandom(200_000))
    (b / "g").write_bytes(os.urandom(200_000))
    assert cli("init").returncode == 0
    for i in range(3):
        (a / f"n{i}").write_text(str(i))
        assert cli("backup", str(a), "--tag", "daily" if i < 2 else "weekly").returncode == 0
    assert cli("backup", str(b), "--tag", "daily", "--host", "other").returncode == 0
    return a, b


def test_snapshots_filters_and_latest(tmp_path: Path, cli: Cli) -> None:
    a, b = _three_sources(tmp_path, cli)
    everything = cli("--json", "snapshots").json
    assert len(everything) == 4
    assert [s["paths"] for s in cli("--json", "snapshots", "--path", str(b)).json] == [[str(b)]]
    latest = cli("--json", "snapshots", "--latest", "1").json
    assert [s["id"] for s in latest] == [everything[2]["id"], everything[3]["id"]]
    assert len(cli("--json", "snapshots", "--latest", "2", "--path", str(a)).json) == 2
    assert len(cli("--json", "snapshots", "--tag", "daily").json) == 3
    assert len(cli("--json", "snapshots", "--tag", "daily", "--host", "other").json) == 1
    assert len(cli("--json", "snapshots", "--tag", "daily,weekly").json) == 0  # both at once: none
    assert len(cli("--json", "snapshots", "--tag", "daily", "--tag", "weekly").json) == 4 - 0
    r = cli("snapshots", "--latest", "0")
    assert r.returncode == 2 and "--latest" in r.stderr
    assert cli("--json", "snapshots", "--path", str(tmp_path / "none")).json == []


def test_forget_by_tag_and_path_then_prune(tmp_path: Path, cli: Cli) -> None:
    a, b = _three_sources(tmp_path, cli)
    before = sum(p.stat().st_size for p in (cli.repo / "data").rglob("*") if p.is_file())
    r = cli("--json", "forget", "--tag", "daily", "--path", str(a), "--keep-last", "1", "--dry-run")
    plan = [(o["snapshot"][:8], o["action"]) for o in r.json if o["type"] == "forget"]
    assert sorted(act for _s, act in plan) == ["keep", "remove"]  # the weekly one and b's are not considered
    assert len(cli("--json", "snapshots").json) == 4
    r = cli("--json", "forget", "--path", str(b), "--keep-tag", "weekly", "--prune")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.last("forget_summary")["removed"] == 1
    assert r.last("prune_summary")["packs_delete"] + r.last("prune_summary")["packs_repack"] >= 1
    after = sum(p.stat().st_size for p in (cli.repo / "data").rglob("*") if p.is_file())
    assert after < before - 150_000  # b's data is gone
    assert [s["paths"] for s in cli("--json", "snapshots").json] == [[str(a)]] * 3
    assert cli("check").returncode == 0
    r = cli("forget", "ffffffff")
    assert r.returncode == 2 and "no snapshot matches" in r.stderr


def test_stats_modes(tmp_path: Path, cli: Cli) -> None:
    a = tmp_path / "a"
    a.mkdir()
    data = os.urandom(300_000)
    (a / "one").write_bytes(data)
    (a / "two").write_bytes(data)  # same content, another path
    (a / "three").write_text("3")
    assert cli("init").returncode == 0
    assert cli("backup", str(a)).returncode == 0
    assert cli("backup", str(a)).returncode == 0
    rs = cli("--json", "stats", "--mode", "restore-size").last("stats")
    assert (rs["files"], rs["bytes"], rs["snapshots"]) == (6, 2 * 600_001, 2)
    fc = cli("--json", "stats", "--mode", "files-by-contents").last("stats")
    assert (fc["files"], fc["bytes"]) == (2, 300_001)
    raw = cli("--json", "stats", "--mode", "raw-data").last("stats")
    assert raw["raw_bytes"] >= 300_001 and raw["stored_bytes"] > 0 and raw["blobs"] >= 3
    assert raw["raw_bytes"] < 400_000  # each blob once
    latest = cli("--json", "stats", "latest", "--mode", "restore-size").last("stats")
    assert (latest["files"], latest["snapshots"]) == (3, 1)
    assert cli("--json", "stats").last("stats")["mode"] == "summary"
    r = cli("stats", "--mode", "blobs-per-file")
    assert r.returncode == 2
    r = cli("stats", "deadbeef")
    assert r.returncode == 2 and "no snapshot matches" in r.stderr


def test_unlock_removes_stale_locks_and_all_on_request(tmp_path: Path, cli: Cli) -> None:
    assert cli("init").returncode == 0
    repo = Repository.open(LocalBackend(cli.repo), lambda: PASSWORD, use_cache=False)
    mgr = LockManager(repo.backend, repo.env)
    now = time.time()
    # a dead process of this host (stale at once), and a live lock of another host
    mgr._write(LockInfo(hostname=mgr.hostname, pid=2**22 + 12345, pid_start=1, exclusive=True, created=now,
                        refreshed=now, command="backup (killed)", boot_id=mgr.boot_id))
    mgr._write(LockInfo(hostname="elsewhere", pid=1, pid_start=1, exclusive=False, created=now, refreshed=now,
                        command="backup"))
    r = cli("--json", "unlock")
    assert r.returncode == 0, r.stderr
    assert r.last("unlock_summary") == {"type": "unlock_summary", "removed": 1, "kept": 1}
    assert [o["hostname"] for o in r.json if o["type"] == "lock" and not o["removed"]] == ["elsewhere"]
    assert len(os.listdir(cli.repo / "locks")) == 1
    r = cli("--json", "unlock", "--remove-all")
    assert r.last("unlock_summary")["removed"] == 1 and os.listdir(cli.repo / "locks") == []


def test_cache_lists_and_cleans(tmp_path: Path, cli: Cli) -> None:
    src = tmp_path / "s"
    src.mkdir()
    (src / "f").write_text("x")
    assert cli("init").returncode == 0 and cli("backup", str(src)).returncode == 0
    repo_id = json.loads(cli("cat", "config").stdout)["id"]
    old = cli.cache / ("0" * 32)
    (old / "snapshots").mkdir(parents=True)
    (old / "snapshots" / "x").write_bytes(b"y" * 1000)
    past = time.time() - 90 * 86400
    for p in (old / "snapshots" / "x", old / "snapshots", old):
        os.utime(p, (past, past))
    (cli.cache / "not-a-cache").mkdir()
    listed = cli("--json", "cache")
    assert sorted(c["id"] for c in listed.json if c["type"] == "cache") == sorted([repo_id, "0" * 32])
    assert cli("-q", "cache").stdout.count("last used") == 2
    r = cli("--json", "cache", "--cleanup")
    assert [c["id"] for c in r.json if c["type"] == "cache" and c["removed"]] == ["0" * 32]
    assert not old.exists() and (cli.cache / repo_id).exists() and (cli.cache / "not-a-cache").exists()
    r = cli("--json", "cache", "--remove", repo_id[:6])
    assert r.returncode == 0 and not (cli.cache / repo_id).exists()
    r = cli("cache", "--remove", "ffff")
    assert r.returncode == 2 and "no cache matches" in r.stderr


def test_key_export_and_import_bring_a_lost_key_back(tmp_path: Path, cli: Cli) -> None:
    src = tmp_path / "s"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(10_000))
    assert cli("init").returncode == 0 and cli("backup", str(src)).returncode == 0
    exported = tmp_path / "master.key"
    r = cli("key", "export", "--output", str(exported))
    assert r.returncode == 0, r.stderr
    assert exported.stat().st_mode & 0o777 == 0o600
    assert json.loads(exported.read_text())["repository"] == json.loads(cli("cat", "config").stdout)["id"]
    assert cli("key", "export", "--output", str(exported)).returncode == 17  # never overwrites
    own = tmp_path / "export-password"
    own.write_text("for the safe\n")
    stdout_export = cli("key", "export", "--new-password-file", str(own))
    assert stdout_export.returncode == 0 and '"deltavault-key"' in stdout_export.stdout
    (tmp_path / "safe.key").write_text(stdout_export.stdout)
    for k in (cli.repo / "keys").iterdir():  # every key file lost
        k.unlink()
    assert cli("snapshots").returncode == 13
    r = cli("--json", "key", "import", str(tmp_path / "safe.key"))
    assert r.returncode == 12  # the repository's password does not open the safe's export
    r = cli("--json", "key", "import", str(tmp_path / "safe.key"), env={"DELTAVAULT_PASSWORD_FILE": str(own)})
    assert r.returncode == 0, r.stderr
    assert cli("key", "import", str(exported)).returncode == 0
    out = tmp_path / "out"
    assert cli("restore", "latest", "--target", str(out)).returncode == 0
    assert manifest(out / "s") == manifest(src)
    assert cli("snapshots", env={"DELTAVAULT_PASSWORD_FILE": str(own)}).returncode == 0


def test_key_import_refuses_another_repositorys_key(tmp_path: Path, cli: Cli) -> None:
    assert cli("init").returncode == 0
    other = {"DELTAVAULT_REPOSITORY": str(tmp_path / "other")}
    assert cli("init", env=other).returncode == 0
    exported = tmp_path / "other.key"
    assert cli("key", "export", "-o", str(exported), env=other).returncode == 0
    r = cli("key", "import", str(exported))
    assert r.returncode == 2 and "not this one" in r.stderr
    (tmp_path / "junk").write_text("{}")
    r = cli("key", "import", str(tmp_path / "junk"))
    assert r.returncode == 2 and "not a deltavault key export" in r.stderr
    r = cli("key", "import")
    assert r.returncode == 2 and "key import needs the file" in r.stderr
