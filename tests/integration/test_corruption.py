"""Corruption: random bit flips and truncations of real pack, index and snapshot files.

For every injected fault: ``check --read-data`` reports it, and names exactly the snapshots
and paths whose data it hits; files it does not hit still restore byte for byte; ``repair``
(rewriting damaged snapshots) leaves a repository that checks clean, and nothing beyond
the damaged blobs is lost. DELTAVAULT_CORRUPTION_TRIALS sets the count (default 90);
DELTAVAULT_CORRUPTION_REPORT names a JSON file for the figures.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from deltavault.backends.local import LocalBackend
from deltavault.maintenance.check import check_repository
from deltavault.maintenance.repair import DAMAGED_XATTR, repair
from deltavault.model.content import ref_blob_ids
from deltavault.model.nodes import NodeType
from deltavault.objects.trees import load_nodes
from deltavault.repository.pack import pack_name
from deltavault.repository.repository import Repository
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions
from tests.conftest import PASSWORD, Cli, init_small_packs
from tests.memlimit import MemoryLimit

TRIALS = int(os.environ.get("DELTAVAULT_CORRUPTION_TRIALS", "90"))
SEED = int(os.environ.get("DELTAVAULT_CORRUPTION_SEED", str(random.randrange(1 << 30))))
# deltavault's processes run under the documented memory limit (tests/memlimit.py); the
# checks and repairs called in this process (not started as processes) are not limited.
pytestmark = pytest.mark.memory_limit


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def open_repo(path: Path) -> Repository:
    return Repository.open(LocalBackend(path, fsync=False), lambda: PASSWORD, use_cache=False, tolerant=True)


def tree_paths(repo: Repository, tid: bytes, prefix: bytes, out: dict[bytes, set[str]]) -> None:
    """blob id -> paths, as check names them: files for content, directories for trees."""
    out.setdefault(tid, set()).add(prefix.decode() or "/")
    for n in load_nodes(repo, tid):
        path = prefix + b"/" + n.name if prefix else n.name
        if n.type == NodeType.DIR and n.subtree:
            tree_paths(repo, n.subtree, path, out)
        for r in n.content:
            for b in ref_blob_ids(r):
                out.setdefault(b, set()).add(path.decode())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, memory_limit: MemoryLimit) -> Path:
    """A real repository from the CLI: two snapshots of a small tree, several packs."""
    import os as _os
    import sys

    base = tmp_path_factory.mktemp("corruption")
    pw = base / "pw"
    pw.write_text(PASSWORD.decode())
    env = {k: v for k, v in _os.environ.items() if not k.startswith("DELTAVAULT_")}
    env.update(DELTAVAULT_REPOSITORY=str(base / "repo"), DELTAVAULT_PASSWORD_FILE=str(pw),
               DELTAVAULT_CACHE_DIR=str(base / "cache"))
    src = base / "src"
    (src / "sub").mkdir(parents=True)
    rnd = random.Random(7)
    for i in range(5):
        (src / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(1000, 400_000)))
        (src / "sub" / f"g{i}").write_bytes(rnd.randbytes(rnd.randrange(1000, 300_000)))
    (src / "big").write_bytes(rnd.randbytes(2_500_000))

    def run(*args: str) -> None:
        p = memory_limit.run([sys.executable, "-m", "deltavault", *args], env=env, text=True)
        assert p.returncode == 0, p.stderr

    init_small_packs(Path(env["DELTAVAULT_REPOSITORY"]), Path(env["DELTAVAULT_PASSWORD_FILE"]))
    run("backup", str(src))
    (src / "f1").write_bytes(rnd.randbytes(200_000))
    (src / "sub" / "g2").write_bytes(rnd.randbytes(150_000))
    run("backup", str(src))
    return base / "repo"


def expected_damage(repo: Repository, rel: str, offset: int, end: int) -> tuple[set[bytes], dict[str, set[str]]]:
    """Blobs whose bytes lie in [offset, end) of the damaged file, and what that hits."""
    lost: set[bytes] = set()
    affected: dict[str, set[str]] = {}
    sids = repo.snapshot_ids()
    if rel.startswith("snapshots/"):
        return lost, {rel.split("/")[1]: {"(whole snapshot)"}}
    if rel.startswith("data/"):
        pid = bytes.fromhex(rel.rsplit("/", 1)[1])
        for e in repo.index.entries_by_pack().get(pid, []):
            if e.offset < end and offset < e.offset + e.length:
                lost.add(e.id)
    for sid in sids:
        snap = repo.load_snapshot(sid)
        assert snap.tree is not None
        where: dict[bytes, set[str]] = {}
        tree_paths(repo, snap.tree, b"", where)
        hit = set().union(*(where.get(b, set()) for b in lost)) if lost else set()
        # A lost directory listing hides what is below it: check names the directory only.
        hit = {p for p in hit if not any(p.startswith(d + "/") for d in hit if d != "/")}
        if "/" in hit:
            hit = {"/"}
        if hit:
            affected[sid] = hit
    return lost, affected


def restore_files(repo: Repository, sid: str, target: Path, include: list[str]) -> dict[str, str]:
    snap = repo.load_snapshot(sid)
    assert snap.tree is not None
    FileRestorer(repo, str(target), RestoreOptions(include=include, owner=False)).run(snap.tree)
    return {p.relative_to(target).as_posix(): sha(p.read_bytes()) for p in target.rglob("*") if p.is_file()}


def test_random_damage_is_found_named_and_repaired(pristine: Path, tmp_path: Path) -> None:
    rnd = random.Random(SEED)
    print(f"corruption seed {SEED} trials {TRIALS}")
    clean = open_repo(pristine)
    truth = {sid: restore_files(clean, sid, tmp_path / f"truth-{sid[:8]}", []) for sid in clean.snapshot_ids()}
    files = sorted(p.relative_to(pristine).as_posix() for p in pristine.rglob("*")
                   if p.is_file() and p.parts[-2] != "keys" and p.name != "config"
                   and not p.relative_to(pristine).as_posix().startswith("locks/"))
    kinds = {k: [f for f in files if f.startswith(k)] for k in ("data/", "index/", "snapshots/")}
    stats = {"injected": 0, "detected": 0, "affected_named_exactly": 0, "bit_flips": 0, "truncations": 0,
             "by_kind": {k.rstrip("/"): 0 for k in kinds}, "blobs_damaged": 0, "blobs_lost_after_repair": 0,
             "unaffected_files_restored": 0, "data_lost_beyond_damage": 0}
    for trial in range(TRIALS):
        kind = ("data/", "index/", "snapshots/")[trial % 3]
        rel = rnd.choice(kinds[kind])
        work = tmp_path / f"t{trial}"
        shutil.copytree(pristine, work)
        path = work / rel
        raw = bytearray(path.read_bytes())
        before = open_repo(work)
        if rnd.random() < 0.6:
            off = rnd.randrange(len(raw))
            raw[off] ^= 1 << rnd.randrange(8)
            lo, hi = off, off + 1
            stats["bit_flips"] += 1
        else:
            cut = rnd.randrange(len(raw))
            lo, hi = cut, len(raw)
            del raw[cut:]
            stats["truncations"] += 1
        lost, want = expected_damage(before, rel, lo, hi)
        path.write_bytes(bytes(raw))
        stats["injected"] += 1
        stats["by_kind"][kind.rstrip("/")] += 1
        stats["blobs_damaged"] += len(lost)

        repo = open_repo(work)
        rep = check_repository(repo, read_data=True)
        assert rep.errors, f"trial {trial}: damage to {rel} at {lo}:{hi} went unnoticed"
        stats["detected"] += 1
        got = {sid: set(paths) for sid, paths in rep.affected.items()}
        if kind == "index/":
            # Packs the damaged index named look unindexed until repair: check names every
            # path whose blobs it can no longer find, although no data is lost.
            assert got or not before.snapshot_ids()
        else:
            assert got == want, f"trial {trial}: {rel} {lo}:{hi}: reported {got}, expected {want}"
            stats["affected_named_exactly"] += 1

        # Files the damage does not touch restore byte for byte, before any repair.
        sid = rnd.choice(sorted(truth))
        if sid in repo.snapshot_ids() and "(whole snapshot)" not in got.get(sid, set()) and "/" not in got.get(sid, set()):
            hit = got.get(sid, set())
            ok = [p for p in truth[sid] if not any(p == h or p.startswith(h + "/") for h in hit)]
            if ok and kind != "index/":
                restored = restore_files(repo, sid, work.with_name(work.name + "-r"), ok)
                assert restored == {p: truth[sid][p] for p in ok}
                stats["unaffected_files_restored"] += len(ok)

        rr = repair(open_repo(work), rewrite=True)
        fixed = open_repo(work)
        after = check_repository(fixed, read_data=True)
        assert not after.errors, [i.message for i in after.errors]
        stats["blobs_lost_after_repair"] += rr.blobs_lost
        # Nothing beyond the damaged blobs is lost: every file not hit is intact.
        for new_sid in fixed.snapshot_ids():
            snap = fixed.load_snapshot(new_sid)
            orig = snap.parent if "repaired" in snap.tags and snap.parent else new_sid
            target = work.with_name(work.name + f"-final-{new_sid[:8]}")
            restored = restore_files(fixed, new_sid, target, [])
            marked = _marked(fixed, new_sid)
            for p, digest in truth[orig].items():
                if p in restored and restored[p] != digest:
                    damaged_mark = p in marked
                    if not damaged_mark:
                        stats["data_lost_beyond_damage"] += 1
                    assert damaged_mark, f"trial {trial}: {p} changed but is not marked damaged"
        shutil.rmtree(work)
        for extra in tmp_path.glob(f"t{trial}-*"):
            shutil.rmtree(extra)
    stats["seed"] = SEED
    print(json.dumps(stats))
    report = os.environ.get("DELTAVAULT_CORRUPTION_REPORT")
    if report:
        Path(report).write_text(json.dumps(stats, indent=2))
    assert stats["detected"] == stats["injected"] and stats["data_lost_beyond_damage"] == 0


def _marked(repo: Repository, sid: str) -> set[str]:
    """Paths the repair marked damaged (read from the snapshot's trees)."""
    from deltavault.objects.walk import walk

    snap = repo.load_snapshot(sid)
    assert snap.tree is not None
    return {p.decode() for p, n in walk(repo, snap.tree) if any(k == DAMAGED_XATTR for k, _v in n.xattrs)}


def test_wrong_password_and_tampered_key_change_nothing(cli: Cli, tmp_path: Path) -> None:
    assert cli("init").returncode == 0
    src = tmp_path / "s"
    src.mkdir()
    (src / "a").write_bytes(b"x" * 1000)
    assert cli("backup", str(src)).returncode == 0

    def state() -> dict[str, bytes]:
        return {p.relative_to(cli.repo).as_posix(): p.read_bytes() for p in cli.repo.rglob("*") if p.is_file()}

    before = state()
    wrong = tmp_path / "wrong"
    wrong.write_text("not the password\n")
    for args in (("backup", str(src)), ("check", "--read-data"), ("prune",), ("repair",), ("forget", "--keep-last", "1")):
        r = cli(*args, env={"DELTAVAULT_PASSWORD_FILE": str(wrong)})
        assert r.returncode == 12, (args, r.returncode, r.stderr)
        assert "wrong password" in r.stderr
        assert "Traceback" not in r.stderr
    assert state() == before

    key = next((cli.repo / "keys").iterdir())
    key.write_bytes(key.read_bytes().replace(b'"r":8', b'"r":9'))
    before = state()
    for args in (("backup", str(src)), ("check",), ("repair",)):
        r = cli(*args)
        assert r.returncode == 13, (args, r.returncode, r.stderr)
        assert "damaged or tampered" in r.stderr
    assert state() == before


def test_cli_check_names_damaged_file_and_repair_reports_it(cli: Cli, tmp_path: Path) -> None:
    init_small_packs(cli.repo, cli.password_file)
    src = tmp_path / "s"
    src.mkdir()
    (src / "keep").write_bytes(os.urandom(300_000))
    (src / "hurt").write_bytes(os.urandom(300_000))
    assert cli("backup", str(src)).returncode == 0
    repo = open_repo(cli.repo)
    from deltavault.objects.walk import find

    snap = repo.load_snapshot(repo.snapshot_ids()[0])
    assert snap.tree is not None
    node = find(repo, snap.tree, "s/hurt")
    assert node is not None
    loc = repo.index.lookup(ref_blob_ids(node.content[-1])[0])
    assert loc is not None
    p = cli.repo / pack_name(loc.pack_id)
    raw = bytearray(p.read_bytes())
    raw[loc.offset + 50] ^= 0x04
    p.write_bytes(bytes(raw))
    r = cli("check", "--read-data")
    assert r.returncode == 13 and "s/hurt" in r.stdout and "s/keep" not in r.stdout.split("affected")[-1]
    r = cli("restore", "latest", "--target", str(tmp_path / "out"), "--include", "s/keep")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "s" / "keep").read_bytes() == (src / "keep").read_bytes()
    r = cli("repair", "--json")
    assert r.returncode == 13
    summary = r.last("repair_summary")
    assert summary["blobs_lost"] == 1 and any("s/hurt" in v for v in summary["affected"].values())
    r = cli("repair", "--rewrite-snapshots")
    assert "rewritten" in r.stdout
    assert cli("check", "--read-data").returncode == 0


