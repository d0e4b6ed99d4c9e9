"""The sources of a file backup: which exist, where each goes in the snapshot (fs.sources)
and where it is read from."""

from __future__ import annotations

import os

from deltavault.backup.files.options import Problem, Source
from deltavault.errors import UsageError
from deltavault.fs.paths import display
from deltavault.fs.sources import source_roots


def plan_sources(paths: list[str], logical: list[str]) -> tuple[list[Source], list[str], list[Problem]]:
    """``paths`` to read, recorded as ``logical`` (the same, or what --as and --snapshot
    give). Returns the sources, the logical paths they hold, and a problem for each path
    that does not exist: the others are still backed up (the run is then partial), as
    restic does; none existing at all is a usage error."""
    present: dict[str, str] = {}  # logical (normalised) -> path to read
    missing = []
    for p, lp in zip(paths, logical, strict=True):
        if os.path.lexists(p):
            present[os.path.normpath(lp)] = p
        else:
            missing.append(Problem(display(os.fsencode(lp)), "missing", "source does not exist; not backed up"))
    if not present:
        what = ", ".join(repr(p) for p in paths)
        raise UsageError(f"no source exists: {what}" if len(paths) > 1 else f"source {what} does not exist")
    out = []
    for root in source_roots(list(present)):
        if root.only is None:
            read = present[root.path]
        elif all(present[m] == m for m in root.members):
            read = root.path
        else:
            raise UsageError(f"two sources share the name {os.fsdecode(root.name)!r}; with --snapshot or "
                             "--as they must be backed up separately")
        out.append(Source(os.fsencode(os.path.abspath(read)), root.name, os.fsencode(root.path), root.only))
    return out, list(present), missing
