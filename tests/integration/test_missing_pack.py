"""A pack gone from the repository, or cut short, while the index still names its blobs
(deleted by hand, a storage fault, a lifecycle rule): the next backup must not deduplicate
against those blobs. It stores them again, says so, exits 0 (its snapshot is complete), and
that snapshot restores every byte; `check` shows only the damaged pack, and `repair` clears
it (repository/packcheck.py). On a local directory and on S3 (the SeaweedFS the tests start).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Cli, init_small_packs
from tests.seaweed import Seaweed

FILES = {f"f{i}.bin": random.Random(i).randbytes(700_000 + 9_000 * i) for i in range(6)}

# A store that can list, delete and rewrite a repository's packs behind deltavault's back.
Packs = dict[str, int]


class Store:
    def __init__(self, cli: Cli, request: pytest.FixtureRequest, where: str) -> None:
        self.where = where
        if where == "local":
            self.root = cli.repo
            init_small_packs(cli.repo, cli.password_file)
        else:
            seaweed: Seaweed = request.getfixturevalue("seaweed")
            request.getfixturevalue("s3env")
            self.bucket = seaweed.new_bucket()
            self.client = seaweed.client()
            url = seaweed.url(self.bucket, "repo")
            cli.env.update(seaweed.env(), DELTAVAULT_REPOSITORY=url)
            init_small_packs(url, cli.password_file)

    def packs(self) -> Packs:
        if self.where == "local":
            return {str(p.relative_to(self.root)): p.stat().st_size for p in (self.root / "data").rglob("*")
                    if p.is_file() and not p.name.startswith(".")}
        got = self.client.list_objects_v2(Bucket=self.bucket, Prefix="repo/data/").get("Contents", [])
        return {o["Key"].removeprefix("repo/"): o["Size"] for o in got}

    def delete(self, name: str) -> None:
        if self.where == "local":
            (self.root / name).unlink()
        else:
            self.client.delete_object(Bucket=self.bucket, Key=f"repo/{name}")

    def truncate(self, name: str, size: int) -> None:
        if self.where == "local":
            os.truncate(self.root / name, size)
        else:
            body = self.client.get_object(Bucket=self.bucket, Key=f"repo/{name}")["Body"].read()
            self.client.put_object(Bucket=self.bucket, Key=f"repo/{name}", Body=body[:size])


def _damage_delete(store: Store, name: str, size: int) -> None:
    store.delete(name)


def _damage_truncate(store: Store, name: str, size: int) -> None:
    store.truncate(name, size // 3)


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("damage", [_damage_delete, _damage_truncate], ids=["deleted", "truncated"])
def test_backup_stores_again_what_a_damaged_pack_held(cli: Cli, tmp_path: Path, request: pytest.FixtureRequest,
                                                      where: str, damage: Callable[[Store, str, int], None]) -> None:
    store = Store(cli, request, where)
    src = tmp_path / "src"
    src.mkdir()
    for name, data in FILES.items():
        (src / name).write_bytes(data)
    # Past the racy window (files.RACY_NS), so backup 2 trusts the files' stat data: it would
    # reuse their nodes from the catalog, reading nothing, as an unchanged file normally is.
    time.sleep(2.1)
    first = cli("backup", "--json", str(src))
    assert first.returncode == 0, first.stderr
    sid1 = first.last("summary")["snapshot"]
    # The largest pack holds file content (tree packs are small).
    name, size = max(store.packs().items(), key=lambda kv: kv[1])
    damage(store, name, size)

    second = cli("backup", "--json", str(src))
    assert second.returncode == 0, second.stderr
    summary = second.last("summary")
    assert summary["errors"] == 0
    sid2 = summary["snapshot"]

    # Backup 2 gives every byte back, before any repair (the old code: its snapshot named
    # the lost blobs, and this restore failed).
    target = tmp_path / "restored"
    r = cli("restore", sid2, "--target", str(target))
    assert r.returncode == 0, r.stderr
    restored = {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert restored == FILES

    truncated = damage is _damage_truncate
    assert (summary["packs_missing"], summary["packs_truncated"]) == ((0, 1) if truncated else (1, 0))
    assert summary["index_entries_dropped"] > 0
    assert summary["bytes_added"] > 0  # the lost blobs were stored again
    assert [p["kind"] for p in summary["problems"]] == ["repository"]
    assert "deltavault repair" in summary["problems"][0]["message"]

    # check sees the damaged pack, but no snapshot loses anything: both name the blobs
    # backup 2 stored again.
    c = cli("check", "--read-data", "--json")
    assert c.returncode != 0
    assert c.last("check_summary")["affected"] == {}
    assert {i["kind"] for i in c.json if i.get("type") == "issue" and i["severity"] == "error"} == {"pack"}
    # A third backup finds nothing more to store for the same files.
    third = cli("backup", "--json", str(src))
    assert third.returncode == 0, third.stderr
    assert third.last("summary")["errors"] == 0
    assert third.last("summary")["files_unmodified"] == len(FILES)

    r = cli("repair")
    assert r.returncode == 0, r.stderr + r.stdout
    c = cli("check", "--read-data", "--json")
    assert c.returncode == 0, c.stdout
    for sid in (sid1, sid2):
        target = tmp_path / f"after-repair-{sid[:8]}"
        r = cli("restore", sid, "--target", str(target))
        assert r.returncode == 0, r.stderr
        assert {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()} == FILES


def _largest_pack(root: Path) -> Path:
    return max((p for p in (root / "data").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_volume_backup_reads_again_what_a_missing_pack_held(cli: Cli, tmp_path: Path) -> None:
    # An unchanged volume: the old code reused every segment of the previous manifest,
    # the lost blocks too, and its snapshot could not be restored.
    init_small_packs(cli.repo, cli.password_file)
    img = tmp_path / "disk.img"
    img.write_bytes(random.Random(7).randbytes(4 << 20))
    r = cli("--json", "backup", "--volume", str(img), "--block-size", "256K")
    assert r.returncode == 0, r.stderr
    _largest_pack(cli.repo).unlink()
    r = cli("--json", "backup", "--volume", str(img), "--block-size", "256K")
    assert r.returncode == 0, r.stderr
    s = r.last("summary")
    out = tmp_path / "out.img"
    back = cli("--json", "restore", "--volume", s["snapshot"], str(out))
    assert back.returncode == 0, back.stderr
    assert out.read_bytes() == img.read_bytes()
    assert s["packs_missing"] == 1 and s["index_entries_dropped"] > 0
    assert any("deltavault repair" in w for w in s["warnings"])


def test_copy_copies_again_what_a_missing_target_pack_held(cli: Cli, tmp_path: Path) -> None:
    # The second copy of the same data deduplicated against the target's index: the old
    # code's copy named the target's lost blobs.
    src_repo = tmp_path / "from"
    source = {"DELTAVAULT_REPOSITORY": str(src_repo)}
    target = {"DELTAVAULT_FROM_PASSWORD_FILE": str(cli.password_file)}
    init_small_packs(cli.repo, cli.password_file)
    assert cli("init", env=source).returncode == 0
    data = tmp_path / "data"
    data.mkdir()
    for name, content in FILES.items():
        (data / name).write_bytes(content)
    assert cli("backup", str(data), env=source).returncode == 0
    assert cli("copy", "--from-repo", str(src_repo), env=target).returncode == 0
    _largest_pack(cli.repo).unlink()
    (data / "new.txt").write_bytes(b"a second snapshot")
    assert cli("backup", str(data), env=source).returncode == 0
    r = cli("--json", "copy", "--from-repo", str(src_repo), env=target)
    assert r.returncode == 0, r.stderr
    [new] = [o["copy"] for o in r.json if o.get("type") == "copy" and o.get("action") == "copied"]
    out = tmp_path / "restored"
    back = cli("restore", new, "--target", str(out))
    assert back.returncode == 0, back.stderr
    assert {p.name: p.read_bytes() for p in out.rglob("*.bin")} == FILES
    s = r.last("copy_summary")
    assert s["packs_missing"] == 1 and s["index_entries_dropped"] > 0
