"""Where each source path of a backup goes in the snapshot, and back.

A source is an entry at the top of the snapshot, named by its base name (``/srv/data`` is
``data``). Sources that would share a name (``/srv/a/x.conf`` and ``/srv/b/x.conf``, as
``--files-from`` lists often give) are stored under their deepest common directory instead
(``srv``), holding only them and the directories that lead to them. The rule depends on
the recorded paths alone, so commands that read a snapshot (restore, find, rewrite) find
each entry's original location again with ``source_roots(snapshot.paths)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from deltavault.fs.patterns import PatternSet, components


@dataclass
class SourceRoot:
    path: str  # the directory (or file) walked, absolute
    name: bytes  # its name at the top of the snapshot
    # Snapshot paths (name/...) of the listed sources below ``path``, when it was not itself
    # listed: the walk keeps only these, what is below them, and the directories above them.
    only: set[bytes] | None = None
    members: list[str] = field(default_factory=list)  # the listed paths it holds


def top_name(path: str) -> bytes:
    name = os.fsencode(os.path.basename(path.rstrip("/")))
    return name or b"root"


def source_roots(paths: list[str]) -> list[SourceRoot]:
    """The entries at the top of a snapshot of ``paths`` (absolute, as recorded), in order
    of first appearance. A path below another listed one is held by that one."""
    norm = list(dict.fromkeys(os.path.normpath(p) for p in paths))
    listed = set(norm)
    norm = [p for p in norm if not any(a in listed for a in _ancestors(p))]
    groups: dict[str, list[str]] = {p: [p] for p in norm}  # root -> members
    while True:
        by_name: dict[bytes, list[str]] = {}
        for root in groups:
            by_name.setdefault(top_name(root), []).append(root)
        clash = next((roots for roots in by_name.values() if len(roots) > 1), None)
        if clash is None:
            break
        common = os.path.commonpath(clash)
        members = [m for r in clash for m in groups.pop(r)]
        groups.setdefault(common, []).extend(members)
    order = {p: i for i, p in enumerate(norm)}
    out: list[SourceRoot] = []
    for root, members in sorted(groups.items(), key=lambda kv: min(order[m] for m in kv[1])):
        name = top_name(root)
        only = None
        if members != [root]:
            only = {name + b"/" + os.fsencode(os.path.relpath(m, root)) for m in members}
        out.append(SourceRoot(root, name, only, members))
    return out


def _ancestors(path: str) -> list[str]:
    out: list[str] = []
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return out
        out.append(parent)
        path = parent


def original_path(roots: list[SourceRoot], snap_path: bytes) -> bytes | None:
    """The absolute path an entry of the snapshot (``name/...``) was read from."""
    name, _, rest = snap_path.partition(b"/")
    for r in roots:
        if r.name == name:
            base = os.fsencode(r.path)
            return base + (b"/" + rest if rest and base != b"/" else rest if rest else b"")
    return None


def snapshot_path(roots: list[SourceRoot], path: str) -> bytes:
    """Where the user's ``path`` is in the snapshot: an original absolute path
    (``/srv/data/a``) is translated by its source; anything else is taken as a path inside
    the snapshot (``data/a``, or ``/data/a``)."""
    if path.startswith("/"):
        norm = os.path.normpath(path)
        for r in roots:
            if r.path == "/" or norm == r.path or norm.startswith(r.path + "/"):
                rest = norm[len(r.path):].strip("/") if r.path != "/" else norm.strip("/")
                candidate = r.name + (b"/" + os.fsencode(rest) if rest else b"")
                if r.only is None or any(candidate == o or candidate.startswith(o + b"/") or
                                         o.startswith(candidate + b"/") for o in r.only):
                    return candidate
    return os.fsencode("/".join(c for c in path.split("/") if c and c != "."))


class SnapshotMatcher:
    """Patterns (fs.patterns) for the entries of one snapshot: an entry matches if its path
    inside the snapshot (``data/a``) or its original path (``/srv/data/a``) does."""

    def __init__(self, patterns: PatternSet, paths: list[str]) -> None:
        self.patterns = patterns
        self.roots = source_roots(paths)

    def _forms(self, snap_path: bytes) -> list[list[str]]:
        orig = original_path(self.roots, snap_path)
        return [components(snap_path)] + ([components(orig)] if orig is not None else [])

    def matches(self, snap_path: bytes) -> bool:
        return any(self.patterns.matches(c) for c in self._forms(snap_path))

    def may_match_below(self, snap_path: bytes) -> bool:
        return any(self.patterns.may_match_below(c) for c in self._forms(snap_path))
