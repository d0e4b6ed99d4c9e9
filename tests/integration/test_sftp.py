"""The sftp backend against a real OpenSSH server that the tests start on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deltavault.backends import RetryingBackend, open_backend
from deltavault.backends.base import unwrap
from deltavault.backends.sftp import SFTPBackend
from deltavault.backends.ssh import SFTPLocation, parse_location
from deltavault.backup.files.run import BackupRequest, run_backup
from deltavault.errors import ExitCode, UsageError
from deltavault.maintenance.check import check_repository
from deltavault.repository.repository import Repository
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions
from deltavault.testing.faulty import Fault, FaultyBackend
from tests.conftest import FAST_SCRYPT, PASSWORD, Cli
from tests.loopdev import umount
from tests.remote_volume import volume_round_trip
from tests.sshd import Server, missing_tools, sshd
from tests.treeutil import manifest

pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")


@pytest.fixture
def scli(cli: Cli, server: Server, tmp_path: Path) -> Cli:
    cli.env.update(DELTAVAULT_REPOSITORY=server.url(tmp_path / "remote" / "repo"),
                   DELTAVAULT_SSH_CONFIG=str(server.ssh_config))
    return cli


def test_locations() -> None:
    assert parse_location("sftp://bob@host:2222/srv/backup/") == SFTPLocation("host", "/srv/backup", "bob", 2222)
    assert parse_location("sftp://host/~/backup") == SFTPLocation("host", "backup")
    assert parse_location("sftp://[::1]:22/r") == SFTPLocation("::1", "/r", None, 22)
    assert parse_location("sftp:bob@host:backup") == SFTPLocation("host", "backup", "bob")
    assert parse_location("sftp:host:/srv/r") == SFTPLocation("host", "/srv/r")
    assert str(parse_location("sftp:bob@host:backup")) == "sftp://bob@host/~/backup"
    for bad in ("sftp://host", "sftp://host/", "sftp:host", "sftp://host:x/r", "sftp://@/r"):
        with pytest.raises(UsageError):
            parse_location(bad)


def test_objects_land_under_their_names_with_fsync(server: Server, tmp_path: Path) -> None:
    """What the backend contract (test_backend_contract.py) cannot see from the outside: the
    server's folder holds exactly the objects once the temp names are renamed away, and the
    server's fsync@openssh.com is used."""
    b = open_backend(server.url(tmp_path / "r"))
    b.put("data/ab/ab01", os.urandom(1_000_000))
    b.put("index/i1", b"x")
    b.put("index/i1", b"yz")
    b.delete("index/i1")
    on_disk = sorted(str(p.relative_to(tmp_path / "r")) for p in (tmp_path / "r").rglob("*") if p.is_file())
    assert on_disk == ["data/ab/ab01"]
    inner = unwrap(b)
    assert isinstance(inner, SFTPBackend) and inner._fsync_ok  # OpenSSH offers fsync@openssh.com
    # ... and limits@openssh.com: requests of up to 255 KiB, not 32 KiB (fewer replies to handle)
    assert inner._sizes is not None and min(inner._sizes) > 128 * 1024


def test_temp_files_of_killed_puts_are_pruned(server: Server, tmp_path: Path) -> None:
    b = unwrap(open_backend(server.url(tmp_path / "r")))
    assert isinstance(b, SFTPBackend)
    b.put("data/00/keep", b"k")
    tmp = tmp_path / "r" / "data" / "00" / ".tmp-abc-123456"
    tmp.write_bytes(b"partial")
    assert [o.name for o in b.list("")] == ["data/00/keep"]  # never listed as an object
    assert b.remove_temp_files(3600) == (0, 0)  # too young: it may be a put in progress
    old = time.time() - 7200
    os.utime(tmp, (old, old))
    assert b.remove_temp_files(3600, dry_run=True) == (1, 7) and tmp.exists()
    assert b.remove_temp_files(3600) == (1, 7) and not tmp.exists()


def test_reconnects_after_the_connection_drops(server: Server, tmp_path: Path) -> None:
    b = open_backend(server.url(tmp_path / "r"))  # with the retry wrapper, as the CLI uses it
    b.put("a", b"1")
    server.kill_sessions()
    time.sleep(0.2)
    b.put("b", b"2")
    assert b.get("a") == b"1" and b.get("b") == b"2"


