"""The catalog's files on disk: its SQLite file with its WAL and shared-memory files, made
sure to be this user's alone before SQLite opens them (catalog.py says why that matters)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from deltavault.fs.dirfd import identity
from deltavault.fs.files import FILE_MODE, UnsafeCacheDir, private_dir

_SUFFIXES = ("", "-wal", "-shm")


def _unlink_all(dir_fd: int, name: str) -> None:
    for suffix in _SUFFIXES:
        try:
            os.unlink(name + suffix, dir_fd=dir_fd)
        except FileNotFoundError:
            pass


def remove_files(path: Path) -> None:
    """Delete a catalog with its WAL and shared-memory files."""
    try:
        dfd = private_dir(path.parent, create=False)
    except FileNotFoundError:
        return
    except UnsafeCacheDir as exc:
        raise OSError(str(exc)) from None
    try:
        _unlink_all(dfd, path.name)
    finally:
        os.close(dfd)


def prepare(path: Path) -> tuple[tuple[int, int], tuple[int, int], str]:
    """Make sure the catalog's files are ours alone before SQLite opens them: its directory
    private, each of the main, WAL and shared-memory files a regular file of ours with one
    link and writable by nobody else, else all three are removed (a new catalog starts);
    a main file made 0600, so that SQLite gives the WAL and shared-memory files it creates
    the same mode. Returns the identities of the directory and of the main file, and a
    note when files were replaced."""
    dfd = private_dir(path.parent)
    try:
        note = ""
        name = path.name
        sts = {}
        for suffix in _SUFFIXES:
            try:
                sts[suffix] = os.stat(name + suffix, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                pass
        bad = [f"{name}{s}" for s, st in sts.items()
               if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1
               or stat.S_IMODE(st.st_mode) & 0o022]
        if bad:
            note = (f"the local catalog file {bad[0]} was not this user's alone (another user may have "
                    "changed it); deltavault removed it and started a new catalog")
        if bad or "" not in sts:
            _unlink_all(dfd, name)  # no WAL may outlive its main file: it would be replayed into a new one
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE,
                         dir_fd=dfd)
            sts = {}
        else:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        try:
            st = os.fstat(fd)
            if stat.S_IMODE(st.st_mode) != FILE_MODE:
                os.fchmod(fd, FILE_MODE)
            for suffix, sst in sts.items():
                if suffix and stat.S_IMODE(sst.st_mode) != FILE_MODE:
                    sfd = os.open(name + suffix, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                                  dir_fd=dfd)
                    try:
                        os.fchmod(sfd, FILE_MODE)
                    finally:
                        os.close(sfd)
            return identity(os.fstat(dfd)), identity(st), note
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
