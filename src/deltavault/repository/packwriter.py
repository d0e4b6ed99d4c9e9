"""Writes already sealed blobs into new packs (prune's repack, repair's salvage).

Sealed bytes are copied as they are: no re-encryption, and the caller has checked them.
Data and tree/meta blobs go to separate packs, as the repository's own writer does.
"""

from __future__ import annotations

from deltavault.model.types import BlobType
from deltavault.repository.pack import PackBuilder, PackEntry, pack_name
from deltavault.repository.repository import Repository


class PackWriter:
    def __init__(self, repo: Repository) -> None:
        self.repo = repo
        self._builders: dict[bool, PackBuilder] = {}
        self.written: list[tuple[bytes, list[PackEntry]]] = []
        self.bytes_written = 0

    def add(self, btype: int, blob_id: bytes, sealed: bytes, raw_length: int) -> None:
        is_data = btype == BlobType.DATA
        b = self._builders.get(is_data)
        if b is None:
            b = self._builders[is_data] = PackBuilder()
        b.add(BlobType(btype), blob_id, (sealed, b""), raw_length)
        if len(b) >= self.repo.config.pack_size:
            self._upload(self._builders.pop(is_data))

    def _upload(self, b: PackBuilder) -> None:
        pid, data, entries = b.finish(self.repo.env)
        self.repo.backend.put(pack_name(pid), data)
        self.written.append((pid, entries))
        self.bytes_written += len(data)

    def finish(self) -> list[tuple[bytes, list[PackEntry]]]:
        for b in self._builders.values():
            if b.entries:
                self._upload(b)
        self._builders.clear()
        return self.written
