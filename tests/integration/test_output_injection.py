"""Strings a repository's writer chose (owner names, a snapshot's time and kind) and names
from the source tree reach the terminal escaped, whichever printer shows them: an escape
sequence could retitle the window, rewrite the screen or, on some terminals, type input."""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import msgspec

from deltavault.backends.local import LocalBackend
from deltavault.cli.progress import QuietReporter
from deltavault.cli.progress_rich import RichReporter
from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.model.snapshot import Snapshot, SnapshotSummary
from deltavault.model.types import BlobType
from deltavault.repository.repository import Repository
from deltavault.sync.report import SyncLog
from tests.browser import Browser
from tests.conftest import PASSWORD, Cli
from tests.integration.test_hostile_names import _raw_controls

EVIL = "\x1b]0;pwned\x07\x1b[2J\u202e"


def _planted(cli: Cli, snap: dict[str, object], nodes: list[Node]) -> str:
    """A snapshot written as someone with the repository's key could write it."""
    assert cli("init").returncode == 0
    repo = Repository.open(LocalBackend(cli.repo), lambda: PASSWORD, cache_root=cli.cache)
    root = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree(nodes)))[0]
    repo.flush()
    fields: dict[str, object] = {"time": "2026-01-01T00:00:00Z", "time_ns": 1, "hostname": "h", "paths": ["/src"],
                                 "source_id": "h:/src", "tree": root, **snap}
    return repo.save_snapshot(Snapshot(**fields))  # type: ignore[arg-type]


def test_ls_long_escapes_the_owner_names_a_repository_holds(cli: Cli) -> None:
    """``ls -l`` printed a node's user and group names raw: they are the repository's, not
    the local password file's, so any writer of the repository picks them."""
    sid = _planted(cli, {}, [Node(name=b"f", type=NodeType.FILE, user="u" + EVIL, group="g\n" + EVIL),
                             Node(name=b"l", type=NodeType.SYMLINK, target=EVIL.encode(), user="u" + EVIL)])
    r = cli("ls", "-l", sid)
    assert r.returncode == 0, r.stderr
    assert _raw_controls(r.stdout) == [], r.stdout
    assert len(r.stdout.splitlines()) == 2  # the newline in a group name forged no line
    assert "u\\x1b]0;pwned\\x07" in r.stdout and "g\\n\\x1b" in r.stdout


def test_snapshot_time_and_kind_reach_the_terminal_escaped(cli: Cli) -> None:
    """``snapshots``, ``find`` and ``forget`` printed a snapshot's stored time string raw, and
    ``snapshots`` its kind; an error naming the kind reached stderr raw too."""
    sid = _planted(cli, {"time": EVIL + "2026-01-01T00:00:00Z", "kind": "k" + EVIL},
                   [Node(name=b"f", type=NodeType.FILE)])
    for args in (["snapshots"], ["find", "f"], ["forget", "--keep-last", "1", "--dry-run"]):
        r = cli(*args)
        assert r.returncode == 0, (args, r.stderr)
        assert _raw_controls(r.stdout) == [], (args, r.stdout)
        assert "\\x1b]0;pwned" in r.stdout, (args, r.stdout)
    r = cli("restore", sid, "--target", os.devnull)
    assert _raw_controls(r.stdout + r.stderr) == [], r.stderr


def test_the_terminal_wall_escapes_controls_and_keeps_lines() -> None:
    """The last wall every text printer goes through: controls and format characters are
    escaped as names are, newlines between lines kept, text already escaped unchanged."""
    from deltavault.fs.paths import terminal

    assert terminal("a\x1b[31mb\n\u202ec\x9b\r\td") == "a\\x1b[31mb\n\\u202ec\\u009b\\r\\td"
    assert terminal("back\\slash \\x1b café") == "back\\slash \\x1b café"
    assert terminal("bad\udcff") == "bad\\xff"


