"""Status records under ``status/``: the last checks' results and the backups that failed,
which no snapshot records. Small sealed documents (AAD ``status``), named
``status/<kind>-<time_ns, 20 digits>-<BLAKE3 of the sealed bytes, 32 hex>`` so a reader
finds the newest of a kind from the listing alone, and checks the name against the content.

Writing one is best effort: a report is worse without it, a backup or check is not, so
failures to write are returned, never raised. Each kind keeps its newest ``KEEP`` records;
older ones that cannot be deleted yet (Object Lock retention) stay, and go once they can.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Protocol

import blake3
import msgspec

from deltavault.backends.base import Backend
from deltavault.errors import (
    BackendError,
    CorruptionError,
    DeltavaultError,
    FormatError,
    ObjectNotFound,
    Undecodable,
)
from deltavault.framing import decode_msgpack
from deltavault.model.status import FAILED, KINDS, STATUS_VERSION, StatusRecord
from deltavault.repository.envelope import Envelope

STATUS_AAD = b"status"
KEEP = {"check": 20, "failed": 200}
_NAME = re.compile(r"status/([a-z]+)-(\d{20})-([0-9a-f]{32})")


def rfc3339(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat().replace("+00:00", "Z")


class StatusStore:
    def __init__(self, backend: Backend, env: Envelope) -> None:
        self.backend = backend
        self.env = env
        self.damaged: dict[str, str] = {}  # name -> why it was left out

    def save(self, rec: StatusRecord) -> str | None:
        """Store ``rec`` and trim its kind to KEEP; the reason it failed, or None."""
        sealed = self.env.seal(msgspec.msgpack.encode(rec), aad=STATUS_AAD)
        name = f"status/{rec.kind}-{rec.time_ns:020d}-{blake3.blake3(sealed).hexdigest()[:32]}"
        try:
            self.backend.put(name, sealed)
        except DeltavaultError as exc:
            return exc.message
        try:
            for old in self.names(rec.kind)[:-KEEP.get(rec.kind, 20)]:
                self.backend.delete(old)
        except DeltavaultError:
            pass  # saved all the same; an immutable repository keeps old ones until their retention ends
        return None

    def names(self, kind: str) -> list[str]:
        """Names of ``kind``'s records, oldest first."""
        out: list[tuple[int, str]] = []
        for o in self.backend.list("status/"):  # backends list folders, not name prefixes
            m = _NAME.fullmatch(o.name)
            if m and m.group(1) == kind:
                out.append((int(m.group(2)), o.name))
        return [n for _, n in sorted(out)]

    def load(self, name: str) -> StatusRecord:
        m = _NAME.fullmatch(name)
        if m is None or m.group(1) not in KINDS:
            raise FormatError(f"{name}: not a status record name")
        sealed = self.backend.get(name)
        if blake3.blake3(sealed).hexdigest()[:32] != m.group(3):
            raise CorruptionError(f"{name}: content does not match its name (damaged)")
        raw = self.env.open(sealed, aad=STATUS_AAD, what=name)
        try:
            rec = decode_msgpack(raw, StatusRecord)
        except Undecodable as exc:
            raise FormatError(f"{name} does not parse: {exc}") from exc
        # an authentic record under another record's name would misdate it
        if rec.kind != m.group(1) or rec.time_ns != int(m.group(2)) or rec.v != STATUS_VERSION:
            raise FormatError(f"{name}: its content does not match its name")
        return rec

    def records(self, kind: str, *, newest: int | None = None, since_ns: int = 0) -> list[StatusRecord]:
        """Readable records of ``kind``, oldest first: the ``newest`` N, from ``since_ns`` on.
        One that cannot be read is left out and named in ``damaged``."""
        names = [n for n in self.names(kind) if int(n.split("-")[1]) >= since_ns]
        out: list[StatusRecord] = []
        for name in reversed(names):
            if newest is not None and len(out) >= newest:
                break
            try:
                out.append(self.load(name))
            except ObjectNotFound:
                continue  # trimmed by another writer since the listing
            except CorruptionError as exc:
                self.damaged[name] = exc.message
        return out[::-1]


def failed_run(*, snapshot_kind: str, source_id: str, paths: list[str], hostname: str, start_ns: int,
               exc: DeltavaultError) -> StatusRecord:
    """The record of a backup run that ended with ``exc``."""
    return StatusRecord(kind=FAILED, time=rfc3339(start_ns), time_ns=start_ns, hostname=hostname, ok=False,
                        message=exc.message, seconds=round((time.time_ns() - start_ns) / 1e9, 3),
                        snapshot_kind=snapshot_kind, source_id=source_id, paths=paths,
                        error=type(exc).__name__, exit_code=int(exc.exit_code))


class StatusSaver(Protocol):
    def save_status(self, rec: StatusRecord) -> str | None: ...


@contextmanager
def failures_recorded(repo: StatusSaver, *, snapshot_kind: str, source_id: str, paths: list[str],
                      hostname: str) -> Iterator[None]:
    """Around a backup run: an error worth it leaves a ``failed`` record, then goes on."""
    start_ns = time.time_ns()
    try:
        yield
    except DeltavaultError as exc:
        if worth_recording(exc):
            repo.save_status(failed_run(snapshot_kind=snapshot_kind, source_id=source_id, paths=paths,
                                        hostname=hostname, start_ns=start_ns, exc=exc))
        raise


def worth_recording(exc: BaseException) -> bool:
    """A failure to record: any expected one except the repository's store failing (the
    record could not be written either, and a retry would only delay the exit)."""
    return isinstance(exc, DeltavaultError) and not isinstance(exc, BackendError)
