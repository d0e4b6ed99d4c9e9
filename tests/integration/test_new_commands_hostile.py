"""Red-team tests of the commands and options of issues #19 and #15 (dump, copy, restore
--delete/--overwrite, backup's input options, rewrite/tag, report) against the threat
model of docs/security.md: a hostile source tree, restore target, cache and repository."""

from __future__ import annotations

import json
import os
import stat
import tarfile
from pathlib import Path

import msgspec
import pytest

from deltavault.backends.local import LocalBackend
from deltavault.model.content import Full
from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from deltavault.objects.walk import find
from deltavault.repository.repository import Repository
from deltavault.restore import select
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions
from deltavault.testing.hostile import Outside, attacked, mirror_names, rich_tree
from tests.conftest import PASSWORD, Cli
from tests.hostileutil import deltavault, make_deep
from tests.treeutil import remove_tree


@pytest.fixture(autouse=True)
def _no_deep_leftovers(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Trees thousands deep are removed here, fd by fd: pytest's own clean-up of old runs
    recurses and would fail on them in a later session."""
    yield
    for child in list(tmp_path.iterdir()):
        if child.is_dir() and not child.is_symlink():
            remove_tree(child)

NOBODY = 65534
# ---------------------------------------------------------------------------- dump
def _open(cli: Cli) -> Repository:
    return Repository.open(LocalBackend(cli.repo), lambda: PASSWORD, cache_root=cli.cache)


def _save_tree(repo: Repository, nodes: list[Node]) -> bytes:
    return repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree(nodes)))[0]


def _snapshot(repo: Repository, root: bytes) -> str:
    repo.flush()
    return repo.save_snapshot(Snapshot(time="2026-01-01T00:00:00Z", time_ns=1, hostname="h", paths=["/src"],
                                       source_id="h:/src", tree=root))


def test_dump_refuses_a_directory_listing_a_name_twice(cli: Cli, tmp_path: Path) -> None:
    """A tampered tree lists "d" twice: a symlink to a directory outside, then a directory
    holding "x". dump checked each name but not duplicates, so its tar held "d" -> outside
    and then "d/x": extracting it (Python's tarfile, as many tools do) wrote x outside. The
    listing must be refused as restore refuses it."""
    assert cli("init").returncode == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    repo = _open(cli)
    data = b"planted by the repository\n"
    bid, _ = repo.save_blob(BlobType.DATA, data)
    inner = _save_tree(repo, [Node(name=b"x", type=NodeType.FILE, mode=0o644, size=len(data),
                                   content=[Full(bid, len(data))])])
    src = _save_tree(repo, [Node(name=b"d", type=NodeType.SYMLINK, mode=0o777, target=os.fsencode(outside)),
                            Node(name=b"d", type=NodeType.DIR, mode=0o755, subtree=inner)])
    sid = _snapshot(repo, _save_tree(repo, [Node(name=b"src", type=NodeType.DIR, mode=0o755, subtree=src)]))
    tar = tmp_path / "out.tar"
    r = cli("dump", sid, "/", "--target", str(tar))
    if r.returncode == 0:  # what it did: show that the archive escapes
        dest = tmp_path / "extract"
        dest.mkdir()
        with tarfile.open(tar) as tf:
            tf.extractall(dest, filter="fully_trusted")
    assert not (outside / "x").exists(), "the dumped tar wrote outside its extraction directory"
    assert r.returncode == 13 and "twice" in r.stderr and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------- restore --delete
@pytest.mark.parametrize("nofile", [256, None])
def test_delete_removes_a_planted_tree_5000_deep_with_few_open_files(cli: Cli, tmp_path: Path,
                                                                     nofile: int | None) -> None:
    """Another user plants a 5,000-deep tree in the target. restore --delete removed extras
    with shutil.rmtree, which recurses in Python and holds one fd per level: it died with a
    traceback (RecursionError, or EMFILE under a small file limit) instead of removing it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "keep").write_bytes(b"k" * 100)
    assert cli("init").returncode == 0 and cli("backup", str(src)).returncode == 0
    target = tmp_path / "target"
    assert cli("restore", "latest", "--target", str(target)).returncode == 0
    (target / "extra").mkdir()
    make_deep(target / "extra", 5000, b"planted")
    r = deltavault(cli, "restore", "latest", "--target", str(target), "--delete", nofile=nofile)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert sorted(os.listdir(target)) == ["src"] and not (target / "extra").exists()
    assert (target / "src" / "keep").read_bytes() == b"k" * 100


def test_dry_run_refuses_unsafe_names_as_the_restore_does(cli: Cli, tmp_path: Path) -> None:
    """restore --dry-run read listings without the name check the restore applies: a
    tampered tree with a directory named ".." made it open the target's parent and report
    every name there as something --delete "would remove" (names outside the target, and a
    plan the real restore would never carry out)."""
    assert cli("init").returncode == 0
    repo = _open(cli)
    empty = _save_tree(repo, [])
    sid = _snapshot(repo, _save_tree(repo, [Node(name=b"src", type=NodeType.DIR, mode=0o755, subtree=empty),
                                            Node(name=b"..", type=NodeType.DIR, mode=0o755, subtree=empty)]))
    base = tmp_path / "base"
    target = base / "target"
    (target / "src").mkdir(parents=True)
    (base / "outside-private-name").write_bytes(b"x")
    r = cli("--json", "restore", sid, "--target", str(target), "--delete", "--dry-run")
    assert "outside-private-name" not in r.stdout, r.stdout
    assert any(o.get("type") == "problem" and o.get("kind") == "corrupt" for o in r.json), r.stdout
    real = cli("--json", "restore", sid, "--target", str(target), "--delete")
    assert any(o.get("type") == "problem" and o.get("kind") == "corrupt" for o in real.json), real.stdout
    assert (base / "outside-private-name").exists()


# ---------------------------------------------------------------------------- copy
def test_copy_map_of_one_source_is_not_used_for_a_source_claiming_its_id(cli: Cli, tmp_path: Path) -> None:
    """copy keeps a map (source blob id -> target blob id) per source, named by the source's
    config id and MACed under the target's key only. An unencrypted source repository's
    config is plain JSON: whoever controls it can claim the id of another source A that the
    target was copied from, and list in its trees blob ids of A it never held. The copy
    trusted A's map for them, read nothing, and the target got a snapshot "of B" holding A's
    private file, content never backed up in B."""
    target = {"DELTAVAULT_FROM_PASSWORD_FILE": str(cli.password_file)}
    assert cli("init").returncode == 0
    # A: a private source, copied into the target (which now keeps A's map)
    a_repo = tmp_path / "a"
    data = tmp_path / "data"
    data.mkdir()
    secret = os.urandom(30_000)
    (data / "private.key").write_bytes(secret)
    assert cli("init", env={"DELTAVAULT_REPOSITORY": str(a_repo)}).returncode == 0
    assert cli("backup", str(data), env={"DELTAVAULT_REPOSITORY": str(a_repo)}).returncode == 0
    assert cli("copy", "--from-repo", str(a_repo), env=target).returncode == 0
    a = Repository.open(LocalBackend(a_repo), lambda: PASSWORD, cache_root=tmp_path / "a-cache")
    [(_sid, snap)] = a.list_snapshots()
    assert snap.tree is not None
    node = find(a, snap.tree, "data/private.key")
    assert node is not None
    # B: unencrypted, its config claims A's id, its tree names A's blob of private.key
    b_repo = tmp_path / "b"
    assert cli("init", "--insecure-no-encryption", env={"DELTAVAULT_REPOSITORY": str(b_repo)}).returncode == 0
    cfg = json.loads((b_repo / "config").read_bytes())
    cfg["id"] = a.config.id
    (b_repo / "config").write_bytes(json.dumps(cfg).encode())
    b = Repository.open(LocalBackend(b_repo), lambda: None, cache_root=tmp_path / "b-cache", unencrypted=True)
    stolen = _save_tree(b, [msgspec.structs.replace(node, name=b"stolen")])
    _snapshot(b, _save_tree(b, [Node(name=b"src", type=NodeType.DIR, mode=0o755, subtree=stolen)]))
    r = cli("--json", "copy", "--from-repo", str(b_repo), "--from-insecure-no-encryption", env=target)
    out = tmp_path / "restored"
    if r.returncode == 0:
        copied = [o["copy"] for o in r.json if o.get("type") == "copy" and o.get("action") == "copied"]
        for sid in copied:
            cli("restore", sid, "--target", str(out))
    got = out / "src" / "stolen"
    assert not (got.exists() and got.read_bytes() == secret), "the target holds A's file as B's"
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stdout + r.stderr


# ---------------------------------------------------------------------------- backup inputs
def test_files_from_raw_with_a_name_not_in_utf8_backs_up_the_rest(cli: Cli, tmp_path: Path) -> None:
    """A list from ``find -print0`` holds whatever names users made. A source path that is
    not UTF-8 (here from --files-from-raw; on the command line alike) ended backup with a
    traceback (UnicodeEncodeError in the catalog): one user's file stopped everyone's
    backup. It is now left out and reported, the rest is saved, the run is partial (3)."""
    assert cli("init").returncode == 0
    src = tmp_path / "src"
    src.mkdir()
    bad = os.fsencode(src) + b"/bad-\xff"
    with open(bad, "wb") as f:
        f.write(b"x")
    (src / "good").write_bytes(b"good\n")
    lst = tmp_path / "list"
    lst.write_bytes(bad + b"\0" + os.fsencode(src / "good") + b"\0")
    r = cli("--json", "backup", "--files-from-raw", str(lst))
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    assert any(o.get("type") == "problem" and "bad-" in o.get("path", "") for o in r.json), r.stdout
    out = tmp_path / "out"
    assert cli("restore", "latest", "--target", str(out)).returncode == 0
    assert [p.name for p in out.rglob("good")] == ["good"]
    only_bad = cli("backup", os.fsdecode(bad))
    assert only_bad.returncode == 2 and "Traceback" not in only_bad.stderr and "UTF-8" in only_bad.stderr


def test_if_changed_keeps_no_file_another_user_planted_with_the_same_size_and_time(cli: Cli, tmp_path: Path,
                                                                                     shared_dir: Path) -> None:
    """--overwrite if-changed keeps an existing file of the snapshot's size and modification
    time. Any user who can write in the target can forge both on a file of theirs (utime),
    so a restore into an earlier restore whose directories are 0777 kept the attacker's
    content, owned by the attacker, in place of the file backed up. A file is kept only if it
    also has the owner the restore would give it (a user cannot give away a file)."""
    src = tmp_path / "src"
    src.mkdir()
    real = b"root:$6$realhash:19000:0:99999:7:::\n"
    (src / "shadow").write_bytes(real)
    (src / "shadow").chmod(0o640)
    assert cli("init").returncode == 0 and cli("backup", str(src)).returncode == 0
    target = shared_dir / "target"
    assert cli("restore", "latest", "--target", str(target)).returncode == 0
    for d in (target, target / "src"):
        d.chmod(0o777)
    planted = target / "src" / "shadow"
    st = planted.stat()
    fake = b"root::19000:0:99999:7:::\n".ljust(len(real), b" ")
    assert len(fake) == len(real)
    planted.unlink()
    pid = os.fork()
    if pid == 0:  # the other user: a file of theirs, the snapshot's size and time
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            planted.write_bytes(fake)
            os.utime(planted, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert planted.stat().st_uid == NOBODY and planted.stat().st_mtime_ns == st.st_mtime_ns
    r = cli("restore", "latest", "--target", str(target), "--overwrite", "if-changed")
    assert r.returncode == 0, r.stderr
    assert planted.read_bytes() == real and planted.stat().st_uid == 0
    assert stat.S_IMODE(planted.stat().st_mode) == 0o640
    # the restore's own file, unchanged, is still kept
    r = cli("--json", "restore", "latest", "--target", str(target), "--overwrite", "if-changed")
    assert r.last("summary")["skipped"] == 1, r.stdout


def _plant_extras(target: Path, n: int) -> None:
    """Entries the snapshot does not have, 0777 all through, for --delete to remove (and the
    attacker to swap while it does)."""
    for i in range(n):
        d = target / "src" / f"extra{i}"
        (d / "sub" / "deeper").mkdir(parents=True, exist_ok=True)
        for j in range(20):
            (d / f"f{j}").write_bytes(b"x")
            (d / "sub" / f"g{j}").write_bytes(b"y")
        (d / "sub" / "deeper" / "h").write_bytes(b"z")


def test_delete_under_a_racing_attacker_removes_nothing_outside(shared_dir: Path, cli: Cli) -> None:
    """restore --delete (with each --overwrite policy) over an earlier restore whose
    directories are 0777, with extra trees to remove, while a process running as nobody
    swaps the target's directories and entries for symlinks to root-only objects outside,
    moves directories and plants links: nothing outside is removed or changed."""
    src = shared_dir / "src"
    rich_tree(src, dirs=4)
    assert deltavault(cli, "init").returncode == 0
    assert deltavault(cli, "backup", str(src)).returncode == 0
    outside = Outside.create(shared_dir / "outside")
    mirror_names(outside)
    before = outside.state()
    moves = 0
    for seed, policy in enumerate(["always", "if-changed", "if-newer", "never"] * 2):
        target = shared_dir / f"target{seed}"  # an earlier restore, opened to everyone
        assert deltavault(cli, "restore", "latest", "--target", str(target)).returncode == 0
        _plant_extras(target, 6)
        for p in [target, *target.rglob("*")]:
            if p.is_dir() and not p.is_symlink():
                p.chmod(0o777)
        with attacked(target, outside, seed=seed) as attacker:
            r = deltavault(cli, "restore", "latest", "--target", str(target), "--delete", "--overwrite", policy)
        moves += sum(attacker.moves.values())
        assert r.returncode in (0, 3), r.stdout[-3000:] + r.stderr[-3000:]
        assert outside.changes(before) == [], "\n".join(outside.changes(before))
    assert moves > 50


# ---------------------------------------------------------------------------- restore --include
def test_include_planning_keeps_bounded_listings_and_restores_the_matches(make_repo, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """--include '**/*.conf' walks every directory of the snapshot to find matches; the
    planning walk kept every listing it read (for the restore to reuse), so its memory grew
    with the whole snapshot (which any user of the source can fill with files), not with
    what is restored. Listings kept are now capped (here at 500 entries); the restore loads
    the others again and restores exactly the matches."""
    repo = make_repo()
    bid, _ = repo.save_blob(BlobType.DATA, b"v\n")
    dirs = []
    for i in range(40):
        nodes = [Node(name=b"f%03d" % j, type=NodeType.FILE, mode=0o644, size=2, content=[Full(bid, 2)])
                 for j in range(100)]
        nodes.append(Node(name=b"x.conf", type=NodeType.FILE, mode=0o644, size=2, content=[Full(bid, 2)]))
        dirs.append(Node(name=b"d%02d" % i, type=NodeType.DIR, mode=0o755, subtree=_save_tree(repo, nodes)))
    src = _save_tree(repo, dirs)
    root = _save_tree(repo, [Node(name=b"src", type=NodeType.DIR, mode=0o755, subtree=src)])
    repo.flush()
    monkeypatch.setattr(select, "KEEP_LISTED", 500, raising=False)
    sel, unused = select.plan(repo, root, ["**/*.conf"], ["/src"])
    assert unused == []
    held, stack = 0, [sel]
    while stack:
        s = stack.pop()
        held += len(s.listing or [])
        stack += s.children.values()
    assert held <= 500, held
    target = tmp_path / "t"
    target.mkdir()
    FileRestorer(repo, target, RestoreOptions(include=["**/*.conf"], paths=["/src"])).run(root)
    got = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert got == [f"src/d{i:02d}/x.conf" for i in range(40)]


# ---------------------------------------------------------------------------- find
def test_find_in_a_deep_tree_uses_memory_in_proportion_to_its_matches(make_repo) -> None:  # type: ignore[no-untyped-def]
    """find remembered each directory's matches by copying them into every directory above:
    a source 1,500 directories deep with a matching file at each level (anyone can make one)
    kept 1.1 million references (quadratic in the depth: 20,000 levels would take
    gigabytes), and the pattern matcher recursed once per component, so find and restore
    --include died with RecursionError on such a tree. The matches under a directory are
    now shared with its parents, not copied, and the matcher keeps its own stack."""
    import tracemalloc

    from deltavault.fs.patterns import PatternSet
    from deltavault.fs.sources import SnapshotMatcher
    from deltavault.maintenance.find import Finder

    repo = make_repo()
    bid, _ = repo.save_blob(BlobType.DATA, b"v\n")
    depth = 1500
    f = Node(name=b"f", type=NodeType.FILE, mode=0o644, size=2, content=[Full(bid, 2)])
    tid = _save_tree(repo, [f])
    for _ in range(depth):
        tid = _save_tree(repo, [Node(name=b"d", type=NodeType.DIR, mode=0o755, subtree=tid), f])
    root = _save_tree(repo, [Node(name=b"src", type=NodeType.DIR, mode=0o755, subtree=tid)])
    repo.flush()
    snap = Snapshot(time="2026-01-01T00:00:00Z", time_ns=1, hostname="h", paths=["/src"], source_id="h:/src",
                    tree=root)
    matcher = SnapshotMatcher(PatternSet(["f"]), snap.paths)
    finder = Finder(repo)
    tracemalloc.start()
    try:
        hits = finder.find(snap, matcher)
        kept = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*/maintenance/find.py")])
    finally:
        tracemalloc.stop()
    held = sum(st.size for st in kept.statistics("filename"))
    # The paths themselves: the matches' (the output) and as many directories' (the memo's
    # keys), ~2.3 MB each. Besides them: 9.9 MB before, 0.4 MB now.
    paths = 2 * sum(len(p) + 40 for p, _n in hits)
    assert len(hits) == depth + 1
    assert held - paths < 1024 * 1024, f"find keeps {(held - paths) / 2**20:.1f} MiB besides the paths"
    again = finder.find(snap, matcher)  # another snapshot sharing the trees: from the memo
    assert [p for p, _n in again] == [p for p, _n in hits]


def test_find_and_restore_include_on_a_tree_1500_deep(cli: Cli, tmp_path: Path) -> None:
    """The pattern matcher recursed once per path component under '**': on a backup of a
    tree 1,500 directories deep, ``find leaf`` and ``restore --include '**/leaf'`` died with
    RecursionError (exit 1, a traceback)."""
    src = tmp_path / "src"
    src.mkdir()
    rel = make_deep(src, 1500, b"deep leaf\n")
    assert cli("init").returncode == 0 and cli("backup", str(src)).returncode == 0
    r = cli("--json", "find", "leaf")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.last("find_summary")["matches"] == 1
    out = tmp_path / "out"
    r = cli("restore", "latest", "--target", str(out), "--include", "**/leaf")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-2000:]
    fd = os.open(out / "src", os.O_RDONLY | os.O_DIRECTORY)
    try:
        leaf = os.open(rel, os.O_RDONLY, dir_fd=fd)
    finally:
        os.close(fd)
    try:
        assert os.read(leaf, 100) == b"deep leaf\n"
    finally:
        os.close(leaf)

