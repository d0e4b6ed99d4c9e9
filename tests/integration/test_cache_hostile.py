"""The local cache cannot inject content (issue #12, point 5): its catalog rows are
authenticated. The cache's permissions (umask 000, another user, symlinks) are in
test_cache_permissions.py.

Each attack is run for real: the catalog is rewritten with sqlite3 as an attacker with
write access to it would. Without the defences, the tampered-row tests restore the
attacker's bytes while ``restore --verify`` and ``check --read-data`` succeed.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

import msgspec
import pytest

from deltavault.chunking.pages import DIGEST
from deltavault.model.nodes import Tree
from tests.conftest import Cli, CliResult


def _catalog(cli: Cli) -> Path:
    [path] = cli.cache.rglob("catalog.sqlite")
    return path


def _catalog_notes(r: CliResult) -> list[str]:
    return ([p["message"] for p in r.last("summary")["problems"] if p["kind"] == "catalog"]
            + [w["message"] for w in r.json if w.get("type") == "warning" and "cache directory" in w["message"]])


def _backup(cli: Cli, src: Path, *args: str) -> CliResult:
    r = cli("--json", "backup", *args, str(src))
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _restored(cli: Cli, tmp_path: Path, name: str) -> Path:
    """Restore latest with --verify, run check --read-data; both must pass."""
    out = tmp_path / name
    r = cli("restore", "latest", "--verify", "--target", str(out))
    assert r.returncode == 0 and "all match" in r.stdout, r.stdout + r.stderr
    c = cli("check", "--read-data")
    assert c.returncode == 0, c.stdout + c.stderr
    return out / "src"


def _swap_content(catalog: Path, dirpath: bytes, victim: bytes, donor: bytes) -> None:
    """The attack: the catalog row of ``dirpath`` now says that ``victim`` (unchanged on
    disk) holds ``donor``'s content blobs."""
    db = sqlite3.connect(catalog)
    try:
        ((sid, raw),) = db.execute("SELECT source_id, tree FROM dirs WHERE path=?", (dirpath,)).fetchall()
        tree = msgspec.msgpack.decode(raw, type=Tree)
        by_name = {n.name: n for n in tree.nodes}
        nodes = [msgspec.structs.replace(n, content=by_name[donor].content) if n.name == victim else n
                 for n in tree.nodes]
        db.execute("UPDATE dirs SET tree=? WHERE source_id=? AND path=?",
                   (msgspec.msgpack.encode(Tree(nodes)), sid, dirpath))
        db.commit()
    finally:
        db.close()


def _settled_source(tmp_path: Path, files: dict[str, bytes]) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    time.sleep(2.1)  # out of the racy window: the next run trusts the stat data
    return src


# ---------------------------------------------------------------- authenticated rows

def test_tampered_directory_row_is_refused_and_the_file_read_again(tmp_path: Path, cli: Cli) -> None:
    real, other = os.urandom(200_000), os.urandom(200_000)
    assert cli("init").returncode == 0
    src = _settled_source(tmp_path, {"a": real, "b": other})
    _backup(cli, src)
    _swap_content(_catalog(cli), b"src", b"a", b"b")
    (src / "c").write_bytes(b"new")  # a change in the directory: its tree is written again
    r = _backup(cli, src)
    out = _restored(cli, tmp_path, "out")
    assert (out / "a").read_bytes() == real and (out / "b").read_bytes() == other
    s = r.last("summary")
    assert _catalog_notes(r) == ["entries of the local catalog failed verification (1 directory): something "
                                 "other than deltavault changed it. They were not used (the files in those "
                                 "directories were read again) and were removed from it"], s["problems"]
    assert s["change_source"] == "catalog" and s["bytes_read"] >= len(real) + len(other), s
    # the commit wrote a correct row: the next run trusts it again
    again = _backup(cli, src).last("summary")
    assert again["problems"] == [] and again["change_source"] == "catalog", again
    assert again["files_unmodified"] >= 2, again  # a and b (c is still in the racy window)


