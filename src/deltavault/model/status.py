"""Status records: how a `check` or a backup that saved no snapshot went (docs/design.md,
"Status records"). Sealed under ``status/``; reports read them, nothing else needs them."""

from __future__ import annotations

import msgspec

from deltavault.model.snapshot import Seconds

STATUS_VERSION = 1
CHECK = "check"
FAILED = "failed"  # a backup run that ended with an error, so no snapshot records it
KINDS = (CHECK, FAILED)


class StatusRecord(msgspec.Struct, omit_defaults=True, kw_only=True):
    kind: str  # check | failed
    time: str  # RFC 3339, UTC: when the check or run started
    time_ns: int
    hostname: str
    ok: bool = True
    message: str = ""  # failed: the error; check: its summary line
    seconds: Seconds = 0.0
    # check
    errors: int = 0
    warnings: int = 0
    read_data: bool = False  # every pack read (not a subset)
    read_data_subset: str = ""  # check --read-data-subset: the subset read, as given (e.g. 1/5, 10%, 50G)
    snapshots: int = 0
    packs: int = 0
    blobs_checked: int = 0
    # failed
    snapshot_kind: str = ""  # files | volume
    source_id: str = ""
    paths: list[str] = []
    error: str = ""  # the error's type, e.g. SourceError
    exit_code: int = 0
    v: int = STATUS_VERSION
