"""Immutable backups: S3 Object Lock retention on what a repository stores.

A repository created with ``init --immutable DAYS`` records ``governance:DAYS`` or
``compliance:DAYS`` in its config (authenticated by the config's MAC). Every object it
writes from then on, except lock records, carries Object Lock retention until DAYS after the
write: nobody (compliance) or nobody without the bypass permission (governance) can delete
or overwrite that version before then, whatever credentials leaked. Prune and forget skip
what is still retained and say so; check reports objects whose retention is missing or
was shortened. See docs/design.md, "Immutable backups".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

from deltavault.backends.base import unwrap
from deltavault.errors import UsageError

MODES = ("governance", "compliance")
# Retain-until dates come from the writer's clock and write times from the server's; a
# shortfall below this is clock skew, not tampering.
SLACK = timedelta(hours=1)


@dataclass(frozen=True)
class Retention:
    mode: str  # governance | compliance
    days: int

    def __str__(self) -> str:
        return f"{self.mode}:{self.days}"

    @classmethod
    def parse(cls, text: str) -> Retention:
        mode, _, days = text.partition(":")
        if mode not in MODES or not days.isdigit() or not 1 <= int(days) <= 36500:
            raise UsageError(f"retention {text!r}: expected governance:DAYS or compliance:DAYS")
        return cls(mode, int(days))


@dataclass(frozen=True)
class ObjectRetention:
    name: str
    written: datetime  # the server's Last-Modified of the current version
    mode: str | None  # governance | compliance | None (no retention)
    until: datetime | None


def protected(name: str) -> bool:
    """Whether objects of this name carry retention: all but lock records, which are
    rewritten every two minutes and removed when released."""
    return not name.startswith("locks/")


@runtime_checkable
class RetentionStore(Protocol):
    """What a backend offers for immutable backups (the S3 backend)."""

    retention: Retention | None  # what writes carry now (None: nothing)

    def enable_retention(self, retention: Retention, *, verify: bool) -> None:
        """Writes from now on carry ``retention``. ``verify``: first make sure the bucket
        has Object Lock enabled (UsageError if not)."""
        ...

    def retention_of(self, names: Iterable[str]) -> dict[str, ObjectRetention]:
        """The retention of each current object (missing ones are left out)."""
        ...


def apply(backend: object, spec: str, *, creating: bool) -> Retention | None:
    """Make ``backend`` write with the retention ``spec`` of a repository config. Creating a
    repository on a store without Object Lock is refused; opening an immutable repository
    copied to such a store (a local copy) just reads it."""
    if not spec:
        return None
    retention = Retention.parse(spec)
    store = unwrap(backend)
    if not isinstance(store, RetentionStore):
        if creating:
            raise UsageError("immutable backups need a repository on S3 with Object Lock (-r s3:...)")
        return None
    store.enable_retention(retention, verify=creating)
    return retention


def store_of(backend: object) -> RetentionStore | None:
    store = unwrap(backend)
    return store if isinstance(store, RetentionStore) else None


def still_retained(backend: object, names: Iterable[str], now: datetime | None = None) -> dict[str, datetime]:
    """Of ``names``, those whose retention has not ended yet, with its end."""
    store = store_of(backend)
    if store is None or store.retention is None:
        return {}
    now = now or datetime.now(UTC)
    return {n: r.until for n, r in store.retention_of(names).items() if r.until is not None and r.until > now}


def audit(backend: object, retention: Retention, names: Iterable[str]) -> list[tuple[str, str]]:
    """Objects whose retention is missing, of another mode, or ends before ``retention.days``
    after they were written: (name, problem) pairs."""
    store = store_of(backend)
    if store is None:
        return []
    out = []
    want = timedelta(days=retention.days)
    for name, r in sorted(store.retention_of(n for n in names if protected(n)).items()):
        if r.until is None:
            out.append((name, f"has no Object Lock retention (written {r.written:%Y-%m-%d %H:%M} UTC); "
                              f"the repository asks for {retention}"))
        elif r.until < r.written + want - SLACK:
            out.append((name, f"retention ends {r.until:%Y-%m-%d %H:%M} UTC, before the {retention.days} days "
                              f"after its write ({r.written:%Y-%m-%d %H:%M} UTC): it was shortened"))
        elif r.mode != retention.mode:
            out.append((name, f"is retained in {r.mode} mode, the repository asks for {retention.mode}"))
    return out
