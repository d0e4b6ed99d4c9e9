"""restore's patterns, --delete, --overwrite and --dry-run on a real repository."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.conftest import Cli
from tests.treeutil import manifest


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def _snapshot(tmp_path: Path, cli: Cli) -> Path:
    src = tmp_path / "src"
    for rel in ("a/one.txt", "a/two.txt", "a/skip.log", "a/deep/three.txt", "b/four.txt", "b/x.bin", "top.txt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(f"{rel}\n")
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    return src


def test_include_globs_restore_only_matches_without_empty_directories(tmp_path: Path, cli: Cli) -> None:
    src = _snapshot(tmp_path, cli)
    out = tmp_path / "out"
    r = cli("--json", "restore", "latest", "--target", str(out), "--include", "src/a/*.txt")
    assert r.returncode == 0, r.stdout + r.stderr
    assert _files(out) == {"src", "src/a", "src/a/one.txt", "src/a/two.txt"}
    assert r.last("summary")["files"] == 2
    # the original path, anchored; '**' at any depth; --exclude on top
    for n, (args, want) in enumerate((
            (["--include", f"{src}/b"], {"src", "src/b", "src/b/four.txt", "src/b/x.bin"}),
            (["--include", "**/*.txt", "--exclude", "deep"],
             {"src", "src/a", "src/a/one.txt", "src/a/two.txt", "src/b", "src/b/four.txt", "src/top.txt"}),
            (["--include", "/src/a/deep/three.txt"], {"src", "src/a", "src/a/deep", "src/a/deep/three.txt"}),
            (["--exclude", "*.txt", "--exclude", "b"], {"src", "src/a", "src/a/skip.log", "src/a/deep"}))):
        target = tmp_path / f"o{n}"
        r = cli("restore", "latest", "--target", str(target), *args)
        assert r.returncode == 0, (args, r.stderr)
        assert _files(target) == want, args


def test_an_include_that_matches_nothing_is_named_and_exits_3(tmp_path: Path, cli: Cli) -> None:
    _snapshot(tmp_path, cli)
    out = tmp_path / "out"
    r = cli("restore", "latest", "--target", str(out), "--include", "src/a/*.txt", "--include", "*.docx")
    assert r.returncode == 3
    assert "missing: *.docx: matches nothing in the snapshot" in r.stdout
    assert _files(out) == {"src", "src/a", "src/a/one.txt", "src/a/two.txt"}
    r = cli("restore", "latest", "--target", str(out), "--include", "a/../b")
    assert r.returncode == 2 and "'..' is not allowed" in r.stderr


def test_positional_target_and_unknown_snapshot_are_refused(tmp_path: Path, cli: Cli) -> None:
    _snapshot(tmp_path, cli)
    r = cli("restore", "latest", str(tmp_path / "out"))
    assert r.returncode == 2
    assert f"deltavault restore latest --target {tmp_path / 'out'}" in r.stderr
    assert not (tmp_path / "out").exists()
    r = cli("restore", "0badc0de", "--target", str(tmp_path / "out"))
    assert r.returncode == 2 and "no snapshot matches '0badc0de'" in r.stderr


def test_delete_makes_the_target_match_the_snapshot(tmp_path: Path, cli: Cli) -> None:
    src = _snapshot(tmp_path, cli)
    out = tmp_path / "out"
    assert cli("restore", "latest", "--target", str(out)).returncode == 0
    (out / "src" / "a" / "extra.txt").write_text("not in the snapshot")
    (out / "src" / "gone" / "deeper").mkdir(parents=True)
    (out / "src" / "gone" / "deeper" / "f").write_text("x")
    (out / "src" / "keep.log").write_text("excluded: kept")
    (out / "src" / "top.txt").unlink()
    (out / "src" / "top.txt").mkdir()  # a directory where the snapshot has a file
    (out / "src" / "top.txt" / "inside").write_text("x")
    (out / "outside-link").symlink_to("/etc")  # at the top: not in the snapshot either
    dry = cli("--json", "restore", "latest", "--target", str(out), "--delete", "--exclude", "*.log", "-n")
    assert dry.returncode == 0, dry.stderr
    assert sorted(o["path"] for o in dry.json if o["type"] == "delete") == [
        "outside-link", "src/a/extra.txt", "src/gone", "src/top.txt"]
    assert dry.last("summary")["deleted"] == 4 and (out / "src" / "gone").exists()
    r = cli("--json", "restore", "latest", "--target", str(out), "--delete", "--exclude", "*.log")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.last("summary")["deleted"] == 4  # as the dry run said, top.txt's directory included
    assert (out / "src" / "keep.log").exists() and not (out / "outside-link").exists()
    (out / "src" / "keep.log").unlink()
    skip = out / "src" / "a" / "skip.log"  # excluded, so not restored: as it was
    st = os.stat(src / "a" / "skip.log")
    os.utime(skip, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert manifest(out / "src") == manifest(src)
    assert os.path.exists("/etc/passwd")  # the symlink was removed, not followed


def test_overwrite_policies(tmp_path: Path, cli: Cli) -> None:
    src = _snapshot(tmp_path, cli)
    out = tmp_path / "out"
    assert cli("restore", "latest", "--target", str(out)).returncode == 0
    one, two, four = out / "src/a/one.txt", out / "src/a/two.txt", out / "src/b/four.txt"
    one.write_text("edited, same age\n")
    os.utime(one, ns=(os.stat(src / "a/one.txt").st_mtime_ns,) * 2)  # same mtime, other size
    two.write_text("edited later\n")  # newer than the snapshot's
    past = time.time_ns() - 10**11
    four.write_text("old\n")
    os.utime(four, ns=(past, past))  # older than the snapshot's
    cases = {"never": ("edited, same age\n", "edited later\n", "old\n"),
             "if-newer": ("edited, same age\n", "edited later\n", "b/four.txt\n"),
             "if-changed": ("a/one.txt\n", "a/two.txt\n", "b/four.txt\n"),
             "always": ("a/one.txt\n", "a/two.txt\n", "b/four.txt\n")}
    for policy, (w1, w2, w4) in cases.items():
        target = tmp_path / policy
        os.system(f"cp -a {out} {target}")
        r = cli("--json", "restore", "latest", "--target", str(target), "--overwrite", policy)
        assert r.returncode == 0, (policy, r.stderr)
        got = tuple((target / p).read_text() for p in ("src/a/one.txt", "src/a/two.txt", "src/b/four.txt"))
        assert got == (w1, w2, w4), policy
        kept = r.last("summary")["skipped"]
        assert kept == {"never": 7, "if-newer": 6, "if-changed": 4, "always": 0}[policy], (policy, kept)


def test_dry_run_changes_nothing(tmp_path: Path, cli: Cli) -> None:
    _snapshot(tmp_path, cli)
    out = tmp_path / "out"
    r = cli("--json", "restore", "latest", "--target", str(out), "--dry-run", "--include", "src/a")
    assert r.returncode == 0, r.stderr
    s = r.last("summary")
    assert (s["dry_run"], s["files"], s["dirs"], s["deleted"]) == (True, 4, 3, 0)
    assert not out.exists()
    text = cli("restore", "latest", "--target", str(out), "-n", "--include", "nothing-here")
    assert text.returncode == 3 and "would write 0 files" in text.stdout and "matches nothing" in text.stdout
