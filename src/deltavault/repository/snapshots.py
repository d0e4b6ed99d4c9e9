"""Snapshots: sealed, content-addressed documents under ``snapshots/``, naming a tree (files)
or a volume manifest. Saving one is the last write of a backup: what it names is stored
and indexed before it."""

from __future__ import annotations

import getpass
import os
from datetime import UTC, datetime
from typing import Any

import blake3
import msgspec

from deltavault import __version__
from deltavault.backends.base import Backend
from deltavault.errors import CorruptionError, FormatError, ObjectNotFound, Undecodable, UsageError
from deltavault.framing import decode_msgpack
from deltavault.fs.paths import shown
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import ID_LEN, match_prefix
from deltavault.repository.cache import ObjectCache
from deltavault.repository.envelope import Envelope
from deltavault.repository.indexstore import WriteStats

SNAPSHOT_AAD = b"snapshot"


def short_id(snap_id: str) -> str:
    # An id is an object's name in the storage, which anyone who can write there may choose.
    return shown(snap_id[:8])


def new_snapshot(*, start_ns: int, **fields: Any) -> Snapshot:
    """The snapshot of a backup run that started at ``start_ns``: stamped with that time,
    this user and this program; ``fields`` are the rest (kind, paths, tree or volume...)."""
    when = datetime.fromtimestamp(start_ns / 1e9, UTC).isoformat().replace("+00:00", "Z")
    return Snapshot(time=when, time_ns=start_ns, username=_user(), program=f"deltavault {__version__}",
                    **fields)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


class SnapshotStore:
    def __init__(self, backend: Backend, env: Envelope, cache: ObjectCache, stats: WriteStats) -> None:
        self.backend = backend
        self.env = env
        self.cache = cache
        self.stats = stats
        self.damaged: dict[str, str] = {}  # snapshot id -> why list() left it out
        self._opened: dict[str, Snapshot] = {}  # snapshot id -> the snapshot list() read

    def save(self, snap: Snapshot) -> str:
        sealed = self.env.seal(msgspec.msgpack.encode(snap), aad=SNAPSHOT_AAD)
        sid = blake3.blake3(sealed).hexdigest()
        name = f"snapshots/{sid}"
        self.backend.put(name, sealed)
        self.cache.put(name, sealed)
        self.stats.add(bytes_written=len(sealed))
        return sid

    def ids(self) -> list[str]:
        return [o.name.rsplit("/", 1)[-1] for o in self.backend.list("snapshots/")]

    def load(self, sid: str) -> Snapshot:
        name = f"snapshots/{sid}"
        return self._decode(sid, self.cache.fetch(name))

    def _decode(self, sid: str, sealed: bytes) -> Snapshot:
        raw = self.env.open(sealed, aad=SNAPSHOT_AAD, what=f"snapshot {short_id(sid)}")
        try:
            snap = decode_msgpack(raw, Snapshot)
        except Undecodable as exc:
            raise FormatError(f"snapshot {short_id(sid)} does not parse: {exc}") from exc
        if snap.tree is not None and len(snap.tree) != ID_LEN:
            raise FormatError(f"snapshot {short_id(sid)}: bad tree id")
        return snap

    def list(self) -> list[tuple[str, Snapshot]]:
        """Every readable snapshot, oldest first. One that cannot be read (damaged, tampered
        with) is left out and named in ``damaged``: it must not stop a backup or a restore
        of another snapshot. Commands that delete data (prune) load each snapshot
        themselves and refuse instead.

        At scale (10,000 snapshots) the work is reading the objects, not opening them: the
        cached ones are read through one opened directory, the rest downloaded on a few
        threads (``ObjectCache.fetch_many``), and each is still checked against its name
        and authenticated here. A snapshot is named by its content, so one opened in this
        process is not opened again: a command that lists twice (resolve 'latest', then
        filter) pays once."""
        ids = self.ids()
        todo = [sid for sid in ids if sid not in self._opened]
        if todo:
            for sid, got in self.cache.fetch_many("snapshots", todo,
                                                  on_error=(ObjectNotFound, CorruptionError)).items():
                if isinstance(got, Exception):  # ObjectNotFound: forgotten since it was listed
                    if isinstance(got, CorruptionError):
                        self.damaged[sid] = got.message
                    continue
                try:
                    self._opened[sid] = self._decode(sid, got)
                except CorruptionError as exc:
                    self.damaged[sid] = exc.message
            self.cache.prune("snapshots", {f"snapshots/{s}" for s in ids})
        out = [(sid, self._opened[sid]) for sid in ids if sid in self._opened]
        out.sort(key=lambda x: (x[1].time_ns, x[0]))
        return out

    def delete(self, sid: str) -> None:
        self.backend.delete(f"snapshots/{sid}")
        self.cache.remove(f"snapshots/{sid}")
        self._opened.pop(sid, None)

    def resolve(self, ref: str, *, source_id: str | None = None,
                kind: str | None = None) -> tuple[str, Snapshot]:
        """'latest', 'latest:PATH' (the newest snapshot of PATH), a full id, or a unique
        prefix of one. ``kind`` narrows 'latest' to files or volume snapshots."""
        if ref == "latest" or ref.startswith("latest:"):
            snaps = self.list()
            if source_id is not None:
                snaps = [s for s in snaps if s[1].source_id == source_id]
            if kind is not None:
                snaps = [s for s in snaps if s[1].kind == kind]
            path = ref.partition(":")[2]
            if path:
                want = os.path.abspath(path)
                snaps = [s for s in snaps if want in s[1].paths]
            if not snaps:
                what = " ".join(x for x in (kind, "snapshot") if x) + (f" of {path}" if path else "")
                raise UsageError(f"the repository has no {what} yet")
            return snaps[-1]
        sid = match_prefix(self.ids(), ref.lower(), "snapshot")
        return sid, self.load(sid)


def select_snapshots(snaps: list[tuple[str, Snapshot]], *, hosts: list[str] | None = None,
                     tags: list[str] | None = None, paths: list[str] | None = None) -> list[tuple[str, Snapshot]]:
    """The snapshots the usual filters keep, as restic reads them: any of ``hosts``; any of
    ``tags``, where one entry may join tags with commas to ask for all of them (``a,b``);
    and every one of ``paths`` (absolute) among the snapshot's paths."""
    want_paths = [os.path.abspath(p) for p in paths or []]
    groups = [{t for t in entry.split(",") if t} for entry in tags or []]
    out = []
    for sid, s in snaps:
        if hosts and s.hostname not in hosts:
            continue
        if groups and not any(g <= set(s.tags) for g in groups):
            continue
        if want_paths and not all(p in s.paths for p in want_paths):
            continue
        out.append((sid, s))
    return out
