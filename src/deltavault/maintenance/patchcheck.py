"""``check --read-data``: whether each patched reference (a large file's ``Patch``, a volume
block's) would apply, as restore and the mount apply it (``objects.patch``).

Checking a blob against its id says nothing of whether it parses as a patch of the size
the tree gives it: a writer with the key stored patches that restore and the mount refused
(exit 13, EIO) while ``check --read-data`` passed them. Each patch blob is parsed against
that size with restore's own ``decode_patch``, once per blob and size; the base's length
is the one the index records, which the data pass compared with the blob itself (a base
is read back only by restore: check reads every pack once, not a base per patched block).
"""

from __future__ import annotations

from typing import Protocol

from deltavault.errors import DeltavaultError
from deltavault.model.content import Patch
from deltavault.objects.patch import check_base, decode_patch
from deltavault.objects.store import BlobLoader


class SizedLoader(BlobLoader, Protocol):
    def blob_size(self, blob_id: bytes) -> int | None: ...


class PatchCheck:
    """Remembers the (patch, size) pairs found sound, so a chain shared by many snapshots
    is parsed once."""

    def __init__(self, repo: SizedLoader, bad: set[bytes]) -> None:
        self._repo = repo
        self._bad = bad  # blobs already reported missing or damaged: not reported twice
        self._sound: set[tuple[bytes, int]] = set()

    def fault(self, ref: Patch) -> str | None:
        """Why restore would refuse ``ref``, or None."""
        base = self._repo.blob_size(ref.base)
        try:
            if base is not None and ref.base not in self._bad:
                check_base(base, ref.size)
        except DeltavaultError as exc:
            return f"blob {ref.base.hex()[:16]}: {exc}"
        for p in ref.patches:
            if (p, ref.size) in self._sound or p in self._bad or self._repo.blob_size(p) is None:
                continue  # sound, or missing or damaged: reported as such
            try:
                decode_patch(self._repo.load_blob(p), ref.size)
            except DeltavaultError as exc:
                return f"blob {p.hex()[:16]}: {exc}"
            self._sound.add((p, ref.size))
        return None
