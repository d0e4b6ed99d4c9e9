"""Change source: file-system metadata digests (ext4 inodes, NTFS MFT records).

The digests of a run are stored with the backup (META blobs named by the checkpoint). The
next run recomputes them, and reads only what no unchanged digest vouches for: the data of
changed files plus all metadata. It refuses when the file system is not the one the digests
belong to (another uuid), when the digests are gone or damaged, or when the metadata on disk
cannot be trusted (a journal needing recovery, a dirty NTFS volume, unknown features).
"""

from __future__ import annotations

import secrets
from array import array
from typing import Protocol

from deltavault.errors import DeltavaultError
from deltavault.model.volume import Checkpoint, DigestState, VolumeManifest, decode, encode
from deltavault.tracking.volume.base import (
    UNITS,
    Changes,
    DigestScan,
    FsScanner,
    Rejected,
    find_checkpoint,
)

NAME = "fs-digests"
ENTRIES_PER_BLOB = 262144  # about 6 MiB of state per META blob


class Meta(Protocol):
    def get(self, blob_id: bytes) -> bytes: ...

    def put(self, data: bytes) -> bytes: ...


def encode_state(fs: str, uuid: str, digests: dict[int, bytes]) -> list[bytes]:
    nums = sorted(digests)
    out = []
    for i in range(0, max(len(nums), 1), ENTRIES_PER_BLOB):
        part = nums[i:i + ENTRIES_PER_BLOB]
        out.append(encode(DigestState(fs=fs, uuid=uuid, nums=array("Q", part).tobytes(),
                                      digests=b"".join(digests[n] for n in part))))
    return out


def decode_state(blobs: list[bytes], fs: str, uuid: str) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for raw in blobs:
        st = decode(raw, DigestState, "metadata digests")
        if st.fs != fs or st.uuid != uuid:
            raise Rejected(f"the stored digests belong to {st.fs} {st.uuid}, not this file system")
        nums = array("Q")
        nums.frombytes(st.nums)
        size = len(st.digests) // len(nums) if nums else 0
        if len(st.digests) != size * len(nums):
            raise Rejected("the stored metadata digests are truncated")
        for i, n in enumerate(nums):
            out[n] = st.digests[i * size:(i + 1) * size]
    return out


class FsDigestSource:
    name = NAME

    def __init__(self, scanner: FsScanner | None, why_none: str, meta: Meta) -> None:
        self.scanner = scanner
        self.why_none = why_none
        self.meta = meta
        self.scan: DigestScan | None = None
        self.id = secrets.token_hex(8)

    def _usable(self) -> FsScanner:
        if self.scanner is None:
            raise Rejected(self.why_none or "no file system this source understands")
        if self.scanner.distrust:
            raise Rejected(self.scanner.distrust)
        return self.scanner

    def changes(self, prev: VolumeManifest | None) -> Changes:
        scanner = self._usable()
        ck = find_checkpoint(prev, NAME)
        info = scanner.info
        if ck.uuid != info.uuid:
            raise Rejected(f"the file system was re-created (uuid {ck.uuid} is now {info.uuid})")
        if not ck.state:
            raise Rejected("the previous metadata digests are missing")
        try:
            prev_digests = decode_state([self.meta.get(b) for b in ck.state], scanner.kind, info.uuid)
        except DeltavaultError as exc:
            raise Rejected(f"the previous metadata digests are missing or damaged: {exc}") from None
        try:
            self.scan = scanner.digest_scan(prev_digests)
        except (DeltavaultError, Rejected):
            raise
        except Exception as exc:  # damaged on-disk metadata: any parse failure
            raise Rejected(f"the {scanner.kind} metadata could not be parsed: {exc}") from None
        unit = UNITS.get(scanner.kind, "inodes and MFT records")
        return Changes(NAME, self.scan.must_read,
                       notes=[f"{self.scan.changed_objects} of {self.scan.objects} {unit} changed",
                              *self.scan.details])

    def checkpoint(self) -> Checkpoint | None:
        try:
            scanner = self._usable()
        except Rejected:
            return None
        if self.scan is None:
            self.scan = scanner.digest_scan(None)
        blobs = [self.meta.put(b) for b in encode_state(scanner.kind, scanner.info.uuid, self.scan.digests)]
        return Checkpoint(source=NAME, id=self.id, uuid=scanner.info.uuid, state=blobs)
