"""The S3 backend against a real SeaweedFS started by the tests (tests/seaweed.py), through
a counting and misbehaving HTTP proxy (tests/s3proxy.py) where a test needs one: every
command end to end, what an incremental downloads, dropped connections, 503 storms, a slow
server, and locks. Bad input (credentials, buckets, endpoints, clocks, TLS) is in
test_s3_bad_input.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import blake3
import pytest

from deltavault.backends import open_backend
from deltavault.backends.base import put_file
from deltavault.backends.s3location import S3Location, parse_location
from deltavault.backup.files.run import BackupRequest, run_backup
from deltavault.errors import UsageError
from deltavault.maintenance.check import check_repository
from deltavault.repository.repository import Repository
from tests.conftest import FAST_SCRYPT, PASSWORD, Cli
from tests.remote_volume import volume_round_trip
from tests.s3proxy import Proxy
from tests.seaweed import Seaweed
from tests.treeutil import manifest

MiB = 1024 * 1024


def write_tree(src: Path, n: int = 6, size: int = 1_500_000) -> None:
    (src / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (src / f"f{i}").write_bytes(os.urandom(size))
    (src / "sub" / "note.txt").write_text("first\n")
    (src / "link").symlink_to("sub/note.txt")


def pending_uploads(seaweed: Seaweed, bucket: str) -> list[str]:
    return [u["Key"] for u in seaweed.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def test_locations() -> None:
    assert parse_location("s3:http://127.0.0.1:8333/b-1/some/prefix/") == \
        S3Location("b-1", "some/prefix", "http://127.0.0.1:8333")
    assert parse_location("s3:https://minio.example:9000/backups") == \
        S3Location("backups", "", "https://minio.example:9000")
    assert parse_location("s3:my-bucket/host1") == S3Location("my-bucket", "host1", None)
    assert parse_location("s3://my-bucket") == S3Location("my-bucket", "", None)
    for text in ("s3:http://127.0.0.1:8333/b-1/p", "s3:my-bucket/host1", "s3:my.bucket"):
        assert str(parse_location(text)) == text
    for bad in ("s3:", "s3:http://host", "s3:ftp://host/b", "s3:AB/x", "s3:ab", "s3:bucket/../x",
                "s3:bucket/a//b"):
        with pytest.raises(UsageError):
            parse_location(bad)


def test_every_command_end_to_end(scli: Cli, s3proxy: Proxy, seaweed: Seaweed, bucket: str,
                                  tmp_path: Path) -> None:
    """init, backup (full, incremental), snapshots, ls, diff, restore, check --read-data,
    stats, key add/list/passwd/remove, forget, prune (then check --read-data and a restore of
    the kept snapshot), repair, on S3; an incremental receives
    only config and key (measured by the proxy, whatever the client says)."""
    src = tmp_path / "data"
    write_tree(src)
    r = scli("init")
    assert r.returncode == 0, r.stderr
    time.sleep(2.1)  # past the racy window, so the second run trusts the catalog
    b1 = scli("--json", "backup", str(src))
    assert b1.returncode == 0, b1.stderr
    v1 = manifest(src)
    (src / "sub" / "note.txt").write_text("second\n")
    before = s3proxy.snapshot()
    b2 = scli("--json", "backup", str(src))
    traffic = s3proxy.snapshot().since(before)
    assert b2.returncode == 0, b2.stderr
    s2 = b2.last("summary")
    assert (s2["files_changed"], s2["files_unmodified"]) == (1, 6), s2
    assert s2["bytes_downloaded"] < 4096, s2
    # Received: config, key, the lock's own read-back and the listings (XML), no pack, no index.
    assert traffic.received < 64 * 1024, traffic
    print(f"incremental on S3: {traffic.requests} requests, {traffic.sent} B sent, {traffic.received} B received")
    assert scli("ls", "latest").returncode == 0
    assert scli("diff", b1.last("summary")["snapshot"], "latest").returncode == 0
    for n, (sid, want) in enumerate(((b1.last("summary")["snapshot"], v1), ("latest", manifest(src)))):
        out = tmp_path / f"out{n}"
        r = scli("--json", "restore", sid, "--target", str(out), "--verify")
        assert r.returncode == 0, r.stdout + r.stderr
        assert manifest(out / "data") == want
    c = scli("--json", "check", "--read-data")
    assert c.returncode == 0 and c.last("check_summary")["errors"] == 0, c.stdout
    assert scli("stats").returncode == 0
    # keys
    newpw = tmp_path / "newpw"
    newpw.write_text("another password\n")
    assert scli("key", "add", "--new-password-file", str(newpw)).returncode == 0
    keys = scli("--json", "key", "list").json
    assert len([k for k in keys if k.get("type") == "key"]) == 2
    r = scli("key", "passwd", "--new-password-file", str(newpw))
    assert r.returncode == 0, r.stderr
    scli.password_file.write_text("another password\n")
    keys = [k for k in scli("--json", "key", "list").json if k.get("type") == "key"]
    assert len(keys) == 2
    other = next(k["id"] for k in keys if not k["current"])
    assert scli("key", "remove", other[:8]).returncode == 0
    # retention and space
    assert scli("forget", b1.last("summary")["snapshot"]).returncode == 0
    r = scli("--json", "prune")
    assert r.returncode == 0, r.stderr
    # what prune kept is whole: every pack read and verified, the kept snapshot restored
    c = scli("--json", "check", "--read-data")
    assert c.returncode == 0 and c.last("check_summary")["errors"] == 0, c.stdout + c.stderr
    out = tmp_path / "after-prune"
    r = scli("--json", "restore", "latest", "--target", str(out), "--verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert manifest(out / "data") == manifest(src)
    assert scli("--json", "repair").returncode == 0
    assert scli("check", "--read-data").returncode == 0
    assert len(scli("--json", "snapshots").json) == 1
    assert pending_uploads(seaweed, bucket) == []


def test_volume_backup_and_restore(scli: Cli, tmp_path: Path) -> None:
    volume_round_trip(scli, tmp_path)


# --------------------------------------------------------------------------- faults

def _watch_packs(backend_url: str, stop: threading.Event, bad: list[str]) -> threading.Thread:
    """A reader that keeps listing data/ and reading every new pack whole: each must hash to
    its name (a pack is never visible in part)."""
    b = open_backend(backend_url)
    seen: set[str] = set()

    def run() -> None:
        while not stop.is_set():
            for o in b.list("data/"):
                if o.name in seen:
                    continue
                data = b.get(o.name)
                if blake3.blake3(data).hexdigest() != o.name.rsplit("/", 1)[-1] or len(data) != o.size:
                    bad.append(f"{o.name}: {len(data)} bytes do not hash to the name")
                seen.add(o.name)
            time.sleep(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _backup(url: str, src: Path, tmp_path: Path, *, init: bool = True, **kw: object) -> tuple[Repository, object]:
    b = open_backend(url)
    if init:
        repo = Repository.init(b, PASSWORD, scrypt=FAST_SCRYPT, pack_size=4 * MiB, cache_root=tmp_path / "cache",
                               **kw)  # type: ignore[arg-type]
    else:
        repo = Repository.open(b, lambda: PASSWORD, cache_root=tmp_path / "cache")
    return repo, run_backup(repo, BackupRequest(paths=[str(src)]))


def _verify(url: str, src: Path, tmp_path: Path, name: str = "out") -> None:
    from deltavault.restore.files import FileRestorer, RestoreOptions

    fresh = Repository.open(open_backend(url), lambda: PASSWORD, use_cache=False)
    snap = fresh.list_snapshots()[-1][1]
    assert snap.tree is not None
    FileRestorer(fresh, tmp_path / name, RestoreOptions(verify=True)).run(snap.tree)
    assert manifest(tmp_path / name / src.name) == manifest(src)
    assert not check_repository(fresh, read_data=True).errors


@pytest.mark.usefixtures("s3env")
def test_connections_dropped_mid_upload(s3proxy: Proxy, seaweed: Seaweed, bucket: str, tmp_path: Path) -> None:
    """Uploads cut half way (multipart parts and single PUTs): retried, the backup completes,
    no pack is ever visible in part, and no incomplete upload is left behind."""
    src = tmp_path / "data"
    write_tree(src, n=8, size=3 * MiB)
    url = s3proxy.url(bucket, "r")
    stop, bad = threading.Event(), []
    watcher = _watch_packs(seaweed.url(bucket, "r"), stop, bad)
    s3proxy.faults.drop, s3proxy.faults.min_body = 4, 1 * MiB
    try:
        _repo, res = _backup(url, src, tmp_path)
    finally:
        stop.set()
        watcher.join()
    assert s3proxy.snapshot().dropped == 4
    assert not getattr(res, "problems")  # noqa: B009
    assert bad == []
    _verify(url, src, tmp_path)
    assert pending_uploads(seaweed, bucket) == []


@pytest.mark.usefixtures("s3env")
@pytest.mark.parametrize("how", ["put", "put_file"])
def test_multipart_uploads_cut_mid_part(s3proxy: Proxy, seaweed: Seaweed, bucket: str, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """A 40 MiB object goes up in 5 parts of 8 MiB, 4 at a time; parts cut half way make the
    whole put retry, and the failed upload is aborted: one object, never a partial one. From
    a file (put_file), each part reads its range of the file, again from its start on retry."""
    monkeypatch.setenv("DELTAVAULT_S3_MULTIPART_THRESHOLD", str(16 * MiB))
    monkeypatch.setenv("DELTAVAULT_S3_PART_SIZE", str(8 * MiB))
    b = open_backend(s3proxy.url(bucket, "mp"))
    data = os.urandom(40 * MiB)
    s3proxy.faults.drop, s3proxy.faults.min_body = 3, 4 * MiB
    if how == "put":
        b.put("data/aa/big", data)
    else:
        spool = tmp_path / "spool"
        spool.write_bytes(data + b"beyond the object")
        with open(spool, "rb") as f:
            put_file(b, "data/aa/big", f.fileno(), len(data))
    assert s3proxy.snapshot().dropped == 3
    assert b.get("data/aa/big") == data and b.stat("data/aa/big").size == len(data)
    calls = s3proxy.snapshot().by_method
    assert calls["POST"] >= 3 and calls["DELETE"] >= 1  # created twice, the failed upload aborted
    assert pending_uploads(seaweed, bucket) == []


@pytest.mark.usefixtures("s3env")
def test_503_storm_is_ridden_out(s3proxy: Proxy, bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "data"
    write_tree(src)
    url = s3proxy.url(bucket, "r")
    s3proxy.faults.status = 5  # five SlowDowns in a row: within the retries
    _repo, res = _backup(url, src, tmp_path)
    assert s3proxy.snapshot().refused == 5
    assert not getattr(res, "problems")  # noqa: B009
    _verify(url, src, tmp_path)


def test_503_storm_longer_than_the_retries_fails_cleanly(scli: Cli, s3proxy: Proxy, tmp_path: Path) -> None:
    src = tmp_path / "data"
    write_tree(src)
    assert scli("init").returncode == 0
    assert scli("backup", str(src)).returncode == 0
    (src / "new").write_bytes(os.urandom(2 * MiB))
    s3proxy.faults.status, s3proxy.faults.methods = 10_000, ("PUT",)
    t0 = time.monotonic()
    r = scli("backup", str(src))
    took = time.monotonic() - t0
    s3proxy.faults.status = 0
    assert r.returncode == 15, r.stderr
    assert "throttling" in r.stderr and "SlowDown" in r.stderr
    assert 3 < took < 120  # backed off (about 13 s of jittered sleeps), then gave up
    c = scli("--json", "check", "--read-data")  # nothing half-written
    assert c.returncode == 0, c.stdout
    assert len(scli("--json", "snapshots").json) == 1
    r = scli("--json", "backup", str(src))
    assert r.returncode == 0, r.stderr
    assert scli("check", "--read-data").returncode == 0


def test_slow_server(scli: Cli, s3proxy: Proxy, tmp_path: Path) -> None:
    """Each response held 0.3 s: slow, but the run completes. Held past --s3-timeout: every
    attempt times out and the run fails with exit 15, leaving nothing half-written."""
    src = tmp_path / "data"
    write_tree(src, n=3)
    assert scli("init").returncode == 0
    s3proxy.faults.delay = 0.3
    r = scli("--json", "backup", str(src))
    assert r.returncode == 0, r.stderr
    s3proxy.faults.delay = 3.0
    (src / "new").write_bytes(os.urandom(MiB))
    r = scli("--s3-timeout", "1", "backup", str(src), timeout=300)
    assert r.returncode == 15, r.stderr
    assert "timed out" in r.stderr
    s3proxy.faults.delay = 0.0
    assert scli("check", "--read-data").returncode == 0
    assert len(scli("--json", "snapshots").json) == 1


# --------------------------------------------------------------------------- locks

@pytest.mark.usefixtures("s3env")
def test_lock_records_are_created_only_once(s3proxy: Proxy, seaweed: Seaweed, bucket: str) -> None:
    """Lock records go up with If-None-Match: *: a second writer of the same name is refused,
    while our own retried write (same bytes: the first reply was lost) counts as done."""
    from deltavault.errors import BackendError

    b = open_backend(seaweed.url(bucket, "locks"))
    b.put("locks/abc", b"mine")
    b.put("locks/abc", b"mine")  # a retry whose first attempt landed
    with pytest.raises(BackendError) as err:
        b.put("locks/abc", b"someone else's")
    assert not err.value.retryable and "already has this name" in err.value.message
    assert b.get("locks/abc") == b"mine"
    b.put("index/abc", b"1")
    b.put("index/abc", b"2")  # other names replace, as the contract asks
    assert b.get("index/abc") == b"2"


@pytest.mark.usefixtures("s3env")
def test_lock_records_on_a_store_without_conditional_writes(s3proxy: Proxy, bucket: str, tmp_path: Path) -> None:
    """The documented fallback: a store that answers 501 to If-None-Match gets plain PUTs of
    lock records from then on, and locking works as before."""
    from deltavault.backends.base import unwrap
    from deltavault.backends.s3 import S3Backend

    s3proxy.faults.unsupported_header = "if-none-match"
    b = open_backend(s3proxy.url(bucket, "nocond"))
    repo = Repository.init(b, PASSWORD, scrypt=FAST_SCRYPT, cache_root=tmp_path / "cache")
    with repo.lock(exclusive=True, command="test"):
        assert [o.name for o in b.list("locks/")] and len(list(b.list("locks/"))) == 1
    inner = unwrap(b)
    assert isinstance(inner, S3Backend) and inner._conditional is False  # it met the 501
    assert list(b.list("locks/")) == []


def test_locks_between_processes(scli: Cli, seaweed: Seaweed, tmp_path: Path) -> None:
    """An exclusive lock held by a live process blocks a backup (exit 12); a lock left by a
    killed process of this host is stale at once and removed; concurrent backups share."""
    src = tmp_path / "data"
    write_tree(src, n=2)
    assert scli("init").returncode == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time\n"
            "from deltavault.backends import open_backend\n"
            "from deltavault.repository.repository import Repository\n"
            f"r = Repository.open(open_backend({scli.env['DELTAVAULT_REPOSITORY']!r}), lambda: {PASSWORD!r},"
            " use_cache=False)\n"
            "lk = r.lock(exclusive=True, command='test holder')\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n")],
        env=scli.env, stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    r = scli("backup", str(src))
    assert r.returncode == 11, r.stderr
    assert "locked exclusively" in r.stderr and "test holder" in r.stderr
    holder.kill()
    holder.wait()
    r = scli("backup", str(src))  # the dead holder's lock is stale: removed, the run goes on
    assert r.returncode == 0, r.stderr
    runs = [subprocess.Popen([sys.executable, "-m", "deltavault", "backup", str(src)], env=scli.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in runs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert len(scli("--json", "snapshots").json) == 3
    assert scli("check", "--read-data").returncode == 0