def test_text_output_shows_the_warning(tmp_path: Path, cli: Cli) -> None:
    assert cli("init").returncode == 0
    src = _settled_source(tmp_path, {"a": os.urandom(50_000), "b": os.urandom(50_000)})
    _backup(cli, src)
    _swap_content(_catalog(cli), b"src", b"a", b"b")
    r = cli("backup", str(src))
    assert r.returncode == 0, r.stderr
    assert "warning:    entries of the local catalog failed verification (1 directory)" in r.stdout, r.stdout


@pytest.mark.parametrize("column, value", [
    ("index_files", "index_files || ' index/' || hex(randomblob(32))"),  # makes blobs_trusted
    ("run_start_ns", "run_start_ns + 3600000000000"),  # moves the racy window an hour on
    ("snapshot", "'0000'"),
])
def test_tampered_source_row_is_refused(tmp_path: Path, cli: Cli, column: str, value: str) -> None:
    assert cli("init").returncode == 0
    src = _settled_source(tmp_path, {"a": os.urandom(10_000)})
    _backup(cli, src)
    db = sqlite3.connect(_catalog(cli))
    with db:
        assert db.execute(f"UPDATE sources SET {column} = {value}").rowcount == 1
    db.close()
    r = _backup(cli, src)
    s = r.last("summary")
    assert s["change_source"] == "parent-trees", s  # the catalog's word on the source is not taken
    assert _catalog_notes(r) == ["entries of the local catalog failed verification (1 source record): something "
                                 "other than deltavault changed it. They were not used (this run compared with "
                                 "the previous snapshot's trees instead) and were removed from it"]
    assert _backup(cli, src).last("summary")["change_source"] == "catalog"  # rewritten by the commit


def test_tampered_page_digests_are_refused(tmp_path: Path, cli: Cli) -> None:
    """Page 5 of a large file is rewritten with page 100's bytes, and the catalog's digest of
    page 5 set to page 100's: trusted, the delta read would think page 5 unchanged and keep
    its old bytes in the snapshot."""
    page = 4096
    data = bytearray(os.urandom(4 << 20))
    assert cli("init").returncode == 0
    src = _settled_source(tmp_path, {"big": bytes(data)})
    _backup(cli, src, "--delta-threshold", "1M")
    db = sqlite3.connect(_catalog(cli))
    with db:
        ((bid, dig),) = db.execute("SELECT id, data FROM blobs").fetchall()
        dig = bytearray(dig)
        dig[5 * DIGEST:6 * DIGEST] = dig[100 * DIGEST:101 * DIGEST]
        db.execute("UPDATE blobs SET data=? WHERE id=?", (bytes(dig), bid))
    db.close()
    data[5 * page:6 * page] = data[100 * page:101 * page]
    with open(src / "big", "r+b") as f:
        f.seek(5 * page)
        f.write(data[5 * page:6 * page])
    r = _backup(cli, src, "--delta-threshold", "1M")
    assert (_restored(cli, tmp_path, "out") / "big").read_bytes() == bytes(data)
    assert _catalog_notes(r) == ["entries of the local catalog failed verification (1 page-digest block): "
                                 "something other than deltavault changed it. They were not used (the files they "
                                 "belong to were read in full) and were removed from it"]


def test_an_older_genuine_catalog_copied_back_changes_nothing(tmp_path: Path, cli: Cli) -> None:
    """Replay: the rows authenticate, but a file changed since no longer matches them."""
    assert cli("init").returncode == 0
    src = _settled_source(tmp_path, {"a": b"first version", "b": b"stays"})
    _backup(cli, src)
    cat = _catalog(cli)
    old = tmp_path / "old.sqlite"
    shutil.copyfile(cat, old)
    (src / "a").write_bytes(b"second version")
    time.sleep(2.1)
    _backup(cli, src)
    shutil.copyfile(old, cat)
    r = _backup(cli, src)
    s = r.last("summary")
    assert s["problems"] == [] and (s["files_changed"], s["files_unmodified"]) == (1, 1), s
    assert (_restored(cli, tmp_path, "out") / "a").read_bytes() == b"second version"
