"""Safe joining of untrusted names (from a repository that may be tampered with)."""

from __future__ import annotations

from deltavault.errors import CorruptionError


def check_name(name: bytes) -> bytes:
    """A single path component: no separators, not '.', '..' or empty, no NUL."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise CorruptionError(f"refusing unsafe name {name!r} from the repository")
    return name


_C_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def display(name: bytes) -> str:
    """A raw name as it may be shown on a terminal, escaped as ``ls -b`` does: a backslash
    doubled, \\n \\t \\r, other control and format characters (ANSI escapes, C1 controls,
    bidi overrides such as U+202E, zero-width characters) as \\xHH (ASCII) or \\uXXXX, and bytes
    that are not UTF-8 as \\xHH. Unambiguous: two names never display alike. ``--json``
    carries ``exact(name)`` instead."""
    s = name.decode("utf-8", errors="surrogateescape")
    if s.isprintable() and "\\" not in s:  # the common case, and fast
        return s
    return "".join(_escape_char(c) for c in s)


def _escape_char(c: str) -> str:
    if c in _C_ESCAPES:
        return _C_ESCAPES[c]
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte, kept by surrogateescape
        return f"\\x{o - 0xDC00:02x}"
    if c.isprintable():
        return c
    # \\xHH only below 0x80, where no undecodable byte lies: C1 controls are \\u0085 and so on
    return f"\\x{o:02x}" if o < 0x80 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def exact(name: bytes) -> str:
    """A raw name as a str that gives back the same bytes (os.fsencode), for --json: JSON
    escapes what it must (controls as \\u001b, undecodable bytes as \\udcXX)."""
    return name.decode("utf-8", errors="surrogateescape")


def shown(text: str) -> str:
    """``display`` of a name already held as an ``exact`` str."""
    return display(text.encode("utf-8", errors="surrogateescape"))


def terminal(text: str) -> str:
    """Text made for a terminal (a message, a table of several lines) with every control and
    format character escaped as ``display`` escapes it, but the newlines between its lines;
    a backslash is left alone, so names already escaped pass unchanged. The last wall in
    every printer, for a stored string that reached one without ``display`` or ``shown``."""
    if text.replace("\n", "").isprintable():
        return text
    return "\n".join(map(one_line, text.split("\n")))


def one_line(text: str) -> str:
    """``terminal`` of text that must stay one line (a log field, a problem's message): its
    newlines, carriage returns and tabs escaped too, so it cannot forge another entry."""
    if text.isprintable():
        return text
    return "".join(c if c == "\\" else _escape_char(c) for c in text)


def proc_path(dir_fd: int, name: bytes) -> bytes:
    """A path naming dir_fd/name without resolving any symlink on the way, for calls that
    take no dir_fd (the l*xattr family)."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)
