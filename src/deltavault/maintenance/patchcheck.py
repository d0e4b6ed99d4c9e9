"""What restore would refuse of a content reference, for ``check``: a blob of another
length than the reference says (``objects.reader.size_fault``, restore's own check), and,
with ``--read-data``, a patch (a large file's ``Patch``, a volume block's) that does not
apply as restore and the mount apply it (``objects.patch``).

Checking a blob against its id says nothing of whether it parses as a patch of the size
the tree gives it: a writer with the key stored patches that restore and the mount refused
(exit 13, EIO) while ``check --read-data`` passed them. Each patch blob is parsed against
that size with restore's own ``decode_patch``, once per blob and size. The base's length
is ``objects.reader.size_fault``'s to check (by the index, which the data pass compared with
each blob): a base is read back only by restore, not once per patched block by check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from deltavault.errors import DeltavaultError
from deltavault.model.content import ContentRef, Hole, Patch, ref_blob_ids
from deltavault.objects.patch import decode_patch
from deltavault.objects.reader import size_fault
from deltavault.objects.store import BlobReader


def refused(repo: BlobReader, ref: ContentRef, bad: set[bytes], patches: PatchCheck | None) -> str | None:
    """Why restore would refuse ``ref`` (None: it would not, or its blobs are missing or
    damaged, which is reported as such): a blob of another length than it says, or, with
    ``patches`` (``check --read-data``), a patch that does not apply."""
    if isinstance(ref, Hole):
        return None
    if any(b in bad for b in ref_blob_ids(ref)):
        return None
    fault = size_fault(repo, ref)
    if fault is None and patches is not None and isinstance(ref, Patch):
        fault = patches.fault(ref)
    return fault


class PatchCheck:
    """Remembers the (patch, size) pairs parsed, so a chain shared by many snapshots is
    parsed once. ``read``: whether the data pass read a blob's pack (every pack with
    ``--read-data``, a subset's with ``--read-data-subset``): only those patches are
    parsed, so a subset reads no other pack."""

    def __init__(self, repo: BlobReader, bad: set[bytes], read: Callable[[bytes], bool]) -> None:
        self._repo = repo
        self._bad = bad  # blobs already reported missing or damaged: not reported twice
        self._read = read
        self._sound: set[tuple[bytes, int]] = set()
        self._faults: dict[tuple[bytes, int], str] = {}

    def _todo(self, p: bytes, size: int) -> bool:
        """Whether patch ``p`` is yet to be parsed for ``size`` (not if missing or damaged:
        reported as such; nor if its pack is not among those read)."""
        return ((p, size) not in self._sound and (p, size) not in self._faults and p not in self._bad
                and self._read(p))

    def _parse(self, p: bytes, data: bytes, size: int) -> None:
        try:
            decode_patch(data, size)
        except DeltavaultError as exc:
            self._faults[p, size] = f"patch {p.hex()[:16]} does not apply: {exc}"
        else:
            self._sound.add((p, size))

    def prime(self, refs: Iterable[ContentRef]) -> None:
        """Parse the patches of ``refs`` (a file's, a block map's) with their blobs read
        together, neighbours in a pack in one request, rather than one read per patch."""
        sizes: dict[bytes, set[int]] = {}
        for r in refs:
            for p in r.patches if isinstance(r, Patch) else []:
                if self._todo(p, r.size):
                    sizes.setdefault(p, set()).add(r.size)
        try:
            for p, data in self._repo.load_blobs(list(sizes)) if sizes else []:
                for size in sizes[p]:
                    self._parse(p, data, size)
        except DeltavaultError:
            pass  # a blob that does not load: ``fault`` loads each left and says which

    def fault(self, ref: Patch) -> str | None:
        """Why restore would refuse ``ref``'s patches, or None."""
        for p in ref.patches:
            if self._todo(p, ref.size):
                try:
                    self._parse(p, self._repo.load_blob(p), ref.size)
                except DeltavaultError as exc:
                    return f"patch {p.hex()[:16]}: {exc}"
            if (p, ref.size) in self._faults:
                return self._faults[p, ref.size]
        return None
