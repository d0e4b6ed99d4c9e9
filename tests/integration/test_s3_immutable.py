"""Immutable backups: a repository created with ``init --immutable DAYS`` on SeaweedFS, whose
S3 gateway implements Object Lock (retention modes, governance bypass, versions), so no
stand-in server is needed. What is checked is what a user relies on after a leak of the
repository's credentials: nothing written can be deleted before its time, prune and forget
say what they had to keep, and check notices retention that was removed or shortened."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deltavault.backends import open_backend
from deltavault.model.types import BlobType
from deltavault.repository.repository import Repository
from tests.conftest import PASSWORD, Cli
from tests.seaweed import Seaweed


def _versions(client: object, bucket: str, key: str) -> list[dict]:
    page = client.list_object_versions(Bucket=bucket, Prefix=key)  # type: ignore[attr-defined]
    return [v for v in page.get("Versions", []) + page.get("DeleteMarkers", []) if v["Key"] == key]


@pytest.fixture
def icli(cli: Cli, seaweed: Seaweed) -> Cli:
    bucket = f"dv-lock-{os.getpid()}-{os.urandom(3).hex()}"  # init creates it, with Object Lock
    cli.env.update(seaweed.env(), DELTAVAULT_REPOSITORY=seaweed.url(bucket, "repo"))
    return cli


@pytest.mark.usefixtures("s3env")
def test_immutable_repository(icli: Cli, seaweed: Seaweed, tmp_path: Path) -> None:
    bucket = icli.env["DELTAVAULT_REPOSITORY"].split("/")[3]
    c = seaweed.client()
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(300_000))
    r = icli("init", "--immutable", "1")
    assert r.returncode == 0, r.stderr
    assert "created bucket" in r.stdout and "with Object Lock" in r.stdout and "retained 1 days" in r.stdout
    b1 = icli("--json", "backup", str(src))
    assert b1.returncode == 0, b1.stderr
    (src / "b").write_bytes(os.urandom(300_000))
    assert icli("backup", str(src)).returncode == 0

    # Everything but locks carries retention of about a day from its write.
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.startswith("repo/data/") for k in keys) and not any(k.startswith("repo/locks/") for k in keys)
    for k in keys:
        h = c.head_object(Bucket=bucket, Key=k)
        assert h.get("ObjectLockMode") == "GOVERNANCE", k
        left = h["ObjectLockRetainUntilDate"] - datetime.now(UTC)
        assert timedelta(hours=23) < left <= timedelta(days=1), (k, left)
    # ... and a leaked credential cannot delete a stored version.
    pack = next(k for k in keys if k.startswith("repo/data/"))
    vid = c.head_object(Bucket=bucket, Key=pack)["VersionId"]
    with pytest.raises(Exception, match="AccessDenied"):
        c.delete_object(Bucket=bucket, Key=pack, VersionId=vid)

    # forget keeps retained snapshots and says so
    sid1 = b1.last("summary")["snapshot"]
    r = icli("--json", "forget", sid1)
    assert r.returncode == 0, r.stderr
    assert r.last("forget_retained")["snapshot"] == sid1
    assert r.last("forget_summary")["removed"] == 0
    assert len(icli("--json", "snapshots").json) == 2

    # An unused pack (blobs stored but in no snapshot): prune wants it gone, retention keeps it.
    repo = Repository.open(open_backend(icli.env["DELTAVAULT_REPOSITORY"]), lambda: PASSWORD,
                           cache_root=tmp_path / "cache")
    with repo.lock(command="test"):
        repo.save_blob(BlobType.DATA, os.urandom(100_000))
        repo.flush()
    garbage = repo.write_stats
    assert garbage.packs_written == 1
    r = icli("--json", "prune")
    assert r.returncode == 0, r.stderr
    p = r.last("prune_summary")
    assert (p["packs_retained"], p["packs_deleted"], p["packs_delete"]) == (1, 0, 0), p
    r = icli("prune")
    assert "under Object Lock retention (until" in r.stdout, r.stdout
    c1 = icli("--json", "check", "--read-data")
    assert c1.returncode == 0, c1.stdout

    # check: a version written without retention, and a retention shortened with the
    # governance bypass, are both reported.
    snap_key = f"repo/snapshots/{sid1}"
    body = c.get_object(Bucket=bucket, Key=snap_key)["Body"].read()
    c.put_object(Bucket=bucket, Key=snap_key, Body=body)  # same bytes, a new version without lock
    packs_now = {o["Key"] for o in c.list_objects_v2(Bucket=bucket, Prefix="repo/data/").get("Contents", [])}
    unused = sorted(packs_now - {k for k in keys if k.startswith("repo/data/")})
    assert len(unused) == 1
    c.put_object_retention(Bucket=bucket, Key=unused[0], BypassGovernanceRetention=True,
                           Retention={"Mode": "GOVERNANCE", "RetainUntilDate": datetime.now(UTC) + timedelta(seconds=3)})
    r = icli("--json", "check")
    assert r.returncode == 13, r.stdout
    problems = {i["message"].split(" ", 1)[0]: i["message"] for i in r.json if i.get("kind") == "retention"}
    assert set(problems) == {snap_key.removeprefix("repo/"), unused[0].removeprefix("repo/")}, problems
    assert "has no Object Lock retention" in problems[snap_key.removeprefix("repo/")]
    assert "it was shortened" in problems[unused[0].removeprefix("repo/")]

    # Once its retention has ended, prune removes the unused pack: every version of it.
    time.sleep(4)
    r = icli("--json", "prune")
    assert r.returncode == 0, r.stderr
    p = r.last("prune_summary")
    assert p["packs_deleted"] == 1 and p["packs_retained"] == 0, p
    assert _versions(c, bucket, unused[0]) == []
    assert p["index_files_retained"] >= 1  # superseded, still retained: left until their time
    c2 = icli("--json", "check", "--read-data")
    assert c2.last("check_summary")["errors"] == 1  # the snapshot version without lock, still
    out = tmp_path / "out"
    assert icli("restore", "latest", "--target", str(out), "--verify").returncode == 0

    # key passwd: the new key works at once; the old one is retained and said to be.
    newpw = tmp_path / "newpw"
    newpw.write_text("new password\n")
    r = icli("key", "passwd", "--new-password-file", str(newpw))
    assert r.returncode == 0, r.stderr
    assert "under Object Lock retention until" in r.stderr and "old password still opens" in r.stderr
    icli.password_file.write_text("new password\n")
    assert icli("snapshots").returncode == 0


def test_compliance_mode(cli: Cli, seaweed: Seaweed, tmp_path: Path) -> None:
    bucket = seaweed.new_bucket(object_lock=True)  # an existing bucket with Object Lock
    cli.env.update(seaweed.env(), DELTAVAULT_REPOSITORY=seaweed.url(bucket, "c"))
    r = cli("--json", "init", "--immutable", "2", "--immutable-mode", "compliance")
    assert r.returncode == 0, r.stderr
    assert r.last("init")["retention"] == "compliance:2"
    src = tmp_path / "src"
    src.mkdir()
    (src / "x").write_bytes(os.urandom(100_000))
    assert cli("backup", str(src)).returncode == 0
    c = seaweed.client()
    for o in c.list_objects_v2(Bucket=bucket).get("Contents", []):
        h = c.head_object(Bucket=bucket, Key=o["Key"])
        assert h.get("ObjectLockMode") == "COMPLIANCE"
        key = o["Key"]
        # not even the bypass can shorten or delete it
        with pytest.raises(Exception, match="AccessDenied"):
            c.delete_object(Bucket=bucket, Key=key, VersionId=h["VersionId"], BypassGovernanceRetention=True)
    assert cli("check").returncode == 0
    # The retention is part of the authenticated config: editing it is noticed.
    raw = c.get_object(Bucket=bucket, Key="c/config")["Body"].read()
    c.put_object(Bucket=bucket, Key="c/config", Body=raw.replace(b"compliance:2", b"compliance:0"))
    r = cli("snapshots")
    assert r.returncode == 13 and "authentication" in r.stderr, r.stderr
