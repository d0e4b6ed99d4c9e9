"""A tampered repository whose trees list the tree below twice, 40 levels deep: 42 blobs
name 2^40 paths. ``stats`` walked every path and never ended; it now reads each distinct
tree once and adds a tree met again from its sum, so every mode answers at once, and
exactly. (Without encryption anyone who can write the storage can forge such trees.)"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from deltavault.model.content import Full
from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from deltavault.repository.repository import Repository
from tests.conftest import Cli

LEVELS = 40


def test_stats_of_a_tree_naming_2_to_the_40_paths_answers_exactly(make_repo, cli: Cli,  # type: ignore[no-untyped-def]
                                                                  tmp_path: Path) -> None:
    repo: Repository = make_repo(encrypted=False)
    bid, _ = repo.save_blob(BlobType.DATA, b"x")
    tid, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree([
        Node(name=b"f", type=NodeType.FILE, mode=0o644, size=1, content=[Full(bid, 1)])])))
    for _ in range(LEVELS):
        tid, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree([
            Node(name=b"a", type=NodeType.DIR, mode=0o755, subtree=tid),
            Node(name=b"b", type=NodeType.DIR, mode=0o755, subtree=tid)])))
    root, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree([
        Node(name=b"src", type=NodeType.DIR, mode=0o755, subtree=tid)])))
    repo.flush()
    repo.save_snapshot(Snapshot(time="2026-01-01T00:00:00Z", time_ns=1, hostname="h", paths=["/src"],
                                source_id="h:/src", tree=root))
    cli.options = ("--insecure-no-encryption",)
    env = {"DELTAVAULT_REPOSITORY": str(tmp_path / "repo")}
    got = {}
    for mode in ("summary", "restore-size", "files-by-contents", "raw-data"):
        r = cli("--json", "stats", "--mode", mode, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
        got[mode] = json.loads(r.stdout.splitlines()[-1])
    paths = 2 ** LEVELS
    assert got["restore-size"]["files"] == paths and got["restore-size"]["bytes"] == paths
    assert got["files-by-contents"]["files"] == 1 and got["files-by-contents"]["bytes"] == 1
    assert got["raw-data"]["blobs"] == LEVELS + 3  # the trees and the one data blob
    assert got["summary"]["files"] == paths and got["summary"]["restore_size"] == paths
