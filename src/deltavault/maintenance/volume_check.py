"""Volume snapshots in a check: whether every blob a volume manifest references is present
and undamaged.

Restoring needs the block maps and every block's blobs; verifying a restore and the next
incremental need the page digests. All of those are errors when missing. The change
sources' state (metadata digests) only speeds up the next backup: its loss is a warning.
"""

from __future__ import annotations

from typing import Protocol

from deltavault.errors import DeltavaultError
from deltavault.maintenance.findings import CheckIssue, CheckReport
from deltavault.maintenance.patchcheck import PatchCheck, refused
from deltavault.model.content import ref_blob_ids
from deltavault.objects.store import BlobReader
from deltavault.objects.volumes import load_manifest, load_segment_map

MAX_LISTED = 5


class IndexedRepo(BlobReader, Protocol):
    def has_blob(self, blob_id: bytes) -> bool: ...


def check_volume_manifest(repo: IndexedRepo, rep: CheckReport, sid: str, manifest_id: bytes,
                          bad: set[bytes], patches: PatchCheck | None = None) -> bool:
    """Each block's references as restore would take them (``patchcheck.refused``); with
    ``patches`` (``check --read-data``), their patches parsed too."""
    def note(kind: str, msg: str, severity: str = "error") -> None:
        rep.add(CheckIssue(kind, f"snapshot {sid[:8]}: (volume): {msg}", snapshot=sid, path="(volume)",
                           severity=severity))
        if severity == "error":
            rep.affected.setdefault(sid, []).append("(volume)")

    def lost(b: bytes) -> bool:
        return b in bad or not repo.has_blob(b)

    try:
        m = load_manifest(repo, manifest_id)
    except DeltavaultError as exc:
        note("tree", f"volume manifest unreadable: {exc}")
        return False
    ok = True
    for c in m.checkpoints:
        gone = [b for b in c.state if lost(b)]
        if gone:
            note("missing", f"{c.source} checkpoint state: {len(gone)} blob(s) missing or damaged; the "
                            "next backup cannot use this source and reads more", severity="warning")
    damaged_blocks: list[int] = []
    refused_at: list[str] = []  # the first blocks restore refuses: "offset (why)"
    n_refused = 0
    for i, seg in enumerate(m.segments):
        if lost(seg.digests):
            ok = False
            note("missing", f"segment {i}: page digests missing or damaged")
        if lost(seg.map):
            ok = False
            note("tree", f"segment {i}: block map missing or damaged; {m.segment_pages * m.page_size} bytes "
                         "of the volume cannot be restored")
            continue
        try:
            bm = load_segment_map(repo, m, i)
        except DeltavaultError as exc:
            ok = False
            note("tree", f"segment {i}: block map unreadable: {exc}")
            continue
        if patches is not None:
            patches.prime(bm.refs)
        for j, r in enumerate(bm.refs):
            if any(lost(b) for b in ref_blob_ids(r)):
                damaged_blocks.append(bm.first + j)
            elif (fault := refused(repo, r, bad, patches)) is not None:
                n_refused += 1
                if len(refused_at) < MAX_LISTED:
                    refused_at.append(f"{(bm.first + j) * m.block_size} ({fault})")
    if damaged_blocks:
        ok = False
        listed = _listed([str(b * m.block_size) for b in damaged_blocks[:MAX_LISTED]], len(damaged_blocks))
        note("missing", f"{len(damaged_blocks)} block(s) of {m.block_size} bytes have missing or damaged "
                        f"blobs, at byte offsets {listed}")
    if refused_at:
        ok = False
        note("tree", f"{n_refused} block(s) of {m.block_size} bytes that restore refuses (so the volume), "
                     f"at byte offsets {_listed(refused_at, n_refused)}")
    return ok


def _listed(first: list[str], count: int) -> str:
    """The first few of ``count`` items, and how many more."""
    return ", ".join(first) + (f" and {count - len(first)} more" if count > len(first) else "")
