"""The change-source interface shared by every kind of changed block tracking.

A change source answers one question: which pages of the volume may have changed since
the checkpoint the previous backup left? It answers with a superset (a page it names may
be unchanged; a page it leaves out must be unchanged), or it refuses with the reason it
cannot be trusted this time. The volume engine tries sources in order and falls back to
block digests, which read everything and always work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pyroaring import BitMap

from deltavault.model.content import PAGE_SIZE
from deltavault.model.volume import Checkpoint, FsInfo, VolumeManifest


class Rejected(Exception):
    """The source cannot be trusted for this run; the message says why."""


def refuse_shared(unchanged: BitMap, others: BitMap, unit: str, unit_bytes: int) -> None:
    """Refuses a file system's metadata digests when a page an unchanged file's mapping
    covers is also claimed by anything else. An unchanged file's digest vouches for its
    blocks only if nothing else writes there: a guest can point a file at the journal, an
    inode table, the MFT or another file's data, and every write there would be missed.
    The message names the first such page in the file system's ``unit`` (of ``unit_bytes``)."""
    shared = unchanged & others
    if shared:
        first = shared.min() * PAGE_SIZE // unit_bytes
        raise Rejected(f"{len(shared)} pages are claimed both by an unchanged file and by "
                       f"metadata or another file (the first at {unit} {first}): the file "
                       "system's mapping cannot vouch for them")


@dataclass
class Changes:
    source: str
    pages: BitMap | None  # pages that may have changed; None: every page
    dirty_bytes: int | None = None  # what the source itself reported, for the report
    notes: list[str] = field(default_factory=list)


class ChangeSource(Protocol):
    name: str

    def changes(self, prev: VolumeManifest | None) -> Changes:
        """Raises Rejected when it cannot answer for this run."""
        ...

    def checkpoint(self) -> Checkpoint | None:
        """What to record for the next run (after ``changes``, or without it)."""
        ...


def find_checkpoint(prev: VolumeManifest | None, source: str) -> Checkpoint:
    if prev is None:
        raise Rejected("no previous volume snapshot to compare with")
    for c in prev.checkpoints:
        if c.source == source:
            return c
    raise Rejected("the previous snapshot left no checkpoint for this source")


@dataclass
class Allocation:
    """What a file system uses, in volume pages."""

    info: FsInfo
    fs_pages: int  # pages from the start of the volume the file system covers
    allocated: BitMap  # pages holding anything in use (rounded outward)


UNITS = {"ext4": "inodes", "ntfs": "MFT records"}  # what a file system's metadata digests cover


@dataclass
class DigestScan:
    """Metadata digests of one run and the pages the comparison says must be read."""

    digests: dict[int, bytes]  # inode / MFT record number -> digest
    must_read: BitMap  # every page of the volume minus the data of unchanged files
    objects: int = 0
    changed_objects: int = 0
    # per partition of a partitioned disk, e.g. "partition 2 (ntfs): 3 of 250 MFT records changed"
    details: list[str] = field(default_factory=list)


class FsScanner(Protocol):
    kind: str
    info: FsInfo
    distrust: str  # why the on-disk metadata cannot be trusted now; "" if it can

    def allocation(self) -> Allocation: ...

    def digest_scan(self, prev: dict[int, bytes] | None) -> DigestScan: ...


class BlockDigestSource:
    """The fallback: every page may have changed; comparing page digests finds out which."""

    name = "block-digests"

    def changes(self, prev: VolumeManifest | None) -> Changes:
        return Changes(self.name, None)

    def checkpoint(self) -> Checkpoint | None:
        return None
