"""Remote delta: fetch a file from a peer that has its new version, using a local older
version (the seed) and recursive signatures (chunking/rdc.py), so that only the chunks
the seed lacks, plus a little signature, cross the wire.

Protocol: msgpack frames (sync/wire.py) over any byte stream: in a sync, the channel between
the sender and the receiving agent, where the sender serves the one file it has opened
(sync/sender). The client speaks first.

    {"op": "open", "path": p, "pages": bool} -> {"size", "levels", "top", "digest"}
    {"op": "get", "level": k, "ranges": [[offset, length], ...]}  -> {"data": [bytes, ...]}
    {"op": "bye"}                        -> the server exits

``levels`` counts signature levels; ``top`` is the highest one, sent whole; level 0 is the
file's bytes. The server holds the open file's streams in memory: the sender serves only
files up to ``DELTA_MAX``, read through the fd it opened and checked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import blake3

from deltavault.chunking import rdc
from deltavault.errors import CorruptionError, SourceError
from deltavault.fs.clone import pread_full
from deltavault.sync.wire import Frames

DELTA_MAX = 2 << 30  # both versions are held in memory while a file is rebuilt by delta


class Served:
    """One file's signature streams, answering a fetcher's requests for it."""

    def __init__(self, data: bytes | memoryview, *, pages: bool = False) -> None:
        self.streams = rdc.streams(data, pages=pages)
        self.head = {"size": len(data), "levels": len(self.streams) - 1, "top": bytes(self.streams[-1]),
                     "digest": blake3.blake3(data).digest()}

    def get(self, req: dict[str, Any]) -> dict[str, Any]:
        s = memoryview(self.streams[req["level"]])
        return {"data": [bytes(s[o:o + n]) for o, n in req["ranges"]]}


Loader = Callable[[], "bytes | memoryview | None"]


def load_seed(fd: int, size: int) -> memoryview:
    """A remote delta's seed, DST's older version open as ``fd``: its first ``size`` bytes
    (its size when it was judged worth a delta; fewer if it shrank), whatever its owner has
    extended it to since. (Read to EOF, a seed truncated to some GiB meanwhile, sparse and
    free, was loaded whole.) Any bytes do as a seed: what is rebuilt is checked."""
    data = bytearray(size)
    return memoryview(data)[:pread_full(fd, memoryview(data), 0)]


def serve(chan: Frames, data: Loader) -> None:
    """Answer requests until "bye" or the end of the stream. Every "open" is of the one file
    ``data`` loads (the sender has opened it), loaded when first asked for; a load that
    returns None means the file changed while read, and the fetcher is told."""
    current: Served | None = None
    loaded: bytes | memoryview | None = None
    while True:
        try:
            req = chan.recv()
        except EOFError:
            return
        op = req.get("op")
        if op == "bye":
            return
        try:
            if op == "open":
                loaded = loaded if loaded is not None else data()
                if loaded is None:
                    chan.send({"error": "the file changed while it was read", "changed": True})
                    continue
                current = Served(loaded, pages=bool(req.get("pages")))
                chan.send(current.head)
            elif op == "get" and current is not None:
                chan.send(current.get(req))
            else:
                chan.send({"error": f"unexpected request {op!r}"})
        except (OSError, ValueError, KeyError, IndexError, TypeError, CorruptionError) as exc:
            chan.send({"error": f"{type(exc).__name__}: {exc}"})


@dataclass
class FetchStats:
    size: int
    levels: int
    bytes_sent: int  # requests
    bytes_received: int  # replies: signatures and chunk data, with framing
    data_fetched: int  # file bytes that came over the wire
    data_reused: int  # file bytes taken from the seed
    signature_fetched: int  # signature bytes that came over the wire (all levels)
    signature_full: int  # what the level-0 signature alone would have cost
    digest: bytes = b""  # the file's BLAKE3, checked against the rebuilt content


def _call(chan: Frames, req: dict[str, Any]) -> dict[str, Any]:
    chan.send(req)
    return _reply(chan)


class Changed(SourceError):
    """The remote file changed while the remote read it: its sender tries again."""


def _reply(chan: Frames) -> dict[str, Any]:
    rep: dict[str, Any] = chan.recv()
    if "error" in rep:
        raise (Changed if rep.get("changed") else SourceError)(f"remote: {rep['error']}")
    return rep


@dataclass
class Rebuilt:
    """A remote file rebuilt from the seed and the fetched chunks, checked."""

    plan: rdc.Plan
    seed: rdc.SeedIndex
    fetched: list[bytes]
    stats: FetchStats

    def buffers(self) -> list[bytes | memoryview]:
        return rdc.assemble(self.plan, self.seed, self.fetched)

    def regions(self) -> Iterator[tuple[int, int, memoryview | bytes | None, bool]]:
        return rdc.regions(self.plan, self.seed, self.fetched)


def fetch_rebuilt(chan: Frames, path: bytes, seed: bytes | memoryview | Callable[[], bytes | memoryview], *,
                  pages: bool = False) -> Rebuilt:
    """The remote file's new content, from the seed's chunks and those it lacks, checked
    chunk by chunk and against the remote's whole-file BLAKE3. ``seed`` may be a loader,
    called once the request is out (both ends then read at once). ``pages``: cut level 0
    into 4 KiB pages (for files changed in place); both sides must agree."""
    chan.send({"op": "open", "path": path, "pages": pages})
    if callable(seed):
        seed = seed()
    local = rdc.Ladder.build(seed, pages=pages)  # while the remote builds its own
    head = _reply(chan)
    levels: int = head["levels"]
    sig: bytes = head["top"]
    fetched_sig = len(sig)
    sig_full = 0
    for level in range(levels - 1, -1, -1):
        index = local.index(level)
        p = rdc.plan(sig, index)
        missing = p.missing
        data = _call(chan, {"op": "get", "level": level, "ranges": missing})["data"] if missing else []
        if not rdc.verify_fetched(p, data):
            raise CorruptionError(f"remote sent chunks that do not match their signature (level {level})")
        got = sum(n for _o, n in missing)
        if level == 0:
            out = Rebuilt(p, index, data, FetchStats(p.size, levels, chan.sent, chan.received, got, p.size - got,
                                                     fetched_sig, sig_full or len(head["top"]), head["digest"]))
            h = blake3.blake3(max_threads=blake3.blake3.AUTO if p.size > 1 << 24 else 1)
            for b in out.buffers():
                h.update(b)
            if h.digest() != head["digest"] or p.size != head["size"]:
                raise CorruptionError("the rebuilt file does not match the remote digest")
            return out
        fetched_sig += got
        sig = b"".join(rdc.assemble(p, index, data))
        if level == 1:
            sig_full = len(sig)
    raise CorruptionError("the remote file has no level 0")


def fetch(chan: Frames, path: bytes, seed: bytes | memoryview, *,
          pages: bool = False) -> tuple[bytes, FetchStats]:
    """The remote file's new content, rebuilt from the seed and the chunks it lacks."""
    r = fetch_rebuilt(chan, path, seed, pages=pages)
    return b"".join(r.buffers()), r.stats
