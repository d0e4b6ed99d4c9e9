"""What a switching user sees: -q drops progress, never results; the terminal progress bar
has files and bytes in their own columns, human units, totals and an ETA (backup and
restore); init refuses a useless pack size."""

from __future__ import annotations

import os
import re
from pathlib import Path

from tests.conftest import Cli, on_a_terminal


def test_quiet_drops_progress_not_results(tmp_path: Path, cli: Cli) -> None:
    src = tmp_path / "data"
    src.mkdir()
    (src / "f").write_text("x")
    assert cli("init").returncode == 0
    b = cli("-q", "backup", str(src))
    assert b.returncode == 0 and b.stdout == ""  # a report of what was done: dropped
    snaps = cli("-q", "snapshots")
    assert snaps.returncode == 0 and "1 snapshot(s)" in snaps.stdout and str(src) in snaps.stdout
    stats = cli("-q", "stats")
    assert "snapshots:          1" in stats.stdout
    assert "stats in restore-size mode" in cli("-q", "stats", "--mode", "restore-size").stdout
    assert "data/f" in cli("-q", "ls", "latest").stdout
    assert "* " in cli("-q", "key", "list").stdout


def test_progress_bars_show_files_and_bytes_apart_with_totals_and_eta(tmp_path: Path, cli: Cli) -> None:
    src = tmp_path / "data"
    src.mkdir()
    for i in range(40):
        (src / f"f{i:02d}").write_bytes(os.urandom(6 << 20))
    assert cli("init").returncode == 0
    # Held to 60 MiB/s so each run lasts four seconds whatever the machine: the bar is drawn
    # ten times a second, and a run over in 0.2 s shows no frame with an ETA. The bar counts
    # bytes read, which run ahead of the upload by the packs in flight (up to 128 MiB), so
    # the source is larger than that.
    rc, text = on_a_terminal(cli, "--limit-upload", "60M", "backup", str(src))
    assert rc == 0, text
    assert re.search(r"\d+/40 files", text), text  # files, with their total, in their own column
    assert re.search(r"[\d.]+ (B|KiB|MiB)/240\.0 MiB", text), text  # bytes in binary units, with the total
    assert "eta " in text and "MiB/s" in text, text
    assert not re.search(r"\d{6,}", text.split("snapshot")[0])  # no raw byte counts
    rc, text = on_a_terminal(cli, "--limit-download", "60M", "restore", "latest", "--target", str(tmp_path / "out"))
    assert rc == 0, text
    assert re.search(r"[\d.]+ (B|KiB|MiB)/240\.0 MiB", text) and "/?" not in text, text
    assert re.search(r"\d+/40 files", text), text


def test_init_refuses_a_pack_size_outside_the_useful_range(tmp_path: Path, cli: Cli) -> None:
    for size in ("1M", "512M"):
        r = cli("init", "--pack-size", size)
        assert r.returncode == 2 and "outside 4 MiB to 128 MiB" in r.stderr, r.stderr
    assert not cli.repo.exists()
    assert cli("init", "--pack-size", "64M").returncode == 0


def test_every_new_command_and_option_is_in_help(cli: Cli) -> None:
    top = cli("--help").stdout
    for command in ("find", "dump", "cat", "copy", "tag", "rewrite", "unlock", "cache"):
        assert command in top, command
    assert "--limit-upload" in top and "--limit-download" in top
    wanted = {
        "backup": ["--exclude-file", "--iexclude", "--iexclude-file", "--files-from", "--files-from-verbatim",
                   "--files-from-raw", "--exclude-caches", "--exclude-if-present", "--exclude-larger-than",
                   "--stdin", "--stdin-filename", "--stdin-from-command", "--dry-run", "--list",
                   "--skip-if-unchanged"],
        "restore": ["--include", "--exclude", "--delete", "--overwrite", "--dry-run"],
        "check": ["--read-data-subset"],
        "snapshots": ["--path", "--latest", "--host", "--tag"],
        "forget": ["--tag", "--path", "--prune"],
        "stats": ["--mode", "restore-size", "raw-data", "files-by-contents"],
        "key": ["export", "import", "--output"],
        "copy": ["--from-repo", "--from-password-file"],
        "tag": ["--add", "--remove", "--set"],
        "rewrite": ["--exclude", "--dry-run", "--keep-original"],
        "unlock": ["--remove-all"],
        "cache": ["--cleanup", "--max-age", "--remove"],
        "dump": ["--archive", "--target"],
        "find": ["--snapshot", "--ignore-case"],
        "init": ["--pack-size"],
    }
    for command, options in wanted.items():
        text = cli(command, "--help").stdout
        missing = [o for o in options if o not in text]
        assert not missing, (command, missing)
