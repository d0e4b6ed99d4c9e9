"""backup runs as a switching user expects them: --dry-run, --list, --skip-if-unchanged,
--stdin and --stdin-from-command, and summaries that say what the stored snapshot says."""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime
from pathlib import Path

from tests.conftest import Cli


def _state(repo: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(repo)), p.stat().st_size) for p in repo.rglob("*") if p.is_file())


def _src(tmp_path: Path) -> Path:
    src = tmp_path / "data"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n" * 100)
    (src / "sub" / "b.txt").write_text("beta\n" * 100)
    return src


def test_dry_run_writes_nothing_and_says_what_it_would_add(tmp_path: Path, cli: Cli) -> None:
    src = _src(tmp_path)
    assert cli("init").returncode == 0
    before = _state(cli.repo)
    r = cli("--json", "backup", "--dry-run", str(src))
    assert r.returncode == 0, r.stderr
    s = r.last("summary")
    assert s["dry_run"] is True and s["snapshot"] is None and s["files_new"] == 2
    assert s["bytes_added"] >= 1100  # the two files' chunks, before compression
    assert _state(cli.repo) == before
    assert not list((cli.cache).rglob("catalog.sqlite"))
    text = cli("backup", "-n", str(src))
    assert "dry run: nothing was written" in text.stdout and "would add:" in text.stdout


def test_list_shows_each_file_as_added_modified_or_unmodified(tmp_path: Path, cli: Cli) -> None:
    src = _src(tmp_path)
    assert cli("init").returncode == 0
    r = cli("--json", "backup", "--list", str(src))
    assert sorted((o["status"], o["path"]) for o in r.json if o["type"] == "file") == [
        ("A", f"{src}/a.txt"), ("A", f"{src}/sub/b.txt")]
    time.sleep(2.1)  # out of the racy window
    r = cli("--json", "backup", "--list", str(src))
    assert sorted(o["status"] for o in r.json if o["type"] == "file") == ["U", "U"]
    (src / "a.txt").write_text("changed\n")
    (src / "new.txt").write_text("new\n")
    r = cli("backup", "--list", str(src))
    assert r.returncode == 0
    lines = sorted(ln for ln in r.stdout.splitlines() if ln[:3] in ("A  ", "M  ", "U  "))
    assert lines == [f"A  {src}/new.txt", f"M  {src}/a.txt", f"U  {src}/sub/b.txt"]


def test_skip_if_unchanged_saves_no_snapshot_when_nothing_changed(tmp_path: Path, cli: Cli) -> None:
    src = _src(tmp_path)
    assert cli("init").returncode == 0
    first = cli("--json", "backup", "--skip-if-unchanged", str(src)).last("summary")
    assert first["snapshot"] and not first["skipped"]  # no parent: saved
    r = cli("--json", "backup", "--skip-if-unchanged", str(src))
    s = r.last("summary")
    assert r.returncode == 0 and s["skipped"] is True and s["snapshot"] is None
    assert len(cli("--json", "snapshots").json) == 1
    text = cli("backup", "--skip-if-unchanged", str(src))
    assert "nothing changed since snapshot" in text.stdout
    (src / "sub" / "b.txt").write_text("other\n")
    s = cli("--json", "backup", "--skip-if-unchanged", str(src)).last("summary")
    assert s["snapshot"] and not s["skipped"]
    assert len(cli("--json", "snapshots").json) == 2


def test_bytes_added_printed_equal_the_stored_summary(tmp_path: Path, cli: Cli) -> None:
    """The summary is taken before the snapshot is written, so neither counts the snapshot
    document: an unchanged run adds 0 in both (it printed the snapshot's size before)."""
    src = _src(tmp_path)
    assert cli("init").returncode == 0
    for _ in range(3):
        time.sleep(2.1)
        s = cli("--json", "backup", str(src)).last("summary")
        stored = next(o for o in cli("--json", "snapshots").json if o["id"] == s["snapshot"])["summary"]
        assert s["bytes_added"] == stored.get("bytes_added", 0)
    # (the second run stores the directories again: listing them changed their access times)
    assert s["bytes_added"] == 0 and s["files_unmodified"] == 2


