"""Safe joining of untrusted names (from a repository that may be tampered with)."""

from __future__ import annotations

from deltavault.errors import CorruptionError


def check_name(name: bytes) -> bytes:
    """A single path component: no separators, not '.', '..' or empty, no NUL."""
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise CorruptionError(f"refusing unsafe name {name!r} from the repository")
    return name


def display(name: bytes) -> str:
    """Printable form of a raw name: undecodable bytes and control characters escaped."""
    s = name.decode("utf-8", errors="backslashreplace")
    if s.isprintable():  # fast path; it is false for every character escaped below
        return s
    if any(ord(c) < 32 or ord(c) == 127 for c in s):
        s = "".join(c if 32 <= ord(c) != 127 else f"\\x{ord(c):02x}" for c in s)
    return s


def proc_path(dir_fd: int, name: bytes) -> bytes:
    """A path naming dir_fd/name without resolving any symlink on the way, for calls that
    take no dir_fd (the l*xattr family)."""
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)