def test_progress_problems_are_text_not_markup() -> None:
    """The terminal reporter printed problems as rich markup: a file named ``[/oops]`` ended
    the backup with MarkupError (a traceback), and one named ``[link=URL]x[/link]`` was shown
    as ``x``, a hyperlink to URL. Names are text; controls in a message are escaped."""
    out = io.StringIO()
    rep = RichReporter(out)
    rep.problem("src/[/oops]", "unreadable", "gone")
    rep.problem("src/[link=https://evil.example/]x[/link]", "unreadable", "m" + EVIL)
    text = out.getvalue()
    assert "src/[/oops]" in text and "[link=https://evil.example/]x[/link]" in text
    assert _raw_controls(text) == []
    out = io.StringIO()
    QuietReporter(out).problem("p", "unreadable", "m" + EVIL + "\nforged: line")
    assert _raw_controls(out.getvalue()) == [] and len(out.getvalue().splitlines()) == 1


def test_sync_log_keeps_one_line_per_entry_whatever_the_error(tmp_path: Path) -> None:
    """The log escaped the path, but an error message (a remote host's words) only lost its
    tabs and newlines: a carriage return or an escape sequence reached whoever cats the log."""
    log = SyncLog(tmp_path / "log")
    log.write("error", 0, b"new\nline\x1b[2J", error="x\r\x1b[2Jforged\tentry\nnext")
    log.close()
    lines = (tmp_path / "log").read_text().splitlines()
    assert len(lines) == 1 and len(lines[0].split("\t")) == 7
    assert _raw_controls(lines[0].replace("\t", "")) == []


MARK = "document.documentElement.dataset.pwned"
IN_NAMES = [f"<img src=x onerror=\"{MARK}='img'\">", f"\"><svg onload={MARK}='attr'>", f"'><img src=x onerror={MARK}='q'>"]
IN_STRINGS = f"</script><script>{MARK}='script'</script><!--<script>"


def test_report_runs_no_script_from_names_or_stored_strings(cli: Cli, tmp_path: Path) -> None:
    """The report of file names and snapshot strings written to run script (each sets a
    marker on the page if it runs), opened in Chromium as is and with its CSP taken out:
    escaping alone keeps every one of them text, and the CSP is a second wall."""
    src = tmp_path / "src"
    for name in IN_NAMES:
        (src / name).mkdir(parents=True)
        (src / name / name).write_bytes(os.urandom(20_000))
    assert cli("init").returncode == 0
    assert cli("backup", "--host", IN_STRINGS, "--tag", IN_STRINGS, str(src)).returncode == 0
    for name in IN_NAMES:
        (src / name / "more").write_bytes(os.urandom(30_000))
    assert cli("backup", "--host", IN_STRINGS, "--tag", IN_STRINGS, str(src)).returncode == 0
    page = tmp_path / "r.html"
    assert cli("report", "--html", str(page)).returncode == 0
    html = page.read_text()
    bare = tmp_path / "bare.html"
    bare.write_text(re.sub(r"<meta http-equiv='Content-Security-Policy'[^>]*>", "", html))
    assert "Content-Security-Policy" not in bare.read_text()
    with Browser() as b:
        for p in (page, bare):
            b.load(p.as_uri())
            assert b.evaluate(MARK) is None, p
            text = b.evaluate("document.body.innerText")
            assert IN_NAMES[0] in text and "src/" + IN_NAMES[1] in text  # shown, as text
            assert b.evaluate("JSON.parse(document.getElementById('report-data').textContent)"
                              ".sources[0].runs.length") == 2


def test_restore_lists_a_snapshots_incomplete_entries_one_line_each(cli: Cli, tmp_path: Path) -> None:
    """A restore names the entries its snapshot could not read, from the stored summary: a
    newline in one forged a line of the report (and a control reached the terminal)."""
    summary = SnapshotSummary(errors=1, incomplete=["src/x\n  src/forged" + EVIL])
    sid = _planted(cli, {"summary": summary}, [Node(name=b"f", type=NodeType.FILE)])
    r = cli("restore", sid, "--target", str(tmp_path / "t"))
    assert r.returncode == 0, r.stderr
    assert _raw_controls(r.stdout) == [], r.stdout
    assert r.stdout.splitlines()[-1].startswith("  src/x\\n  src/forged\\x1b]0;pwned"), r.stdout


