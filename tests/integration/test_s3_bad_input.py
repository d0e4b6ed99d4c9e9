"""The S3 backend given bad input against a real SeaweedFS: wrong, refused or missing
credentials, a missing bucket or endpoint, a skewed clock, Object Lock missing, TLS with a
private CA, addressing options (split from test_s3.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from deltavault.errors import ExitCode
from tests.conftest import Cli
from tests.s3proxy import Proxy
from tests.seaweed import Seaweed


def _objects(seaweed: Seaweed, bucket: str) -> list[str]:
    return [o["Key"] for o in seaweed.client().list_objects_v2(Bucket=bucket).get("Contents", [])]


def test_wrong_credentials(scli: Cli, seaweed: Seaweed, bucket: str) -> None:
    bad = {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}
    r = scli("init", env=bad)
    assert r.returncode == ExitCode.ACCESS_REFUSED == 19, r.stderr
    assert "refused the credentials" in r.stderr and "SignatureDoesNotMatch" in r.stderr
    r = scli("init", env={"AWS_ACCESS_KEY_ID": "nobody"})
    assert r.returncode == 19 and "InvalidAccessKeyId" in r.stderr, r.stderr
    assert _objects(seaweed, bucket) == []  # nothing half-written
    assert scli("init").returncode == 0
    before = _objects(seaweed, bucket)
    r = scli("snapshots", env=bad)
    assert r.returncode == 19 and "refused the credentials" in r.stderr
    r = scli("--json", "snapshots", env=bad)
    assert r.returncode == 19 and r.last("error")["exit_code"] == 19 and not r.last("error")["retryable"]
    assert r.last("error")["error"] == "AccessRefused"
    assert _objects(seaweed, bucket) == before


def test_access_denied(scli: Cli, seaweed: Seaweed, bucket: str, tmp_path: Path) -> None:
    """Credentials the store accepts but that may only read: a backup is refused with
    AccessDenied, exit 19 (not 15, a failing store), at once and with nothing written."""
    from tests.seaweed import READER_KEY, READER_SECRET

    assert scli("init").returncode == 0
    before = _objects(seaweed, bucket)
    reader = seaweed.env(access=READER_KEY, secret=READER_SECRET)
    assert scli("--json", "snapshots", env=reader).returncode == 0  # reading is allowed
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f").write_bytes(b"data")
    r = scli("--json", "backup", str(tmp_path / "src"), env=reader)
    assert r.returncode == ExitCode.ACCESS_REFUSED, r.stdout + r.stderr
    err = r.last("error")
    assert err["error"] == "AccessRefused" and not err["retryable"] and "access denied" in err["message"]
    assert "AccessDenied" in err["message"]
    assert _objects(seaweed, bucket) == before


def test_no_credentials_at_all(scli: Cli) -> None:
    r = scli("init", env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""})
    assert r.returncode == 2, r.stderr
    assert "no S3 credentials" in r.stderr


def test_missing_bucket(scli: Cli, seaweed: Seaweed, s3proxy: Proxy) -> None:
    url = s3proxy.url(f"dv-missing-{os.getpid()}", "repo")
    for cmd in (["snapshots"], ["backup", "/etc/hostname"], ["check"]):
        r = scli(*cmd, env={"DELTAVAULT_REPOSITORY": url})
        assert r.returncode == 10, r.stderr
        assert "bucket does not exist" in r.stderr
    assert f"dv-missing-{os.getpid()}" not in [b["Name"] for b in seaweed.client().list_buckets()["Buckets"]]
    # init creates it
    r = scli("init", env={"DELTAVAULT_REPOSITORY": url})
    assert r.returncode == 0 and "created bucket" in r.stdout, r.stderr
    assert scli("snapshots", env={"DELTAVAULT_REPOSITORY": url}).returncode == 0


def test_no_such_endpoint(scli: Cli) -> None:
    from tests.seaweed import free_port

    url = f"s3:http://127.0.0.1:{free_port()}/bucket/repo"
    t0 = time.monotonic()
    r = scli("snapshots", env={"DELTAVAULT_REPOSITORY": url})
    assert r.returncode == ExitCode.UNREACHABLE == 20, r.stderr
    assert "cannot connect" in r.stderr and "Connection refused" in r.stderr
    assert time.monotonic() - t0 < 60
    r = scli("snapshots", env={"DELTAVAULT_REPOSITORY": "s3:http://nonexistent.invalid/bucket/repo"})
    assert r.returncode == 20 and "cannot connect" in r.stderr, r.stderr


def test_clock_skew(scli: Cli, seaweed: Seaweed, bucket: str) -> None:
    """This machine's clock two hours ahead (faketime, for the client only): the server refuses
    every request; a clear message, exit 21, and nothing written."""
    import shutil

    faketime = shutil.which("faketime")
    assert faketime, "needs faketime (scripts/install-system-deps.sh installs it)"
    p = subprocess.run([faketime, "-f", "+2h", sys.executable, "-m", "deltavault", "init"], env=scli.env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == ExitCode.CLOCK_SKEW == 21, p.stderr
    assert "clock is wrong" in p.stderr and "RequestTimeTooSkewed" in p.stderr
    assert _objects(seaweed, bucket) == []


def test_immutable_on_a_bucket_without_object_lock(scli: Cli, seaweed: Seaweed, bucket: str) -> None:
    r = scli("init", "--immutable", "7")
    assert r.returncode == 2, r.stderr
    assert "has no Object Lock" in r.stderr and "Nothing was written" in r.stderr
    assert _objects(seaweed, bucket) == []
    r = scli("init", "--immutable", "7", env={"DELTAVAULT_REPOSITORY": str(scli.repo)})
    assert r.returncode == 2 and "needs a repository on S3" in r.stderr


def test_tls_with_a_private_ca(scli: Cli, seaweed: Seaweed, bucket: str, tmp_path: Path) -> None:
    """The server's certificate is signed by a CA of the test's own: refused without
    --s3-ca-bundle (a clear message naming the option), accepted with it or its variable."""
    url = f"s3:https://127.0.0.1:{seaweed.https_port}/{bucket}/tls"
    r = scli("-r", url, "init")
    assert r.returncode == ExitCode.UNREACHABLE, r.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in r.stderr and "--s3-ca-bundle" in r.stderr
    assert _objects(seaweed, bucket) == []
    r = scli("-r", url, "--s3-ca-bundle", str(seaweed.ca_file), "init")
    assert r.returncode == 0, r.stderr
    r = scli("-r", url, "snapshots", env={"DELTAVAULT_S3_CA_BUNDLE": str(seaweed.ca_file)})
    assert r.returncode == 0, r.stderr
    r = scli("-r", url, "--s3-ca-bundle", str(tmp_path / "nope.pem"), "snapshots")
    assert r.returncode == 2 and "CA bundle" in r.stderr


def test_addressing_options(scli: Cli) -> None:
    assert scli("--s3-addressing", "path", "init").returncode == 0
    assert scli("--s3-addressing", "sideways", "snapshots").returncode == 2
    r = scli("snapshots", env={"DELTAVAULT_S3_ADDRESSING": "sideways"})
    assert r.returncode == 2 and "addressing" in r.stderr