def test_cli_check_reports_a_damaged_index_file_once_and_repair_recovers_everything(cli: Cli, tmp_path: Path) -> None:
    assert cli("init").returncode == 0
    src = tmp_path / "s"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(100_000))
    assert cli("backup", str(src)).returncode == 0
    idx = next((cli.repo / "index").iterdir())
    raw = bytearray(idx.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    idx.write_bytes(bytes(raw))
    r = cli("--json", "check")
    assert r.returncode == 13
    index_issues = [o for o in r.json if o.get("type") == "issue" and o["kind"] == "index"]
    assert len(index_issues) == 1, index_issues
    r = cli("--json", "repair")
    assert r.returncode == 0, r.stdout + r.stderr  # nothing was lost: the packs were intact
    assert r.last("repair_summary")["blobs_lost"] == 0
    assert cli("check", "--read-data").returncode == 0
    assert cli("restore", "latest", "--target", str(tmp_path / "o")).returncode == 0
    assert (tmp_path / "o" / "s" / "a").read_bytes() == (src / "a").read_bytes()


def test_repair_leaves_a_pack_the_store_does_not_answer_for_as_it_was(cli: Cli, tmp_path: Path) -> None:
    """A pack the store would not give (here a FIFO in its place, which the local backend
    refuses unread; on S3 an error after the retries) was taken for damaged: repair deleted
    it and dropped its blobs from the index. Now it is left and indexed as it was, repair
    says so and exits 15; once the store answers again, nothing is lost."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "big").write_bytes(random.Random(7).randbytes(3_000_000))
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    pack = max((p for p in (cli.repo / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    aside = tmp_path / "pack"
    shutil.move(pack, aside)
    os.mkfifo(pack)
    r = cli("repair")
    assert r.returncode == 15 and "left as it was" in r.stderr, r.stdout + r.stderr
    assert pack.is_fifo()
    pack.unlink()
    shutil.move(aside, pack)
    assert cli("check", "--read-data").returncode == 0
    r = cli("restore", "latest", "--target", str(tmp_path / "out"))
    assert r.returncode == 0 and (tmp_path / "out" / "src" / "big").read_bytes() == (src / "big").read_bytes()
