"""What a check found: issues, the blobs found damaged, and the snapshots and paths they hit.

Shared by the check of file trees (check.py) and of volume manifests (volume_check.py),
and read by repair, which starts from a check.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CheckIssue:
    kind: str  # index | pack | snapshot | tree | blob | missing | orphan
    message: str
    snapshot: str | None = None
    path: str | None = None
    severity: str = "error"  # error | warning


@dataclass
class CheckReport:
    issues: list[CheckIssue] = field(default_factory=list)
    snapshots: int = 0
    packs: int = 0
    blobs_checked: int = 0
    bytes_read: int = 0
    packs_read: int = 0
    headers_read: int = 0  # packs whose header alone was read (``check --read-headers``)
    headers_checked: int = 0  # indexed packs whose header was compared with the index: alone or read whole
    damaged_blobs: set[bytes] = field(default_factory=set)
    affected: dict[str, list[str]] = field(default_factory=dict)  # snapshot -> paths

    @property
    def errors(self) -> list[CheckIssue]:
        return [i for i in self.issues if i.severity == "error"]

    def add(self, issue: CheckIssue) -> None:
        self.issues.append(issue)
