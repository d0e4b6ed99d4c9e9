"""backup's input options on a real repository: patterns, exclude files, markers, sizes,
--files-from in its three forms, missing sources, and bad input."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Cli


def _paths(cli: Cli, snap: str = "latest") -> set[str]:
    r = cli("--json", "ls", snap)
    assert r.returncode == 0, r.stderr
    return {o["path"] for o in r.json if o["type"] == "node"}


def _tree(root: Path) -> Path:
    for rel, data in {"src/a/b/x.txt": b"x", "src/a/c.txt": b"c", "src/keep.TXT": b"k", "src/tmp/t": b"t",
                      "src/Build/o.o": b"o", "src/big.bin": b"B" * 5000, "src/cache/data": b"d" * 100,
                      "src/cache/CACHEDIR.TAG": b"Signature: 8a477f597d28d172789f06886806bc55\nrest",
                      "src/fake/CACHEDIR.TAG": b"not a signature", "src/fake/f": b"f",
                      "src/marked/.nobackup": b"", "src/marked/m": b"m"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root / "src"


def test_patterns_markers_and_sizes(tmp_path: Path, cli: Cli) -> None:
    src = _tree(tmp_path)
    assert cli("init").returncode == 0
    xf = tmp_path / "excludes"
    xf.write_text("# comments and blank lines are skipped\n\n  src/tmp  \n")
    r = cli("--json", "backup", str(src), "--exclude", "src/a/b", "--exclude", f"{src}/a/c.txt",
            "--iexclude", "build", "--exclude-file", str(xf), "--exclude-caches",
            "--exclude-if-present", ".nobackup", "--exclude-larger-than", "4K")
    assert r.returncode == 0, r.stderr
    assert _paths(cli) == {"src", "src/a", "src/keep.TXT", "src/cache", "src/cache/CACHEDIR.TAG",
                           "src/fake", "src/fake/CACHEDIR.TAG", "src/fake/f", "src/marked", "src/marked/.nobackup"}
    assert r.last("summary")["bytes_total"] == 1 + 48 + 15 + 1 + 0  # keep.TXT, the two tags, f, .nobackup


def test_a_bad_pattern_or_unreadable_exclude_file_is_a_usage_error(tmp_path: Path, cli: Cli) -> None:
    src = _tree(tmp_path)
    assert cli("init").returncode == 0
    r = cli("backup", str(src), "--exclude", "a/../b")
    assert r.returncode == 2 and "'..' is not allowed" in r.stderr
    r = cli("backup", str(src), "--exclude-file", str(tmp_path / "nope"))
    assert r.returncode == 2 and "cannot read the pattern file" in r.stderr
    r = cli("backup", str(src), "--exclude-if-present", "a/b")
    assert r.returncode == 2 and "takes a file name" in r.stderr
    assert cli("--json", "snapshots").json == []


def test_files_from_its_three_forms_and_shared_names(tmp_path: Path, cli: Cli) -> None:
    src = _tree(tmp_path)
    assert cli("init").returncode == 0
    lst = tmp_path / "list"
    lst.write_text(f"# the two x-named files share a base name with nothing; c.txt and keep.TXT live apart\n"
                   f"{src}/a/b/x.txt\n{src}/a/*.txt\n\n")
    r = cli("--json", "backup", "--files-from", str(lst))
    assert r.returncode == 0, r.stderr
    assert _paths(cli) == {"x.txt", "c.txt"}
    # names that clash are kept under their deepest common directory, with only them
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "c.txt").write_bytes(b"other c")
    verbatim = tmp_path / "verbatim"
    verbatim.write_bytes(f"{src}/a/c.txt\n{tmp_path}/other/c.txt\n".encode())
    r = cli("--json", "backup", "--files-from-verbatim", str(verbatim))
    assert r.returncode == 0, r.stderr
    top = tmp_path.name
    assert _paths(cli) == {top, f"{top}/src", f"{top}/src/a", f"{top}/src/a/c.txt", f"{top}/other",
                           f"{top}/other/c.txt"}
    snaps = cli("--json", "snapshots").json
    assert sorted(snaps[-1]["paths"]) == sorted([f"{src}/a/c.txt", f"{tmp_path}/other/c.txt"])
    # a restore brings the common directory back with only those two files
    out = tmp_path / "out"
    assert cli("restore", "latest", "--target", str(out)).returncode == 0
    assert (out / top / "other" / "c.txt").read_bytes() == b"other c"
    assert sorted(p.name for p in (out / top / "src" / "a").iterdir()) == ["c.txt"]
    # NUL-separated: a name with a newline survives
    odd = src / "new\nline"
    odd.write_bytes(b"n")
    for opt in ("--files-from-verbatim", "--files-from-raw"):
        raw = tmp_path / f"raw{opt}"
        raw.write_bytes(bytes(odd) + b"\0" + f"{src}/keep.TXT".encode() + b"\0")
        r = cli("--json", "backup", opt, str(raw))
        assert r.returncode == 0, r.stderr
        assert _paths(cli) == {"new\nline", "keep.TXT"}
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    r = cli("backup", "--files-from", str(empty))
    assert r.returncode == 2 and "list no path" in r.stderr


def test_a_missing_source_among_several_is_listed_and_the_rest_backed_up(tmp_path: Path, cli: Cli) -> None:
    src = _tree(tmp_path)
    assert cli("init").returncode == 0
    gone = tmp_path / "gone"
    r = cli("--json", "backup", str(src / "a"), str(gone))
    assert r.returncode == 3, r.stderr
    s = r.last("summary")
    assert s["snapshot"] and s["errors"] == 1
    assert [(p["kind"], p["path"]) for p in s["problems"]] == [("missing", str(gone))]
    assert _paths(cli) == {"a", "a/b", "a/b/x.txt", "a/c.txt"}
    snap = cli("--json", "snapshots").json[-1]
    assert snap["paths"] == [str(src / "a")] and snap["summary"]["incomplete"] == [str(gone)]
    text = cli("backup", str(src / "a"), str(gone))
    assert text.returncode == 3 and f"missing: {gone}: source does not exist" in text.stdout
    # none at all: a usage error, and no snapshot
    r = cli("backup", str(gone), str(tmp_path / "gone2"))
    assert r.returncode == 2 and "no source exists" in r.stderr
    assert len(cli("--json", "snapshots").json) == 2