def test_cli_round_trip_and_incremental_downloads_nothing(scli: Cli, tmp_path: Path) -> None:
    src = tmp_path / "data"
    (src / "sub").mkdir(parents=True)
    (src / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024))
    (src / "sub" / "note.txt").write_text("first\n")
    (src / "link").symlink_to("sub/note.txt")
    assert scli("init").returncode == 0
    time.sleep(2.1)  # past the racy window, so the second run can skip unchanged files
    b1 = scli("--json", "backup", str(src))
    assert b1.returncode == 0, b1.stderr
    v1 = manifest(src)
    (src / "sub" / "note.txt").write_text("second\n")
    b2 = scli("--json", "backup", str(src))
    assert b2.returncode == 0, b2.stderr
    s2 = b2.last("summary")
    assert (s2["files_changed"], s2["files_unmodified"]) == (1, 1), s2
    # An incremental reads the config and key only: no pack, index or tree.
    assert s2["bytes_downloaded"] < 4096, s2
    for n, (sid, want) in enumerate(((b1.last("summary")["snapshot"], v1), ("latest", manifest(src)))):
        out = tmp_path / f"out{n}"
        r = scli("--json", "restore", sid, "--target", str(out), "--verify")
        assert r.returncode == 0, r.stdout + r.stderr
        assert manifest(out / "data") == want
    c = scli("--json", "check", "--read-data")
    assert c.returncode == 0 and c.last("check_summary")["errors"] == 0
    assert scli("forget", b1.last("summary")["snapshot"]).returncode == 0
    r = scli("prune")
    assert r.returncode == 0, r.stderr
    assert scli("check", "--read-data").returncode == 0
    assert len(scli("--json", "snapshots").json) == 1


def test_unknown_host_key_is_refused(scli: Cli, server: Server, tmp_path: Path) -> None:
    (server.dir / "known_hosts").write_text("")
    r = scli("init")
    assert r.returncode == 20, r.stderr
    assert "host key" in r.stderr and "not known" in r.stderr and "ssh-keyscan" in r.stderr
    assert not (tmp_path / "remote").exists()  # nothing written


