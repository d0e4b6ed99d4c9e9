"""Bad input that reaches the repository side: empty passwords, damaged old snapshots, trees
that lie about sizes or are very deep, and a damaged config. Each gets a clear message and
its exit code, and nothing already stored is lost."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import msgspec

from deltavault.backends.local import LocalBackend
from deltavault.maintenance.check import check_repository
from deltavault.model.content import Full
from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from deltavault.objects.diff import diff_trees
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD, Cli


def _snapshot_of(repo: Repository, root: bytes, path: str = "/src") -> str:
    repo.flush()
    return repo.save_snapshot(Snapshot(time="2026-01-01T00:00:00Z", time_ns=1, hostname="h", paths=[path],
                                       source_id=f"h:{path}", tree=root))


def _deep_tree(repo: Repository, depth: int, data: bytes) -> bytes:
    """A chain of ``depth`` directories named "d" with one file at the bottom, saved
    bottom-up; returns the root tree id (whose single entry is the source "src")."""
    bid, _ = repo.save_blob(BlobType.DATA, data)
    nodes = [Node(name=b"deep.txt", type=NodeType.FILE, mode=0o644, size=len(data), content=[Full(bid, len(data))])]
    for _ in range(depth):
        tid, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree(nodes)))
        nodes = [Node(name=b"d", type=NodeType.DIR, mode=0o755, subtree=tid)]
    tid, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree(nodes)))
    root, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(
        Tree([Node(name=b"src", type=NodeType.DIR, mode=0o755, subtree=tid)])))
    return root


# ---------------------------------------------------------------------------- passwords
def test_init_refuses_an_empty_password(cli: Cli, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    r = cli("init", env={"DELTAVAULT_PASSWORD_FILE": str(empty)})
    assert r.returncode == 2, r.stderr
    assert "password is empty" in r.stderr and "--insecure-no-password" in r.stderr
    assert not cli.repo.exists() or not any(cli.repo.iterdir())
    # On purpose: encrypted, with an empty password, and opened the same way.
    assert cli("init", "--insecure-no-password").returncode == 0
    assert json.loads(cli.repo.joinpath("config").read_text())["encryption"] == "aes-256-gcm+scrypt"
    assert cli("snapshots", "--insecure-no-password").returncode == 0
    assert cli("snapshots").returncode == 12  # the real password file's password is not the key's


def test_key_add_refuses_an_empty_new_password(cli: Cli, tmp_path: Path) -> None:
    assert cli("init").returncode == 0
    empty = tmp_path / "empty"
    empty.write_text("")
    r = cli("key", "add", "--new-password-file", str(empty))
    assert r.returncode == 2 and "new password is empty" in r.stderr
    assert len(list((cli.repo / "keys").iterdir())) == 1


# ---------------------------------------------------------------------------- damaged snapshots
def test_a_damaged_old_snapshot_stops_neither_backup_nor_restore(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"first")
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    first = {p.name for p in (cli.repo / "snapshots").iterdir()}
    (src / "a").write_bytes(b"second version")
    assert cli("backup", str(src)).returncode == 0
    (old,) = first
    damaged = cli.repo / "snapshots" / old
    damaged.write_bytes(damaged.read_bytes()[:-7] + b"garbage")  # the tag fails, and the name
    shutil.rmtree(cli.cache)  # the cache holds a good copy: read the damaged one
    (src / "a").write_bytes(b"third, longer version")
    r = cli("backup", str(src))
    assert r.returncode == 0, r.stderr
    assert f"snapshot {old[:8]} cannot be read" in r.stderr
    r = cli("restore", "latest", "--target", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "src" / "a").read_bytes() == b"third, longer version"
    r = cli("--json", "snapshots")
    assert r.returncode == 0
    listed = [o["id"] for o in r.json if o.get("type") == "snapshot"]
    assert old not in listed and len(listed) == 2
    assert any(o.get("type") == "warning" and old[:8] in o["message"] for o in r.json)
    # prune must not guess what a snapshot it cannot read refers to
    r = cli("prune")
    assert r.returncode == 13 and "Nothing was deleted" in r.stderr
    assert cli("check").returncode == 13


# ---------------------------------------------------------------------------- trees that lie
def test_a_size_that_disagrees_with_the_content_fails_check_with_the_path(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo()
    bid, _ = repo.save_blob(BlobType.DATA, b"12345")
    liar = Node(name=b"liar.bin", type=NodeType.FILE, mode=0o644, size=4096, content=[Full(bid, 5)])
    honest = Node(name=b"ok.bin", type=NodeType.FILE, mode=0o644, size=5, content=[Full(bid, 5)])
    sub, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree([liar, honest])))
    root, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(
        Tree([Node(name=b"src", type=NodeType.DIR, mode=0o755, subtree=sub)])))
    sid = _snapshot_of(repo, root)
    rep = check_repository(repo)
    msgs = [i.message for i in rep.errors]
    assert any("src/liar.bin" in m and "records 4096 bytes but its content holds 5" in m for m in msgs), msgs
    assert not any("ok.bin" in m for m in msgs)
    assert rep.affected == {sid: ["src/liar.bin"]}


def test_unsafe_and_duplicate_names_fail_check(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo()
    for bad in ([b"..", b"x"], [b"same", b"same"], [b"a/b"]):
        nodes = [Node(name=n, type=NodeType.FIFO, mode=0o644) for n in bad]
        tid, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree(nodes)))
        root, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(
            Tree([Node(name=b"src", type=NodeType.DIR, mode=0o755, subtree=tid)])))
        _snapshot_of(repo, root, path=f"/{bad[0].hex()}")
    msgs = [i.message for i in check_repository(repo).errors]
    assert sum("unsafe name" in m for m in msgs) == 2 and sum("twice" in m for m in msgs) == 1, msgs


def test_check_and_diff_walk_a_tree_of_depth_5000(make_repo) -> None:  # type: ignore[no-untyped-def]
    repo = make_repo()
    a = _deep_tree(repo, 5000, b"bottom v1")
    b = _deep_tree(repo, 5000, b"bottom v2")
    _snapshot_of(repo, a)
    _snapshot_of(repo, b)
    rep = check_repository(repo)
    assert rep.errors == [] and rep.snapshots == 2
    changes = list(diff_trees(repo, a, b))
    assert [c.kind for c in changes] == ["M"]
    assert changes[0].path == b"src/" + b"d/" * 5000 + b"deep.txt"


# ---------------------------------------------------------------------------- config
def _config(cli: Cli) -> dict:  # type: ignore[type-arg]
    return json.loads((cli.repo / "config").read_bytes())


def _backed_up(cli: Cli, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(200_000))
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    return src


def _restores(cli: Cli, src: Path, target: Path) -> None:
    r = cli("restore", "latest", "--target", str(target), "--verify")
    assert r.returncode == 0, r.stderr
    assert (target / "src" / "f").read_bytes() == (src / "f").read_bytes()


def test_repair_rebuilds_a_truncated_config_exactly(cli: Cli, tmp_path: Path) -> None:
    src = _backed_up(cli, tmp_path)
    good = _config(cli)
    raw = (cli.repo / "config").read_bytes()
    (cli.repo / "config").write_bytes(raw[: len(raw) - 20])  # the mac and the end are gone
    r = cli("snapshots")
    assert r.returncode == 13 and "'deltavault repair' rebuilds it" in r.stderr
    r = cli("repair", "--dry-run")
    assert r.returncode == 13 and "would be rebuilt" in r.stderr
    r = cli("repair")
    assert r.returncode == 0, r.stderr
    assert "was rebuilt" in r.stderr and "id: salvaged from the damaged config" in r.stderr
    assert _config(cli) == good  # every field recovered, mac recomputed to the same value
    _restores(cli, src, tmp_path / "out")
    r = cli("--json", "backup", str(src))
    assert r.returncode == 0 and r.last("summary")["change_source"] == "catalog"  # same cache id


def test_repair_rebuilds_a_lost_config_from_keys_packs_and_cache(cli: Cli, tmp_path: Path) -> None:
    src = _backed_up(cli, tmp_path)
    good = _config(cli)
    (cli.repo / "config").unlink()
    r = cli("snapshots")
    assert r.returncode == 13 and "lost its config" in r.stderr
    r = cli("repair")
    assert r.returncode == 0, r.stderr
    assert "the config is missing" in r.stderr and "id: inferred" in r.stderr
    assert _config(cli) == good  # id from the cache, the rest defaults, which this one used
    _restores(cli, src, tmp_path / "out")


def test_repair_replaces_an_edited_config_it_cannot_authenticate(cli: Cli, tmp_path: Path) -> None:
    src = _backed_up(cli, tmp_path)
    cfg = _config(cli)
    cfg["pack_size"] = 1  # an attacker's edit: outside init's bounds
    (cli.repo / "config").write_text(json.dumps(cfg))
    assert cli("backup", str(src)).returncode == 13
    r = cli("repair")
    assert r.returncode == 0, r.stderr
    assert "fails its authentication" in r.stderr and "pack_size: default" in r.stderr
    assert _config(cli)["pack_size"] == 32 * 1024 * 1024
    _restores(cli, src, tmp_path / "out")


def test_repair_says_why_a_config_cannot_be_rebuilt(cli: Cli, tmp_path: Path) -> None:
    _backed_up(cli, tmp_path)
    (cli.repo / "config").unlink()
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password")
    r = cli("repair", env={"DELTAVAULT_PASSWORD_FILE": str(wrong)})
    assert r.returncode == 12 and "rebuilding the config needs the master key" not in r.stderr
    assert "wrong password" in r.stderr
    (key,) = (cli.repo / "keys").iterdir()
    key.write_bytes(key.read_bytes().replace(b'"salt":"', b'"salt":"A', 1))
    r = cli("repair")
    assert r.returncode == 13
    assert "cannot be rebuilt" in r.stderr and "master key is lost" in r.stderr
    assert not (cli.repo / "config").exists()  # nothing written on a guess


def test_repair_rebuilds_the_config_of_an_unencrypted_repository(cli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"plain" * 1000)
    cli.options = ("--insecure-no-encryption",)
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    good = _config(cli)
    (cli.repo / "config").write_bytes(b"\x00" * 40)
    r = cli("repair")
    assert r.returncode == 0, r.stderr
    assert "encryption: no key files: unencrypted" in r.stderr
    assert _config(cli) == good
    _restores(cli, src, tmp_path / "out")


def test_rebuilt_config_opens_with_the_api(tmp_path: Path, cli: Cli) -> None:
    src = _backed_up(cli, tmp_path)
    (cli.repo / "config").unlink()
    assert cli("repair").returncode == 0
    repo = Repository.open(LocalBackend(cli.repo), lambda: PASSWORD, use_cache=False)
    assert len(repo.list_snapshots()) == 1 and src.exists()
