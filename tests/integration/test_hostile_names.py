"""Hostile names: printed escaped on a terminal (as ``ls -b`` does), exact in --json."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import Cli

HOSTILE = [b"ansi\x1b[31mred\x1b[0m", b"evil\xe2\x80\xaeexe.txt", b"new\nline", b"bad\xff\xfe",
           b"back\\slash", b"c1\xc2\x9bcontrol", b"zero\xe2\x80\x8bwidth", "café".encode()]
SHOWN = ["ansi\\x1b[31mred\\x1b[0m", "evil\\u202eexe.txt", "new\\nline", "bad\\xff\\xfe",
         "back\\\\slash", "c1\\u009bcontrol", "zero\\u200bwidth", "café"]


def _raw_controls(text: str) -> list[str]:
    """Characters a terminal would act on: controls (but the newlines between lines) and
    format characters such as bidi overrides."""
    import unicodedata

    return [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf")]


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(HOSTILE):
        with open(os.path.join(os.fsencode(src), name), "wb") as f:
            f.write(b"%d" % i)
    return src


def test_ls_and_diff_escape_names_on_a_terminal_and_keep_them_exact_in_json(cli: Cli, tmp_path: Path) -> None:
    src = _tree(tmp_path)
    assert cli("init").returncode == 0
    assert cli("backup", str(src)).returncode == 0
    for name in HOSTILE:
        with open(os.path.join(os.fsencode(src), name), "ab") as f:
            f.write(b"!")
    assert cli("backup", str(src)).returncode == 0

    r = cli("ls", "latest")
    assert r.returncode == 0
    assert _raw_controls(r.stdout) == [], r.stdout
    for shown in SHOWN:
        assert f"src/{shown}" in r.stdout.splitlines()
    r = cli("ls", "-l", "latest")
    assert _raw_controls(r.stdout) == []

    r = cli("--json", "ls", "latest")
    paths = {os.fsencode(o["path"]) for o in r.json if o.get("type") == "node"}
    assert {b"src/" + n for n in HOSTILE} <= paths
    assert all(ord(c) < 128 for c in r.stdout)  # JSON escapes, nothing raw reaches a terminal

    snaps = [o["id"] for o in cli("--json", "snapshots").json if o.get("type") == "snapshot"]
    r = cli("diff", *snaps)
    assert _raw_controls(r.stdout) == []
    assert {f"M    src/{s}" for s in SHOWN} <= set(r.stdout.splitlines())
    changed = [json.loads(line) for line in cli("--json", "diff", *snaps).stdout.splitlines()]
    assert {os.fsencode(o["path"]) for o in changed if o.get("type") == "change"} == {b"src/" + n for n in HOSTILE}
    # path_hex too, as ls gives it: exact for a tool (jq) that turns \udcXX into U+FFFD
    assert {bytes.fromhex(o["path_hex"]) for o in changed if o.get("type") == "change"} == \
        {b"src/" + n for n in HOSTILE}
    found = [o for o in cli("--json", "find", "*").json if o.get("type") == "match"]
    assert {b"src/" + n for n in HOSTILE} <= {bytes.fromhex(o["path_hex"]) for o in found}
    assert all(bytes.fromhex(o["path_hex"]) == os.fsencode(o["path"]) for o in found)
