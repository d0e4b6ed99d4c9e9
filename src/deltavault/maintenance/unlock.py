"""``unlock``: remove locks their holders left behind. A lock is stale when its holder
stopped refreshing it long ago, or is a process of this very boot of this host that is gone
(locks.py); those go. ``remove_all`` removes live ones too, for when the holder is known to
be dead but cannot be proved so (another host that was switched off)."""

from __future__ import annotations

from dataclasses import dataclass

from deltavault.errors import ObjectNotFound
from deltavault.repository.locks import LockInfo
from deltavault.repository.repository import Repository


@dataclass
class LockReport:
    name: str
    info: LockInfo
    stale: bool
    removed: bool


def unlock(repo: Repository, *, remove_all: bool = False) -> list[LockReport]:
    out = []
    for name, info in repo.locks.list_locks():
        stale = repo.locks.is_stale(info)
        removed = False
        if stale or remove_all:
            try:
                repo.backend.delete(name)
            except ObjectNotFound:
                pass  # its holder let it go meanwhile
            removed = True
        out.append(LockReport(name, info, stale, removed))
    return out