def test_files_reread_for_the_racy_window_count_as_unmodified(tmp_path: Path, cli: Cli) -> None:
    """Files changed within 2 s before a run started are read again by the next run, since
    their stat data cannot prove they did not change after that run read them. Their content
    is what was stored, so they count as unmodified, and as re-read."""
    assert cli("init").returncode == 0
    src = _src(tmp_path)
    for attempt in range(3):
        assert cli("backup", str(src)).returncode == 0
        # The files must have changed less than 2 s before that run started; a machine slow
        # enough to start it later (a new process, the key, the lock) gets another try.
        started = datetime.fromisoformat(cli("--json", "snapshots").json[-1]["time"]).timestamp()
        changed = max(os.stat(f).st_ctime for f in (src / "a.txt", src / "sub" / "b.txt"))
        if started - changed < 1.5:
            break
        assert attempt < 2, f"each run started {started - changed:.1f} s after the files changed"
        for f in (src / "a.txt", src / "sub" / "b.txt"):
            f.write_bytes(f.read_bytes())  # a new ctime, the same content
    text = cli("backup", str(src))
    assert "0 changed, 2 unmodified" in text.stdout and "(2 re-read for the racy window)" in text.stdout
    stored = cli("--json", "snapshots").json[-1]["summary"]
    assert (stored.get("files_changed", 0), stored["files_unmodified"]) == (0, 2)
    # once a run has started more than 2 s after the files last changed, the next one trusts them
    time.sleep(2.1)
    assert cli("backup", str(src)).returncode == 0
    s = cli("--json", "backup", str(src)).last("summary")
    assert (s["files_unmodified"], s["files_reread"], s["bytes_read"]) == (2, 0, 0), s


def test_the_json_summary_carries_no_undocumented_snapshots_list(tmp_path: Path, cli: Cli) -> None:
    src = _src(tmp_path)
    assert cli("init").returncode == 0
    s = cli("--json", "backup", str(src)).last("summary")
    assert "snapshots" not in s and "source_snapshots" not in s


def test_stdin_and_stdin_from_command(tmp_path: Path, cli: Cli) -> None:
    assert cli("init").returncode == 0
    data = "row\n" * 50_000
    r = cli("--json", "backup", "--stdin", "--stdin-filename", "dump.sql", "--tag", "db", input=data)
    assert r.returncode == 0, r.stderr
    s = r.last("summary")
    assert s["files_new"] == 1 and s["bytes_read"] == len(data)
    snap = cli("--json", "snapshots").json[-1]
    assert snap["paths"] == ["/dump.sql"] and snap["tags"] == ["db"]
    assert cli("restore", "latest", "--target", str(tmp_path / "out")).returncode == 0
    assert (tmp_path / "out" / "dump.sql").read_text() == data
    script = "import sys; sys.stdout.write('x' * 100000)"
    r = cli("--json", "backup", "--stdin-filename", "x.bin", "--stdin-from-command", "--",
            sys.executable, "-c", script)
    assert r.returncode == 0, r.stderr
    second = r.last("summary")
    assert second["bytes_read"] == 100_000 and second["parent"] is None
    r = cli("--json", "backup", "--stdin-filename", "x.bin", "--stdin-from-command", "--",
            sys.executable, "-c", script)
    assert r.last("summary")["parent"] == second["snapshot"]  # same name: the parent
    assert r.last("summary")["bytes_added"] < 2000  # nothing new but a tree and index


def test_a_failing_stdin_command_saves_no_snapshot(tmp_path: Path, cli: Cli) -> None:
    assert cli("init").returncode == 0
    r = cli("--json", "backup", "--stdin-from-command", "--", sys.executable, "-c",
            "import sys; sys.stdout.write('partial'); sys.exit(4)")
    assert r.returncode == 16, r.stdout + r.stderr
    assert "exited with status 4; no snapshot was saved" in r.last("error")["message"]
    r = cli("backup", "--stdin-from-command", "--", str(tmp_path / "no-such-command"))
    assert r.returncode == 16 and "cannot run" in r.stderr
    assert cli("--json", "snapshots").json == []
    for args, msg in ((["backup", "--stdin-from-command"], "needs the command after --"),
                      (["backup", "--stdin", "x"], "takes no paths"),
                      (["backup", "--stdin", "--stdin-filename", "a/b"], "single file name")):
        r = cli(*args, input="")
        assert r.returncode == 2 and msg in r.stderr, (args, r.stderr)
