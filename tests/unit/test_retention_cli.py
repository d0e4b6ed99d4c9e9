"""forget and prune through the real CLI."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import Cli, init_small_packs


def test_forget_dry_run_explains_then_forget_and_prune(cli: Cli, tmp_path: Path) -> None:
    init_small_packs(cli.repo, cli.password_file)
    src = tmp_path / "data"
    src.mkdir()
    ids = []
    for i in range(4):
        (src / "f").write_bytes(os.urandom(400_000))
        r = cli("--json", "backup", str(src), "--host", "h1" if i < 3 else "h2")
        assert r.returncode == 0, r.stderr
        ids.append(r.last("summary")["snapshot"])
    r = cli("--json", "forget", "--keep-last", "1", "--dry-run")
    assert r.returncode == 0, r.stderr
    rows = {o["snapshot"]: o for o in r.json if o["type"] == "forget"}
    assert rows[ids[2]]["action"] == "keep" and rows[ids[2]]["reasons"] == ["last"]
    assert rows[ids[3]]["action"] == "keep"  # the only snapshot of its group (host h2)
    assert [rows[i]["action"] for i in ids[:2]] == ["remove", "remove"]
    assert r.last("forget_summary") == {"type": "forget_summary", "kept": 2, "removed": 2, "dry_run": True}
    assert len(cli("--json", "snapshots").json) == 4  # dry run changed nothing
    text = cli("forget", "--keep-last", "1")
    assert "removed 2 snapshot(s)" in text.stdout and "keep" in text.stdout
    r = cli("--json", "prune")
    assert r.returncode == 0, r.stderr
    s = r.last("prune_summary")
    assert s["packs_deleted"] >= 2 and s["bytes_freed"] > 700_000
    assert cli("check", "--read-data").returncode == 0
    r = cli("--json", "forget", ids[3])
    assert r.last("forget_summary")["removed"] == 1
    assert {o["id"] for o in cli("--json", "snapshots").json if o["type"] == "snapshot"} == {ids[2]}


def test_forget_without_a_rule_is_refused(cli: Cli) -> None:
    assert cli("init").returncode == 0
    r = cli("forget")
    assert r.returncode == 2 and "no retention rule" in r.stderr


def test_prune_keeps_what_volume_snapshots_reference(cli: Cli, tmp_path: Path) -> None:
    """Volume manifests reference block maps, digests and data: prune must trace them."""
    import hashlib

    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(3 << 20))
    init_small_packs(cli.repo, cli.password_file)
    first = cli("--json", "backup", "--volume", str(img), "--block-size", "256K")
    assert first.returncode == 0, first.stderr
    with open(img, "r+b") as f:
        f.write(os.urandom(1 << 20))  # the first MiB changes: its old blocks become garbage
    second = cli("--json", "backup", "--volume", str(img), "--block-size", "256K")
    assert second.returncode == 0, second.stderr
    assert cli("forget", first.last("summary")["snapshot"]).returncode == 0
    r = cli("--json", "prune", "--repack-threshold", "0.01")
    assert r.returncode == 0, r.stdout + r.stderr
    s = r.last("prune_summary")
    assert s["bytes_freed"] > 500_000, s
    assert cli("check", "--read-data").returncode == 0
    out = tmp_path / "out.img"
    r = cli("--json", "restore", "--volume", second.last("summary")["snapshot"], str(out))
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(img.read_bytes()).digest()
