"""tag and rewrite on a real repository: new ids, originals recorded, change tracking kept,
data freed by the next prune, and bad input."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.conftest import Cli
from tests.integration.dayone.conftest import raw


def _repo(tmp_path: Path, cli: Cli) -> Path:
    src = tmp_path / "data"
    (src / "secrets").mkdir(parents=True)
    (src / "secrets" / "key.pem").write_bytes(os.urandom(600_000))
    (src / "notes.txt").write_text("notes\n")
    (src / "big.bin").write_bytes(os.urandom(300_000))
    assert cli("init").returncode == 0
    assert cli("backup", str(src), "--tag", "a").returncode == 0
    (src / "notes.txt").write_text("more notes\n")
    assert cli("backup", str(src), "--tag", "b").returncode == 0
    return src


def test_tag_adds_removes_and_sets(tmp_path: Path, cli: Cli) -> None:
    src = _repo(tmp_path, cli)
    before = cli("--json", "snapshots").json
    r = cli("--json", "tag", "--add", "keep,offsite", "--tag", "a")
    assert r.returncode == 0, r.stderr
    assert r.last("tag_summary") == {"type": "tag_summary", "changed": 1, "considered": 1}
    after = cli("--json", "snapshots").json
    assert [s["tags"] for s in after] == [["a", "keep", "offsite"], ["b"]]
    assert after[0]["id"] != before[0]["id"] and after[0]["original"] == before[0]["id"]
    assert after[0]["time"] == before[0]["time"] and after[1]["id"] == before[1]["id"]
    assert cli("--json", "tag", "--remove", "offsite", after[0]["id"][:8]).last("tag_summary")["changed"] == 1
    assert cli("--json", "tag", "--set", "x", "--set", "y").last("tag_summary")["changed"] == 2
    final = cli("--json", "snapshots").json
    assert [s["tags"] for s in final] == [["x", "y"], ["x", "y"]]
    assert final[0]["original"] == before[0]["id"]  # the first of the chain
    assert cli("--json", "tag", "--add", "x").last("tag_summary")["changed"] == 0  # nothing to change
    # the next backup still compares with the local catalog, though its snapshot was replaced
    time.sleep(2.1)
    s = cli("--json", "backup", str(src)).last("summary")
    assert s["change_source"] == "catalog" and s["parent"] == final[1]["id"]
    assert (s["files_new"], s["files_changed"], s["files_unmodified"]) == (0, 0, 3)
    for args, msg in ((["tag", "latest"], "needs --add, --remove or --set"),
                      (["tag", "--set", "a", "--add", "b"], "use it alone"),
                      (["tag", "--add", "t", "ffffffff"], "no snapshot matches")):
        r = cli(*args)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)


def test_rewrite_drops_paths_and_prune_frees_their_data(tmp_path: Path, cli: Cli) -> None:
    _repo(tmp_path, cli)
    tree = json.loads(cli("cat", "tree", "latest:data/secrets").stdout)
    secret_blobs = [ref[1] for ref in tree["nodes"][0]["content"]]
    dry = cli("--json", "rewrite", "--exclude", "secrets", "--dry-run")
    assert dry.returncode == 0 and dry.last("rewrite_summary")["rewritten"] == 2
    assert [o["path"] for o in dry.json if o["type"] == "removed"] == ["data/secrets", "data/secrets"]
    assert raw(cli, "cat", "blob", secret_blobs[0]).returncode == 0
    before = {s["id"] for s in cli("--json", "snapshots").json}
    r = cli("--json", "rewrite", "--exclude", "data/secrets")
    assert r.returncode == 0, r.stdout + r.stderr
    snaps = cli("--json", "snapshots").json
    assert {s["original"] for s in snaps} == before and not ({s["id"] for s in snaps} & before)
    assert all(s["summary"]["bytes_total"] == len("notes\n") + 300_000 or
               s["summary"]["bytes_total"] == len("more notes\n") + 300_000 for s in snaps)
    ls = cli("--json", "ls", "latest").json
    assert sorted(o["path"] for o in ls) == ["data", "data/big.bin", "data/notes.txt"]
    assert cli("check").returncode == 0
    assert cli("prune").returncode == 0
    gone = raw(cli, "cat", "blob", secret_blobs[0])
    assert gone.returncode == 2 and b"no blob" in gone.stderr  # freed
    assert cli("check", "--read-data").returncode == 0
    out = tmp_path / "out"
    assert cli("restore", "latest", "--target", str(out)).returncode == 0
    assert not (out / "data" / "secrets").exists() and (out / "data" / "big.bin").exists()


def test_rewrite_bad_input(tmp_path: Path, cli: Cli) -> None:
    _repo(tmp_path, cli)
    ids = [s["id"] for s in cli("--json", "snapshots").json]
    r = cli("rewrite", "--exclude", "*.nothing")
    assert r.returncode == 0 and "rewrote 0 of 2 snapshot(s); nothing matches '*.nothing'" in r.stdout
    r = cli("rewrite", "--exclude", "data")
    assert r.returncode == 3 and "it would be empty" in r.stdout
    assert [s["id"] for s in cli("--json", "snapshots").json] == ids
    for args, msg in ((["rewrite"], "needs what to drop"),
                      (["rewrite", "--exclude", "x", "deadbeef"], "no snapshot matches"),
                      (["rewrite", "--exclude", "x", "--keep-original", "--forget"], "contradict")):
        r = cli(*args)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
    r = cli("--json", "rewrite", "--exclude", "notes.txt", "--keep-original", ids[0][:8])
    assert r.returncode == 0 and len(cli("--json", "snapshots").json) == 3