def test_changed_host_key_is_refused(scli: Cli, server: Server, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kind, key = (other.with_suffix(".pub")).read_text().split()[:2]
    (server.dir / "known_hosts").write_text(f"[127.0.0.1]:{server.port} {kind} {key}\n")
    r = scli("init")
    assert r.returncode == 20, r.stderr
    assert "does not match known_hosts" in r.stderr
    assert not (tmp_path / "remote").exists()


def test_login_refused(scli: Cli, server: Server, tmp_path: Path) -> None:
    (server.dir / "authorized_keys").write_text("")
    r = scli("init")
    assert r.returncode == 19, r.stderr
    assert "ssh login" in r.stderr and "failed" in r.stderr
    assert not (tmp_path / "remote").exists()


def test_no_algorithm_in_common_is_exit_20_not_retried(cli: Cli, tmp_path: Path) -> None:
    """A server whose only key exchange paramiko does not implement (post-quantum here; an
    old server's would be the same): exit 20 at once, where it was 15 after every retry."""
    with sshd(tmp_path, "KexAlgorithms sntrup761x25519-sha512@openssh.com\n") as srv:
        cli.env.update(DELTAVAULT_REPOSITORY=srv.url(tmp_path / "remote" / "repo"),
                       DELTAVAULT_SSH_CONFIG=str(srv.ssh_config))
        r = cli("--json", "init")
    error = next(json.loads(x) for x in r.stdout.splitlines() if '"error"' in x)
    assert r.returncode == error["exit_code"] == 20 and not error["retryable"], (r.stdout, r.stderr)
    assert "have no algorithm in common" in error["message"] and "kex" in error["message"], error
    assert not (tmp_path / "remote").exists()


def test_permission_denied_on_the_server(scli: Cli, server: Server, tmp_path: Path) -> None:
    """The server refuses the writes (the repository's folders made immutable with chattr +i:
    the SFTP server answers PERMISSION_DENIED, as for a folder the login may not write): exit
    19, as S3's AccessDenied, not 15; at once, and nothing written. Refused where a folder is
    made (a first backup makes locks/) and where a file is made in one that exists."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"data")
    repo = tmp_path / "remote" / "repo"
    assert scli("init").returncode == 0
    for _ in range(2):
        before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
        dirs = [repo, *(p for p in repo.rglob("*") if p.is_dir())]
        subprocess.run(["chattr", "+i", *map(str, dirs)], check=True)
        try:
            r = scli("--json", "backup", str(src))
        finally:
            subprocess.run(["chattr", "-i", *map(str, dirs)], check=True)
        assert r.returncode == ExitCode.ACCESS_REFUSED, r.stdout + r.stderr
        err = r.last("error")
        assert err["error"] == "AccessRefused" and not err["retryable"] and "permission denied" in err["message"]
        assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before
        assert scli("backup", str(src)).returncode == 0
        (src / "f").write_bytes(b"changed")
    assert scli("check", "--read-data").returncode == 0


def test_missing_repository(scli: Cli) -> None:
    r = scli("snapshots")
    assert r.returncode == 10, r.stderr


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts a small tmpfs as the server's disk)")
def test_full_disk_on_the_server(scli: Cli, server: Server, tmp_path: Path) -> None:
    disk = tmp_path / "remote"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], check=True)
    try:
        src = tmp_path / "src"
        src.mkdir()
        (src / "small").write_bytes(b"small file\n")
        assert scli("init").returncode == 0
        assert scli("backup", str(src)).returncode == 0
        (src / "big").write_bytes(os.urandom(12 * 1024 * 1024))
        r = scli("backup", str(src))
        assert r.returncode == 14, r.stderr
        assert "no space left" in r.stderr
        (src / "big").unlink()
        assert scli("check", "--read-data").returncode == 0  # what was stored is intact
        assert len(scli("--json", "snapshots").json) == 1
    finally:
        umount(disk)


def test_backup_survives_dropped_connections(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "data"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(os.urandom(1_500_000))
    # Once a pack is stored, every SSH session is ended: the engine's next request meets a
    # dead connection, as on a network cut during a backup.
    def end_sessions(_name: str) -> None:
        server.kill_sessions()
        time.sleep(0.2)

    cut = Fault(ops=("put",), prefix="data/", when="after", times=2, action=end_sessions)
    faulty = FaultyBackend(unwrap(open_backend(server.url(tmp_path / "r"))), [cut])  # type: ignore[arg-type]
    repo = Repository.init(RetryingBackend(faulty, base_delay=0.05), PASSWORD, scrypt=FAST_SCRYPT,
                           pack_size=2 * 1024 * 1024, cache_root=tmp_path / "cache")
    res = run_backup(repo, BackupRequest(paths=[str(src)]))
    assert cut.fired == 2 and not res.problems
    fresh = Repository.open(open_backend(server.url(tmp_path / "r")), lambda: PASSWORD, use_cache=False)
    assert res.snapshot.tree is not None
    FileRestorer(fresh, tmp_path / "out", RestoreOptions(verify=True)).run(res.snapshot.tree)
    assert manifest(tmp_path / "out" / "data") == manifest(src)
    assert not check_repository(fresh, read_data=True).errors


def test_server_gone_is_exit_20_after_retries(scli: Cli, server: Server) -> None:
    assert scli("init").returncode == 0
    server.proc.terminate()
    server.proc.wait()
    server.kill_sessions()
    r = scli("snapshots")
    assert r.returncode == 20, r.stderr
    assert "cannot connect" in r.stderr and "Connection refused" in r.stderr


def test_proxyjump_and_proxycommand_from_the_ssh_config(server: Server, tmp_path: Path) -> None:
    """A bastion in ~/.ssh/config: ProxyJump (ssh -W through the jump host, here the same
    sshd forwarding to itself) and ProxyCommand."""
    marker = tmp_path / "proxy-used"
    host = (f"  HostName 127.0.0.1\n  Port {server.port}\n  User {server.user}\n"
            f"  IdentityFile {server.dir}/client_key\n  UserKnownHostsFile {server.dir}/known_hosts\n")
    with open(server.ssh_config, "a") as f:
        f.write(f"Host dvjump\n{host}  ProxyJump dvtest\n")
        f.write(f"Host dvcmd\n{host}  ProxyCommand sh -c 'touch {marker}; exec ssh -F {server.ssh_config} -W %h:%p dvtest'\n")
    jump = SFTPBackend(parse_location(f"sftp://dvjump{tmp_path}/r"))
    assert jump.ssh.settings()["proxy"] == (f"ssh -o BatchMode=yes -F {server.ssh_config} "
                                         f"-W 127.0.0.1:{server.port} dvtest")
    jump.put("index/a", b"via the jump host")
    cmd = SFTPBackend(parse_location(f"sftp://dvcmd{tmp_path}/r"))
    assert cmd.get("index/a") == b"via the jump host" and marker.exists()
    jump.close()
    cmd.close()


def test_paramiko_runs_without_invoke_and_match_exec_still_works(server: Server, tmp_path: Path) -> None:
    """paramiko is imported without invoke (7 MiB of memory in every sftp run, issue #18),
    and a config whose host settings come from a ``Match exec`` block still connects: invoke
    is brought in for it. Fresh interpreters, so earlier imports do not count."""
    script = ("import sys\nfrom deltavault.backends import open_backend\n"
              "b = open_backend(sys.argv[1])\nb.put('index/a', b'x')\nassert b.get('index/a') == b'x'\n"
              "print('invoke' in sys.modules)\n")
    env = {**os.environ, "DELTAVAULT_SSH_CONFIG": str(server.ssh_config)}
    plain = subprocess.run([sys.executable, "-c", script, server.url(tmp_path / "r1")], env=env,
                           capture_output=True, text=True, check=True)
    assert plain.stdout.split() == ["False"]
    config = tmp_path / "match_exec_config"
    config.write_text(f"Match host dvexec exec \"test -d {tmp_path}\"\n  HostName 127.0.0.1\n  Port {server.port}\n"
                      f"  User {server.user}\n  IdentityFile {server.dir}/client_key\n"
                      f"  UserKnownHostsFile {server.dir}/known_hosts\n")
    matched = subprocess.run([sys.executable, "-c", script, f"sftp://dvexec{tmp_path}/r2"],
                             env={**env, "DELTAVAULT_SSH_CONFIG": str(config)}, capture_output=True, text=True)
    assert matched.returncode == 0, matched.stderr
    assert matched.stdout.split() == ["True"]


def test_volume_backup_and_restore_over_sftp(scli: Cli, tmp_path: Path) -> None:
    volume_round_trip(scli, tmp_path)