def test_key_list_shows_a_planted_key_files_strings_escaped(cli: Cli) -> None:
    """A key file is plain JSON under an unkeyed checksum: anyone who can write the storage,
    without the password, can add one. ``key list`` printed its host name and creation time
    raw: a newline forged a line marked ``*``, as if that key had opened the repository
    (the copy planted here wraps the real key, so it is the one that opens it)."""
    from deltavault.repository.keys import parse_key_file

    assert cli("init").returncode == 0
    [mine] = (cli.repo / "keys").iterdir()
    kf = parse_key_file(mine.read_bytes())
    forged = "h\n* 00000000  2026-01-01T00:00:00Z  forged" + EVIL
    kf = msgspec.structs.replace(kf, hostname=forged, created="2020" + EVIL)
    kf = msgspec.structs.replace(kf, checksum=kf._body_digest())
    (cli.repo / "keys" / ("0" * 64)).write_bytes(msgspec.json.encode(kf))
    (cli.repo / "keys" / "x\n* forged").write_bytes(b"{}")  # its name is the storage's too
    r = cli("key", "list")
    assert r.returncode == 0, r.stderr
    assert _raw_controls(r.stdout) == [], r.stdout
    assert len(r.stdout.splitlines()) == 4 and sum(line.startswith("*") for line in r.stdout.splitlines()) == 1
    assert [k["hostname"] for k in cli("--json", "key", "list").json if k.get("id") == "0" * 64] == [forged]


def test_a_lock_holders_strings_are_shown_escaped(cli: Cli, tmp_path: Path) -> None:
    """A lock names its holder's host and command, written by whoever holds the key: the
    error of a command it blocks and ``unlock``'s listing printed both raw."""
    from deltavault.repository.locks import LockInfo

    sid = _planted(cli, {}, [Node(name=b"f", type=NodeType.FILE)])
    repo = Repository.open(LocalBackend(cli.repo), lambda: PASSWORD, cache_root=cli.cache)
    now = time.time()
    repo.locks._write(LockInfo(hostname="elsewhere\nforged line" + EVIL, pid=1, pid_start=1, exclusive=True,
                               created=now, refreshed=now, command="prune" + EVIL))
    r = cli("restore", sid, "--target", str(tmp_path / "t"))
    assert r.returncode != 0 and "locked" in r.stderr, r.stderr
    assert _raw_controls(r.stderr) == [] and len(r.stderr.splitlines()) == 1, r.stderr
    r = cli("unlock")
    assert r.returncode == 0, r.stderr
    assert _raw_controls(r.stdout) == [] and len(r.stdout.splitlines()) == 2, r.stdout


def test_an_object_name_planted_in_the_storage_forges_no_line(cli: Cli, tmp_path: Path) -> None:
    """Anyone who can write the storage (no key needed) can add a file under snapshots/ whose
    name holds a newline. It is no snapshot, so commands warn that it cannot be read and
    ``check`` reports it, each naming it: the name ended the line and wrote its own
    ``warning:`` line."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    assert cli("init").returncode == 0 and cli("backup", str(src)).returncode == 0
    (cli.repo / "snapshots" / ("a\nwarning: forged" + EVIL)).write_bytes(b"junk")
    r = cli("snapshots")
    assert r.returncode == 0, r.stderr
    assert _raw_controls(r.stderr) == [] and len(r.stderr.splitlines()) == 1, r.stderr
    r = cli("check")
    assert r.returncode != 0
    lines = (r.stdout + r.stderr).splitlines()
    assert _raw_controls(r.stdout + r.stderr) == [] and not any(line.startswith("warning: forged") for line in lines)
