"""find, dump and cat on a real repository, and their answers to bad input."""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import zipfile
from pathlib import Path

from tests.conftest import Cli
from tests.integration.dayone.conftest import raw


def _two_snapshots(tmp_path: Path, cli: Cli) -> Path:
    src = tmp_path / "data"
    (src / "etc").mkdir(parents=True)
    (src / "etc" / "app.conf").write_text("v1\n")
    (src / "readme.txt").write_text("read me\n")
    (src / "big.bin").write_bytes(os.urandom(3_000_000))
    (src / "link").symlink_to("readme.txt")
    os.link(src / "readme.txt", src / "hard")
    assert cli("init").returncode == 0
    assert cli("backup", str(src), "--tag", "first").returncode == 0
    time.sleep(0.01)
    (src / "etc" / "app.conf").write_text("v2, longer\n")
    (src / "etc" / "new.conf").write_text("new\n")
    assert cli("backup", str(src)).returncode == 0
    return src


def test_find_names_snapshots_paths_sizes_and_times(tmp_path: Path, cli: Cli) -> None:
    src = _two_snapshots(tmp_path, cli)
    snaps = [s["id"] for s in cli("--json", "snapshots").json]
    r = cli("--json", "find", "*.conf")
    assert r.returncode == 0, r.stderr
    got = [(m["snapshot"], m["path"], m["size"]) for m in r.json if m["type"] == "match"]
    assert got == [(snaps[0], "data/etc/app.conf", 3), (snaps[1], "data/etc/app.conf", 11),
                   (snaps[1], "data/etc/new.conf", 4)]
    assert all(m["mtime_ns"] > 0 and m["time"] for m in r.json if m["type"] == "match")
    assert r.last("find_summary") == {"type": "find_summary", "matches": 3, "snapshots_matching": 2,
                                      "snapshots_searched": 2}
    # an original path, a path inside the snapshot, ignoring case, and the filters
    assert len([m for m in cli("--json", "find", f"{src}/etc/new.conf").json if m["type"] == "match"]) == 1
    assert len([m for m in cli("--json", "find", "/data/README.TXT", "-i").json if m["type"] == "match"]) == 2
    tagged = cli("--json", "find", "app.conf", "--tag", "first").json
    assert [m["snapshot"] for m in tagged if m["type"] == "match"] == [snaps[0]]
    one = cli("--json", "find", "etc", "-s", snaps[1][:8]).json
    assert [m["path"] for m in one if m["type"] == "match"] == ["data/etc"]
    text = cli("-q", "find", "new.conf")  # quiet drops progress, not results
    assert f"snapshot {snaps[1][:8]}" in text.stdout and "data/etc/new.conf" in text.stdout


def test_find_bad_input(tmp_path: Path, cli: Cli) -> None:
    _two_snapshots(tmp_path, cli)
    r = cli("find", "nothing-like-this")
    assert r.returncode == 0 and "nothing matches 'nothing-like-this' in 2 snapshot(s)" in r.stdout
    r = cli("find", "x", "-s", "deadbeef")
    assert r.returncode == 2 and "no snapshot matches 'deadbeef'" in r.stderr
    r = cli("find", "a/../b")
    assert r.returncode == 2 and "'..' is not allowed" in r.stderr


def test_dump_a_file_a_directory_as_tar_and_zip(tmp_path: Path, cli: Cli) -> None:
    src = _two_snapshots(tmp_path, cli)
    r = raw(cli, "dump", "latest", "data/big.bin")
    assert r.returncode == 0 and r.stdout == (src / "big.bin").read_bytes()
    assert raw(cli, "dump", "latest", f"{src}/etc/app.conf").stdout == b"v2, longer\n"
    with tarfile.open(fileobj=io.BytesIO(raw(cli, "dump", "latest", "data").stdout)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"data", "data/etc", "data/etc/app.conf", "data/etc/new.conf", "data/readme.txt",
                                "data/big.bin", "data/link", "data/hard"}
        assert members["data/link"].issym() and members["data/link"].linkname == "readme.txt"
        hard = members["data/hard"] if members["data/hard"].islnk() else members["data/readme.txt"]
        assert hard.islnk()
        f = tar.extractfile("data/big.bin")
        assert f is not None and f.read() == (src / "big.bin").read_bytes()
    # everything, as zip, to a file
    out = tmp_path / "all.zip"
    r = cli("--json", "dump", "latest", "/", "--archive", "zip", "--target", str(out))
    assert r.returncode == 0 and r.last("dump")["entries"] == 7  # no symlink in a zip
    one = cli("--json", "dump", "latest", "data/readme.txt", "--target", str(tmp_path / "readme"))
    assert one.last("dump")["bytes"] == len("read me\n") and (tmp_path / "readme").read_text() == "read me\n"
    with zipfile.ZipFile(out) as z:
        assert z.read("data/etc/app.conf") == b"v2, longer\n"
        assert "data/etc/" in z.namelist()


