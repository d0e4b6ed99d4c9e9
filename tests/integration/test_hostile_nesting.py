"""Objects nested deeper than the interpreter's recursion limit, planted by someone without
the key: a few hundred kilobytes of ``[[[[...]]]]`` in a field nobody reads. msgspec raises
RecursionError for them, which escaped every decoder as an internal error with a traceback;
a key file like that, planted beside the real one, locked every user out of the repository.
All decoding now goes through ``framing.decode_msgpack``/``decode_json``."""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import msgspec

from deltavault.model.content import Full
from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from deltavault.repository.repository import Repository
from tests.conftest import Cli

DEPTH = 200_000


def _deep_json_object(extra_to: dict[str, object]) -> bytes:
    text = json.dumps(extra_to)
    return (text[:-1] + ', "zz": ' + "[" * DEPTH + "]" * DEPTH + "}").encode()


def _ok(r: object) -> None:
    assert "Traceback" not in getattr(r, "stderr", ""), getattr(r, "stderr", "")


def test_a_deeply_nested_key_file_or_config_is_damage_not_a_crash(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"alpha")
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    # A key file planted by anyone who can write keys/: the real one still opens the repository.
    real = next((cli.repo / "keys").iterdir())
    planted = cli.repo / "keys" / ("0" * 64)
    planted.write_bytes(_deep_json_object(json.loads(real.read_bytes())))
    r = cli("snapshots", "--json")
    _ok(r)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = cli("restore", "latest", "--target", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "src" / "a.txt").read_bytes() == b"alpha"
    # Alone, it is a damaged key file (exit 13), as any other damage is.
    real.rename(tmp_path / "real-key")
    r = cli("snapshots")
    _ok(r)
    assert r.returncode == 13 and "is damaged: nested too deeply" in r.stderr, r.stderr
    (tmp_path / "real-key").rename(real)
    planted.unlink()
    # The config (plaintext, authenticated only after it is parsed).
    cfg = cli.repo / "config"
    cfg.write_bytes(_deep_json_object(json.loads(cfg.read_bytes())))
    r = cli("snapshots")
    _ok(r)
    assert r.returncode == 13 and "config is damaged: nested too deeply" in r.stderr, r.stderr


def test_deeply_nested_trees_and_snapshots_of_an_unencrypted_repository(make_repo, cli: Cli,  # type: ignore[no-untyped-def]
                                                                        tmp_path: Path) -> None:
    """Without encryption anyone who can write the storage forges objects whose ids check."""
    repo: Repository = make_repo(encrypted=False)
    # {"nodes": [], "zz": [[[...nil...]]], "v": 1}
    deep = b"\x83\xa5nodes\x90\xa2zz" + b"\x91" * DEPTH + b"\xc0\xa1v\x01"
    bomb, _ = repo.save_blob(BlobType.TREE, deep)
    ok_id, _ = repo.save_blob(BlobType.DATA, b"kept")
    root, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree([
        Node(name=b"bomb", type=NodeType.DIR, mode=0o755, subtree=bomb),
        Node(name=b"kept.txt", type=NodeType.FILE, mode=0o644, size=4,
             content=[Full(ok_id, 4)])])))
    repo.flush()
    repo.save_snapshot(Snapshot(time="2026-01-01T00:00:00Z", time_ns=1, hostname="h", paths=["/src"],
                                source_id="h:/src", tree=root))
    cli.options = ("--insecure-no-encryption",)
    env = {"DELTAVAULT_REPOSITORY": str(tmp_path / "repo")}
    out = tmp_path / "out"
    r = cli("restore", "latest", "--target", str(out), env=env)
    _ok(r)
    assert r.returncode == 13, r.stderr  # corruption met, the rest restored
    assert "nested too deeply" in r.stdout + r.stderr
    assert (out / "kept.txt").read_bytes() == b"kept"
    r = cli("check", env=env)
    _ok(r)
    assert r.returncode != 0 and "nested too deeply" in r.stdout + r.stderr
    # A snapshot file (sealed but not encrypted) nested as deeply: that snapshot is damaged.
    sealed = b"\x00" + b"\x81\xa2zz" + b"\x91" * DEPTH + b"\xc0"
    (tmp_path / "repo" / "snapshots" / blake3.blake3(sealed).hexdigest()).write_bytes(sealed)
    r = cli("snapshots", env=env)
    _ok(r)
    assert "nested too deeply" in r.stdout + r.stderr, r.stdout + r.stderr
