"""Packs on the backend against the index: one listing of ``data/`` (names and sizes, no
data) at the start of a run that writes.

A pack an index file names may be gone (deleted by hand, a storage fault, a lifecycle rule)
or cut short. A backup that deduplicated against its blobs would write a snapshot naming
data that no longer exists, silently, until a check. So a backup starts with
``check_packs``: the blobs of a missing pack, and those beyond the listed end of a short
one, count as absent and are stored again. The index files keep naming them until ``repair``
rebuilds the index, but the files this run writes name those packs as gone, so every later
load finds the new copies first (indexstore.py). The same listing adopts packs no index names (a
crashed writer's), whose headers alone are read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deltavault.errors import CorruptionError, FormatError, ObjectNotFound
from deltavault.model.types import ID_LEN
from deltavault.repository.indexstore import IndexStore, PackList
from deltavault.repository.pack import (
    MAGIC,
    PackEntry,
    pack_name,
    parse_header,
    parse_tail,
    tail_size,
)


@dataclass
class PackCheck:
    """What ``check_packs`` found."""

    listed: int = 0  # packs on the backend
    adopted: int = 0  # packs no index named, indexed from their headers
    missing: list[bytes] = field(default_factory=list)  # indexed packs not on the backend
    truncated: list[bytes] = field(default_factory=list)  # indexed packs shorter than their blobs' end
    dropped: int = 0  # index entries treated as absent because of them

    def warning(self, run: str = "backup") -> str:
        """The sentence a ``run`` (backup, copy) reports, or "" when every indexed pack is whole."""
        if not self.missing and not self.truncated:
            return ""
        what = [f"{len(self.missing)} pack(s) missing"] if self.missing else []
        what += [f"{len(self.truncated)} pack(s) truncated"] if self.truncated else []
        return (f"{' and '.join(what)} in the repository ({self.dropped} index entries dropped): their "
                f"blobs were stored again where this {run} needed them, so its snapshots are complete; "
                "older snapshots may have lost data: run 'deltavault check', then 'deltavault repair'")


def list_pack_names(store: IndexStore) -> dict[bytes, int]:
    """Every pack on the backend, with its size (one paginated listing)."""
    out: dict[bytes, int] = {}
    for o in store.backend.list("data/"):
        h = o.name.rsplit("/", 1)[-1]
        try:
            pid = bytes.fromhex(h)
        except ValueError:
            continue
        if len(pid) == ID_LEN:
            out[pid] = o.size
    return out


GUESS_MAX = 4 * 1024 * 1024  # the most read_pack_header reads first (a header of ~60,000 blobs)


def read_pack_header(store: IndexStore, pack_id: bytes, size: int | None = None,
                     guess: int = 64 * 1024) -> list[PackEntry]:
    """``guess``: the bytes read first from the end (a second read follows if the header is
    longer). ``check`` passes what the index implies (the pack's size less the end of its
    last blob), so a sound pack's header comes in one read of exactly its bytes: on S3, a
    second read of a pack is taken by the read-ahead as a scan and fetches the pack whole."""
    name = pack_name(pack_id)
    if size is None:
        size = store.backend.stat(name).size
    if size < len(MAGIC) + tail_size():
        raise FormatError(f"pack {name}: truncated ({size} bytes)")
    # At most GUESS_MAX first: a pack longer than its index implies (another swapped in, bytes
    # appended, a store misreporting its size) must not be read whole; its header then comes
    # in a second read, bounded by MAX_HEADER, as it always did.
    guess = min(size, max(min(guess, GUESS_MAX), tail_size()))
    tail = store.backend.get(name, size - guess, guess)
    hlen = parse_tail(tail, size, name)
    need = hlen + tail_size()
    if need > len(tail):
        tail = store.backend.get(name, size - need, need)
    sealed = tail[len(tail) - need: len(tail) - tail_size()]
    return parse_header(store.env, sealed, size, name)


def adopt_orphan_packs(store: IndexStore, listed: dict[bytes, int] | None = None) -> int:
    """Index packs that a crashed or concurrent writer uploaded but did not index. Only
    their headers are read. ``listed``: the listing of ``data/``, if just made. Returns
    the number adopted."""
    adopted: PackList = []
    index = store.index
    for pid, size in (list_pack_names(store) if listed is None else listed).items():
        if index.has_pack(pid):
            continue
        try:
            entries = read_pack_header(store, pid, size)
        except (CorruptionError, ObjectNotFound):
            continue  # damaged or vanished: left to check/repair
        index.add_pack(pid, entries)
        adopted.append((pid, entries))
    if adopted:
        store.write_file(adopted)
    return len(adopted)


def check_packs(store: IndexStore) -> PackCheck:
    """One listing of ``data/``: adopt orphan packs, and forget (``IndexStore.forget_packs``)
    the blobs of indexed packs that are missing or shorter than the end of their blobs."""
    listed = list_pack_names(store)
    out = PackCheck(listed=len(listed), adopted=adopt_orphan_packs(store, listed))
    limits: dict[bytes, int] = {}
    for pid, end in store.index.pack_ends().items():
        size = listed.get(pid)
        if size is None:
            out.missing.append(pid)
            if end:  # none of its blobs left in the index (stored again before): nothing to drop
                limits[pid] = 0
        elif size < end:
            out.truncated.append(pid)
            limits[pid] = size
    if limits:
        out.dropped = store.forget_packs(limits)
    return out
