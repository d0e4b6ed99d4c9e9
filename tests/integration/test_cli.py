"""The real deltavault command: outputs, JSON, exit codes, progress on a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import Cli, init_and_back_up, on_a_terminal
from tests.treeutil import manifest


def _tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n" * 100)
    (root / "sub" / "b.bin").write_bytes(os.urandom(300_000))
    (root / "sub" / "c").symlink_to("../a.txt")
    return root


def test_full_cycle_with_json(tmp_path: Path, cli: Cli) -> None:
    src = _tree(tmp_path / "data")
    r = cli("--json", "init")
    assert r.returncode == 0 and r.last("init")["encryption"] == "aes-256-gcm+scrypt"
    time.sleep(2.1)  # past the racy window, so the second run can skip unchanged files
    b1 = cli("--json", "backup", str(src))
    assert b1.returncode == 0, b1.stderr
    s1 = b1.last("summary")
    assert s1["files_new"] == 2 and s1["change_source"] == "none"
    v1 = manifest(src)
    (src / "a.txt").write_text("changed\n")
    b2 = cli("--json", "backup", str(src))
    s2 = b2.last("summary")
    assert (s2["files_changed"], s2["files_unmodified"]) == (1, 1), s2
    assert s2["bytes_read"] == len("changed\n") and s2["change_source"] == "catalog"
    assert s2["bytes_downloaded"] < 4096  # config and key file only
    snaps = cli("--json", "snapshots").json
    assert [s["id"] for s in snaps] == [s1["snapshot"], s2["snapshot"]]
    assert snaps[1]["parent"] == s1["snapshot"]
    ls = cli("--json", "ls", s1["snapshot"][:8])
    assert sorted(o["path"] for o in ls.json) == ["data", "data/a.txt", "data/sub", "data/sub/b.bin", "data/sub/c"]
    d = cli("--json", "diff", s1["snapshot"][:8], "latest")
    assert [(o["kind"], o["path"]) for o in d.json if o["type"] == "change"] == [("M", "data/a.txt")]
    for n, (sid, want) in enumerate(((s1["snapshot"], v1), ("latest", manifest(src)))):
        out = tmp_path / f"out{n}"
        rr = cli("--json", "restore", sid, "--target", str(out), "--verify")
        assert rr.returncode == 0, rr.stdout + rr.stderr
        assert rr.last("summary")["errors"] == 0
        assert manifest(out / "data") == want
    c = cli("--json", "check", "--read-data")
    assert c.returncode == 0 and c.last("check_summary")["errors"] == 0
    st = cli("--json", "stats")
    assert st.returncode == 0 and st.last("stats")["snapshots"] == 2


def test_text_output_and_long_listing(tmp_path: Path, cli: Cli) -> None:
    src = _tree(tmp_path / "data")
    cli("init")
    b = cli("backup", str(src))
    assert b.returncode == 0 and "snapshot" in b.stdout and "added:" in b.stdout
    ls = cli("ls", "-l", "latest", "data/sub")
    assert "data/sub/c -> ../a.txt" in ls.stdout and "-rw" in ls.stdout
    assert "snapshot(s)" in cli("snapshots").stdout


def test_exit_codes(tmp_path: Path, cli: Cli) -> None:
    src = _tree(tmp_path / "data")
    assert cli("snapshots").returncode == 10  # no repository yet
    assert cli("backup").returncode == 2  # usage
    assert cli("init").returncode == 0
    assert cli("init").returncode == 1  # already exists
    assert cli("snapshots", env={"DELTAVAULT_PASSWORD": "nope"}).returncode == 12
    assert cli("restore", "deadbeef", "--target", str(tmp_path / "x")).returncode == 2
    assert cli("backup", str(tmp_path / "does-not-exist")).returncode == 2
    assert cli("backup", str(src)).returncode == 0
    # corruption: flip a byte in a pack
    pack = next(p for p in (cli.repo / "data").rglob("*") if p.is_file())
    raw = bytearray(pack.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    pack.write_bytes(bytes(raw))
    c = cli("--json", "check", "--read-data")
    assert c.returncode == 13
    assert c.last("check_summary")["errors"] >= 1


def test_locked_repository_exit_code(tmp_path: Path, cli: Cli) -> None:
    src = _tree(tmp_path / "data")
    cli("init")
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from deltavault.backends.local import LocalBackend
from deltavault.repository.repository import Repository
repo = Repository.open(LocalBackend({str(cli.repo)!r}), lambda: open({str(cli.password_file)!r}, 'rb').read().strip(),
                       use_cache=False)
with repo.lock(exclusive=True, command="prune (test)"):
    print("locked", flush=True)
    time.sleep(60)
"""], stdout=subprocess.PIPE, text=True, env=cli.env)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        r = cli("--json", "backup", str(src))
        assert r.returncode == 11, r.stdout + r.stderr
        msg = r.last("error")["message"]
        assert "locked exclusively" in msg and "prune (test)" in msg
        assert r.last("error")["retryable"] is True
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its stale lock on this host is cleared at once
    assert cli("backup", str(src)).returncode == 0