def test_dump_bad_input(tmp_path: Path, cli: Cli) -> None:
    _two_snapshots(tmp_path, cli)
    r = cli("dump", "latest", "data/nope")
    assert r.returncode == 2 and "'data/nope' is not in snapshot" in r.stderr
    r = cli("dump", "cafebabe", "data/readme.txt")
    assert r.returncode == 2 and "no snapshot matches 'cafebabe'" in r.stderr
    r = cli("dump", "latest", "data/link")
    assert r.returncode == 2 and "is a symlink" in r.stderr
    r = cli("dump", "latest", "data", "--target", str(tmp_path / "no" / "such" / "dir" / "x.tar"))
    assert r.returncode == 17 and "cannot write" in r.stderr


def test_cat_shows_each_kind_of_object(tmp_path: Path, cli: Cli) -> None:
    _two_snapshots(tmp_path, cli)
    cfg = json.loads(cli("cat", "config").stdout)
    assert cfg["format"] == "deltavault" and cfg["encryption"] == "aes-256-gcm+scrypt"
    snap = json.loads(cli("cat", "snapshot", "latest").stdout)
    assert snap["paths"] and len(snap["tree"]) == 64
    tree = json.loads(cli("cat", "tree", "latest:data/etc").stdout)
    node = next(n for n in tree["nodes"] if n["name"] == "new.conf")
    blob_id = node["content"][0][1]
    assert raw(cli, "cat", "blob", blob_id).stdout == b"new\n"
    assert raw(cli, "cat", "blob", blob_id[:12]).stdout == b"new\n"
    assert json.loads(cli("cat", "tree", tree["id"]).stdout) == tree
    index_id = next(iter(os.listdir(cli.repo / "index")))
    idx = json.loads(cli("cat", "index", index_id[:10]).stdout)
    assert idx["id"] == index_id and idx["packs"]
    pack = idx["packs"][0]["id"]
    assert raw(cli, "cat", "pack", pack).stdout == (cli.repo / "data" / pack[:2] / pack).read_bytes()
    key = next(iter(os.listdir(cli.repo / "keys")))
    assert json.loads(cli("cat", "key", key[:8]).stdout)["kdf"] == "scrypt"
    assert json.loads(cli("--json", "cat", "config").stdout.strip())["format"] == "deltavault"


def test_cat_bad_input(tmp_path: Path, cli: Cli) -> None:
    _two_snapshots(tmp_path, cli)
    for args, msg in ((["cat", "snapshot"], "cat snapshot needs an id"),
                      (["cat", "snapshot", "ffffffff"], "no snapshot matches"),
                      (["cat", "blob", "zz"], "not a blob id"),
                      (["cat", "blob", "00" * 32], "no blob"),
                      (["cat", "tree", "latest:data/nope"], "is not a directory"),
                      (["cat", "lock", "ab"], "no lock matches")):
        r = cli(*args)
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
    assert cli("cat", "frobs").returncode == 2  # not a kind: argparse says which are
    # cat lock takes no lock of its own: no one-digit prefix matches anything here (once a
    # cat's own lock matched "ab" and printed it with exit 0).
    for digit in "0123456789abcdef":
        r = cli("cat", "lock", digit)
        assert r.returncode == 2 and "no lock matches" in r.stderr, (digit, r.stdout)
