"""The deltavault command on an ntfs-3g source: what the summary counts when only a stream
changed, and ls --long showing the owner SID, DOS attributes and streams."""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

from deltavault.fs.ntfs import ARCHIVE, HIDDEN
from tests.conftest import Cli, needs_root, needs_tools
from tests.integration.ntfs.ntfsutil import ntfs

pytestmark = [needs_root(), needs_tools("mkntfs", "ntfs-3g")]

BIG = 5 * 1024 * 1024


def test_changed_stream_summary_and_ls_long(tmp_path: Path, cli: Cli) -> None:
    assert cli("init").returncode == 0
    with ntfs(tmp_path, "src") as src:
        d = src / "data"
        d.mkdir()
        (d / "doc.txt").write_text("doc\n")
        (d / "doc.txt:big").write_bytes(os.urandom(BIG))
        (d / "other.bin").write_bytes(os.urandom(BIG))
        os.setxattr(d / "doc.txt", "system.ntfs_attrib", struct.pack("<I", HIDDEN | ARCHIVE))
        time.sleep(2.1)  # past the racy window: the next run trusts unchanged stat data
        b1 = cli("--json", "backup", str(d))
        assert b1.returncode == 0, b1.stderr
        (d / "doc.txt:small").write_bytes(b"0123456789")
        b2 = cli("--json", "backup", str(d))
        assert b2.returncode == 0, b2.stderr
    s1, s2 = b1.last("summary"), b2.last("summary")
    # doc.txt and its streams are read again (one mtime per file on NTFS); other.bin is not.
    assert (s2["files_changed"], s2["files_unmodified"]) == (1, 1), s2
    assert s2["bytes_read"] == len("doc\n") + BIG + 10, s2
    assert s1["bytes_read"] == len("doc\n") + 2 * BIG, s1
    ls = cli("ls", "-l", "latest", "data/doc.txt")
    line = ls.stdout.strip()
    assert "[S-1-5-" in line and ", HA, :big 5242880, :small 10]" in line, line
    js = cli("--json", "ls", "latest", "data/doc.txt").json[0]["windows"]
    assert js["attributes"] == HIDDEN | ARCHIVE and js["owner_sid"].startswith("S-1-5-")
    assert [s["name"] for s in js["streams"]] == ["big", "small"]
    # Onto ext4: the NTFS metadata it cannot keep is one warning, counted; the restore is not partial.
    r = cli("--json", "restore", "latest", "--target", str(tmp_path / "out"))
    assert r.returncode == 0, r.stdout + r.stderr
    s = r.last("summary")
    assert s["errors"] == 0 and s["ntfs_not_kept"] > 0 and len(s["warnings"]) == 1, s
    assert "security descriptors" in s["warnings"][0]["message"]
    assert os.getxattr(tmp_path / "out" / "data" / "doc.txt", "user.small") == b"0123456789"
    text = cli("restore", "latest", "--target", str(tmp_path / "out2"))
    assert text.returncode == 0 and "warning: NTFS metadata not kept" in text.stdout, text.stdout + text.stderr


def test_removed_stream_is_seen_by_the_next_backup(tmp_path: Path, cli: Cli) -> None:
    """Removing a stream through ntfs-3g's windows interface moves none of its file's times
    (nor its size): the next backup still sees it gone (the stream names are asked for),
    and reads nothing again once nothing changed."""
    assert cli("init").returncode == 0
    with ntfs(tmp_path, "src") as src:
        d = src / "data"
        d.mkdir()
        f = d / "doc.txt"
        f.write_text("doc\n")
        Path(f"{f}:s").write_bytes(b"stream")
        Path(f"{f}:t").write_bytes(b"kept")
        time.sleep(2.1)  # past the racy window
        assert cli("--json", "backup", str(d)).returncode == 0
        before = f.stat()
        os.unlink(f"{f}:s")
        after = f.stat()
        assert (after.st_mtime_ns, after.st_ctime_ns, after.st_size) == (
            before.st_mtime_ns, before.st_ctime_ns, before.st_size)
        b2 = cli("--json", "backup", str(d))
        assert b2.returncode == 0, b2.stderr
        assert b2.last("summary")["files_changed"] == 1, b2.last("summary")
        streams = cli("--json", "ls", "latest", "data/doc.txt").json[0]["windows"]["streams"]
        assert [(s["name"], s["size"]) for s in streams] == [("t", 4)], streams
        time.sleep(2.1)
        b3 = cli("--json", "backup", str(d))
        s3 = b3.last("summary")
        assert (s3["files_unmodified"], s3["bytes_read"]) == (1, 0), s3