def test_progress_bar_on_a_terminal(tmp_path: Path, cli: Cli) -> None:
    src = tmp_path / "data"
    src.mkdir()
    for i in range(40):
        (src / f"f{i}").write_bytes(os.urandom(2 << 20))
    cli("init")
    rc, text = on_a_terminal(cli, "backup", str(src))
    assert rc == 0, text
    assert "backup" in text and "MiB" in text  # a live rich bar
    assert "snapshot" in text


def test_key_add_remove_and_passwd(tmp_path: Path, cli: Cli) -> None:
    src = tmp_path / "src"
    init_and_back_up(cli, src, {"f": os.urandom(50_000)})
    second = tmp_path / "second"
    second.write_text("a second password\n")
    as_second = {"DELTAVAULT_PASSWORD_FILE": str(second)}
    r = cli("--json", "key", "add", "--new-password-file", str(second))
    assert r.returncode == 0, r.stderr
    added = r.last("key_added")["id"]
    keys = [k for k in cli("--json", "key", "list").json if k["type"] == "key"]
    assert len(keys) == 2 and [k["id"] for k in keys if not k["current"]] == [added]
    first = next(k["id"] for k in keys if k["current"])
    assert cli("snapshots", env=as_second).returncode == 0  # both passwords open it
    # the key in use cannot remove itself; the other password can remove it
    r = cli("key", "remove", first[:8])
    assert r.returncode == 2 and "opened the repository with" in r.stderr
    assert cli("key", "remove", first[:8], env=as_second).returncode == 0
    assert cli("snapshots").returncode == 12  # the first password is gone
    # passwd: the new password replaces the one in use, nothing else changes
    third = tmp_path / "third"
    third.write_text("third\n")
    r = cli("--json", "key", "passwd", "--new-password-file", str(third), env=as_second)
    assert r.returncode == 0, r.stderr
    assert cli("snapshots", env=as_second).returncode == 12
    as_third = {"DELTAVAULT_PASSWORD_FILE": str(third)}
    out = tmp_path / "out"
    assert cli("restore", "latest", "--target", str(out), env=as_third).returncode == 0
    assert manifest(out / "src") == manifest(src)
    assert len(list((cli.repo / "keys").iterdir())) == 1
    assert cli("check", "--read-data", env=as_third).returncode == 0
    # bad requests are usage errors and change nothing
    for args in (["key", "remove"], ["key", "remove", "ffffffff"], ["key", "list", "extra"],
                 ["key", "add"]):
        r = cli(*args, env=as_third, input="")
        assert r.returncode == 2, (args, r.stderr)
    assert len(list((cli.repo / "keys").iterdir())) == 1


def test_key_commands_on_an_unencrypted_repository(tmp_path: Path, cli: Cli) -> None:
    cli.options = ("--insecure-no-encryption",)
    assert cli("init").returncode == 0
    r = cli("key", "list")
    assert r.returncode == 2 and "not encrypted" in r.stderr


def test_buffer_memory_bounds_what_is_in_flight_and_is_checked(tmp_path: Path, cli: Cli) -> None:
    """--buffer-memory (or DELTAVAULT_BUFFER_MEMORY) at its smallest still stores files and
    a volume exactly; a value below it, or one that is not a size, is a usage error."""
    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(3 << 20) + bytes(1 << 20) + os.urandom(5 << 20)  # several windows
    (src / "big").write_bytes(big)
    (src / "small").write_bytes(b"x" * 1000)
    img = tmp_path / "disk.img"
    img.write_bytes(os.urandom(6 << 20) + bytes(2 << 20) + os.urandom(9 << 20 | 12345))
    assert cli("init").returncode == 0
    r = cli("backup", "--buffer-memory", "4M", str(src))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    r = cli("restore", "latest", "--target", str(out), "--verify")
    assert r.returncode == 0, r.stdout + r.stderr
    assert manifest(out / "src") == manifest(src)
    r = cli("backup", "--volume", str(img), env={"DELTAVAULT_BUFFER_MEMORY": "4M"})
    assert r.returncode == 0, r.stderr
    r = cli("restore", "--volume", "latest", str(tmp_path / "restored.img"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "restored.img").read_bytes() == img.read_bytes()
    assert cli("check", "--read-data").returncode == 0
    assert cli("backup", "--buffer-memory", "1M", str(src)).returncode == 2
    assert cli("backup", str(src), env={"DELTAVAULT_BUFFER_MEMORY": "lots"}).returncode == 2
