"""``check --read-data``: whether each patched reference (a large file's ``Patch``, a volume
block's) would apply, as restore and the mount apply it (``objects.patch``).

Checking a blob against its id says nothing of whether it parses as a patch of the size
the tree gives it: a writer with the key stored patches that restore and the mount refused
(exit 13, EIO) while ``check --read-data`` passed them. Each patch blob is parsed against
that size with restore's own ``decode_patch``, once per blob and size. The base's length
is ``objects.reader.size_fault``'s to check (by the index, which the data pass compared with
each blob): a base is read back only by restore, not once per patched block by check.
"""

from __future__ import annotations

from typing import Protocol

from deltavault.errors import DeltavaultError
from deltavault.model.content import ContentRef, Patch, ref_blob_ids
from deltavault.objects.patch import decode_patch
from deltavault.objects.reader import size_fault
from deltavault.objects.store import BlobLoader, BlobSizes


class SizedLoader(BlobLoader, BlobSizes, Protocol):
    pass


def refused(repo: SizedLoader, ref: ContentRef, bad: set[bytes], patches: PatchCheck | None) -> str | None:
    """Why restore would refuse ``ref`` (None: it would not, or its blobs are missing or
    damaged, which is reported as such): a blob of another length than it says, or, with
    ``patches`` (``check --read-data``), a patch that does not apply."""
    if any(b in bad for b in ref_blob_ids(ref)):
        return None
    fault = size_fault(repo, ref)
    if fault is None and patches is not None and isinstance(ref, Patch):
        fault = patches.fault(ref)
    return fault


class PatchCheck:
    """Remembers the (patch, size) pairs found sound, so a chain shared by many snapshots
    is parsed once."""

    def __init__(self, repo: SizedLoader, bad: set[bytes]) -> None:
        self._repo = repo
        self._bad = bad  # blobs already reported missing or damaged: not reported twice
        self._sound: set[tuple[bytes, int]] = set()

    def fault(self, ref: Patch) -> str | None:
        """Why restore would refuse ``ref``'s patches, or None."""
        for p in ref.patches:
            if (p, ref.size) in self._sound or p in self._bad or self._repo.blob_size(p) is None:
                continue  # sound, or missing or damaged: reported as such
            try:
                decode_patch(self._repo.load_blob(p), ref.size)
            except DeltavaultError as exc:
                return f"patch {p.hex()[:16]} does not apply: {exc}"
            self._sound.add((p, ref.size))
        return None
