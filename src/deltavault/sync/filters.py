"""Which entries a sync takes: --exclude / --include globs and the snapshot-root defaults.

A pattern without '/' matches an entry's name at any depth; one with '/' matches its path
relative to SRC (a leading '/' is dropped). Exclusion wins over inclusion. With includes,
a file is taken only if it (or a directory above it) matches one; directories are still
walked to find matches. --delete leaves alone what the filters do not take, in SRC
and in DST.
"""

from __future__ import annotations

import fnmatch

# Where Windows keeps per-volume state that no mirror wants; compared case-insensitively.
# .deltavault-snapshots is where btrfs snapshots of SRC's subvolume are made.
DEFAULT_ROOT_EXCLUDES = (b"$recycle.bin", b"system volume information", b".deltavault-snapshots")


class Filter:
    def __init__(self, excludes: list[str], includes: list[str], *, default_excludes: bool = True) -> None:
        self._exclude = [_compile(p) for p in excludes]
        self._include = [_compile(p) for p in includes]
        self.default_excludes = default_excludes

    @property
    def has_includes(self) -> bool:
        return bool(self._include)

    def excluded(self, relpath: bytes, name: bytes) -> bool:
        if self.default_excludes and relpath == name and name.lower() in DEFAULT_ROOT_EXCLUDES:
            return True
        return any(_match(p, relpath, name) for p in self._exclude)

    def included(self, relpath: bytes, name: bytes) -> bool:
        """Only meaningful with includes; a directory that matches includes all below it."""
        return not self._include or any(_match(p, relpath, name) for p in self._include)

    def protects(self, relpath: bytes, name: bytes, *, included: bool) -> bool:
        """Must --delete leave this DST entry alone? Yes when it is excluded, or outside the
        includes: a sync manages only what its filters take (rsync does the same)."""
        return self.excluded(relpath, name) or (not included and not self.included(relpath, name))


def _compile(pattern: str) -> tuple[bytes, bool]:
    raw = pattern.encode("utf-8", "surrogateescape")
    raw = raw.rstrip(b"/") or raw
    if b"/" in raw:
        return raw.lstrip(b"/"), True
    return raw, False


def _match(p: tuple[bytes, bool], relpath: bytes, name: bytes) -> bool:
    pat, by_path = p
    return fnmatch.fnmatchcase(relpath if by_path else name, pat)
