"""Safe joining of untrusted names (from a repository that may be tampered with)."""

from __future__ import annotations

import os

from deltavault.errors import NO_SPACE_ERRNOS, CorruptionError, NoSpace, TargetError


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


def open_target_dir(path: bytes, what: str) -> int:
    """Create the directory ``path`` (and its parents) if missing and open it: the root a
    restore or a sync writes under. Failures are the target's, with a precise message."""
    try:
        os.makedirs(path, exist_ok=True)
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileExistsError:
        raise TargetError(f"{what} {display(path)} exists and is not a directory") from None
    except NotADirectoryError:
        raise TargetError(f"{what} {display(path)}: a parent is not a directory") from None
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS:
            raise NoSpace(f"no space to create the {what} {display(path)}") from exc
        raise TargetError(f"cannot create the {what} {display(path)}: {exc.strerror or exc}") from exc
