"""This host's secret: 32 random bytes that only this host (this user on it) holds, kept
outside the cache so that losing or clearing the cache, or ``--no-cache``, keeps it.

Backups tag their snapshots with a key derived from it (repository/hosttag.py), and a run
with no local catalog reuses a parent from the repository only if its tag verifies: another
host that shares the repository (and its key) cannot write one this host will trust.

The file is ``host-secret`` in ``$XDG_CONFIG_HOME/deltavault`` (else ``~/.config/deltavault``;
root too), a directory made or checked private as the cache's are (fs.files.private_dir):
one that is a symlink, another user's, or writable by others is refused (HostSecretError,
exit 2). The file is made 0600, atomically (written under a temporary name, then linked
to its name, so two first runs agree on one secret), and read only if it is a regular file
of ours that nobody else may read or write, holding 32 bytes; any other thing in its place
is removed and a new secret made (the note says why: the next run from the repository
reads every file once).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from deltavault.errors import HostSecretError
from deltavault.fs.files import FILE_MODE, UnsafeCacheDir, private_dir

SECRET_NAME = "host-secret"
SECRET_LEN = 32
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC  # NONBLOCK: a planted FIFO
_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def default_config_dir() -> Path:
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config") / "deltavault"


@dataclass(frozen=True)
class HostSecret:
    secret: bytes
    path: Path
    note: str = ""  # why the file found was replaced by a new secret ("" when it was not)


def load_host_secret(directory: Path | None = None) -> HostSecret:
    """The secret in ``directory`` (default_config_dir()), made on first use."""
    folder = Path(os.path.abspath(directory or default_config_dir()))
    path = folder / SECRET_NAME
    try:
        dfd = private_dir(folder)
    except UnsafeCacheDir as exc:
        raise HostSecretError(f"the directory {exc.path}, which holds this host's secret, {exc.why}: another "
                              "user could read or replace the secret that decides which snapshots a backup "
                              f"trusts, so deltavault refuses it; remove it (deltavault makes a new one) or set "
                              "XDG_CONFIG_HOME to a directory of your own") from None
    except OSError as exc:
        raise HostSecretError(f"the directory {folder} for this host's secret cannot be made or opened "
                              f"({exc.strerror or exc})") from None
    try:
        note = ""
        for _ in range(3):  # another process may replace it in between: a few turns settle it
            secret, why = _read(dfd, path)
            if secret is not None:
                return HostSecret(secret, path, note)
            if why:
                note = (f"the host secret file {path} {why}; deltavault removed it and made a new secret, "
                        "so this run trusts no earlier snapshot of this host from the repository")
                _remove(dfd, path, why)
            _create(dfd, path)
        raise HostSecretError(f"the host secret file {path} keeps changing under deltavault; is another "
                              "program writing it?")
    finally:
        os.close(dfd)


def _read(dfd: int, path: Path) -> tuple[bytes | None, str]:
    """The secret, or None and why the file there is not one ("" when there is none)."""
    try:
        fd = os.open(SECRET_NAME, _READ, dir_fd=dfd)
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None, "is a symbolic link, which deltavault does not follow"
        raise HostSecretError(f"the host secret file {path} cannot be opened ({exc.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, "is not a regular file"
        if st.st_uid != os.geteuid():
            return None, f"is owned by another user (uid {st.st_uid})"
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            return None, f"was open to group or others (mode {mode:04o})"
        data = os.read(fd, SECRET_LEN + 1)
        if len(data) != SECRET_LEN:
            return None, f"holds {len(data)} bytes, not {SECRET_LEN}"
        return data, ""
    finally:
        os.close(fd)


def _remove(dfd: int, path: Path, why: str) -> None:
    try:
        os.unlink(SECRET_NAME, dir_fd=dfd)
    except FileNotFoundError:
        pass
    except OSError as exc:  # a directory in its place, say
        raise HostSecretError(f"the host secret file {path} {why}, and deltavault cannot remove it "
                              f"({exc.strerror}); remove it (deltavault makes a new secret)") from None


def _create(dfd: int, path: Path) -> None:
    """Make the secret under a temporary name, then link it to its name: it appears whole,
    and when another process made one first, theirs stays (the link fails) and is read."""
    tmp = f".{SECRET_NAME}-{os.getpid()}-{os.urandom(6).hex()}"
    try:
        fd = os.open(tmp, _NEW, FILE_MODE, dir_fd=dfd)
        try:
            os.fchmod(fd, FILE_MODE)  # whatever the umask
            os.write(fd, os.urandom(SECRET_LEN))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, SECRET_NAME, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
        except FileExistsError:
            pass
        os.fsync(dfd)
    except OSError as exc:
        raise HostSecretError(f"this host's secret cannot be written in {path.parent} "
                              f"({exc.strerror or exc})") from None
    finally:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
