"""Remote delta: fetch a file from a peer that has its new version, using a local older
version (the seed) and recursive signatures (chunking/rdc.py), so that only the chunks
the seed lacks, plus a little signature, cross the wire.

Protocol: msgpack frames (deltavault.framing) over any byte stream: a pipe to
``python -m deltavault.sync.remote serve ROOT`` (locally, or through ssh). The client
speaks first.

    {"op": "open", "path": p}           -> {"size", "levels", "top", "digest"}
    {"op": "get", "level": k, "ranges": [[offset, length], ...]}  -> {"data": [bytes, ...]}
    {"op": "bye"}                        -> the server exits

``levels`` counts signature levels; ``top`` is the highest one, sent whole; level 0 is the
file's bytes. The server holds the open file's streams in memory (it is meant for files
that fit; a streaming server is not written).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import IO, Any

import blake3

from deltavault.chunking import rdc
from deltavault.errors import CorruptionError, SourceError
from deltavault.framing import read_frame, write_frame
from deltavault.fs.paths import check_name


class Channel:
    """Frames over a pair of binary streams, counting the bytes each way."""

    def __init__(self, rfile: IO[bytes], wfile: IO[bytes]) -> None:
        self.r, self.w = rfile, wfile
        self.sent = self.received = 0

    def send(self, obj: Any) -> None:
        self.sent += write_frame(self.w, obj)

    def recv(self) -> Any:
        got = read_frame(self.r)
        if got is None:
            raise EOFError("the peer closed the connection")
        self.received += got[1]
        return got[0]


def _resolve(root: bytes, path: bytes) -> bytes:
    parts = [p for p in path.split(b"/") if p and p != b"."]
    for p in parts:
        check_name(p)
    return os.path.join(root, *parts) if parts else root


def serve(chan: Channel, root: bytes) -> None:
    streams: list[bytes | memoryview] = []
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
                with open(_resolve(root, req["path"]), "rb") as f:
                    data = f.read()
                streams = rdc.streams(data)
                chan.send({"size": len(data), "levels": len(streams) - 1, "top": bytes(streams[-1]),
                           "digest": blake3.blake3(data).digest()})
            elif op == "get":
                s = memoryview(streams[req["level"]])
                chan.send({"data": [bytes(s[o:o + n]) for o, n in req["ranges"]]})
            else:
                chan.send({"error": f"unknown request {op!r}"})
        except (OSError, ValueError, KeyError, IndexError, CorruptionError) as exc:
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


def _call(chan: Channel, req: dict[str, Any]) -> dict[str, Any]:
    chan.send(req)
    rep: dict[str, Any] = chan.recv()
    if "error" in rep:
        raise SourceError(f"remote: {rep['error']}")
    return rep


def fetch(chan: Channel, path: bytes, seed: bytes | memoryview) -> tuple[bytes, FetchStats]:
    """The remote file's new content, rebuilt from the seed and the chunks it lacks."""
    head = _call(chan, {"op": "open", "path": path})
    levels: int = head["levels"]
    sig: bytes = head["top"]
    local = rdc.streams(seed)
    fetched_sig = len(sig)
    sig_full = 0
    reused = fetched_data = 0
    for level in range(levels - 1, -1, -1):
        seed_stream = local[level] if level < len(local) else b""
        parts, missing = rdc.plan(sig, rdc.SeedIndex(seed_stream, level))
        data = _call(chan, {"op": "get", "level": level, "ranges": missing})["data"] if missing else []
        if len(data) != len(missing) or any(len(d) != n for d, (_o, n) in zip(data, missing)):
            raise CorruptionError("remote sent chunks of the wrong size")
        stream = rdc.assemble(parts, data)
        if not rdc.check(stream, sig, level):
            raise CorruptionError(f"level {level} rebuilt from the seed does not match its signature")
        got = sum(n for _o, n in missing)
        if level == 0:
            fetched_data, reused = got, len(stream) - got
        else:
            fetched_sig += got
            if level == 1:
                sig_full = len(stream)
        sig = stream
    if blake3.blake3(sig).digest() != head["digest"] or len(sig) != head["size"]:
        raise CorruptionError("the rebuilt file does not match the remote digest")
    return sig, FetchStats(len(sig), levels, chan.sent, chan.received, fetched_data, reused,
                           fetched_sig, sig_full or len(head["top"]))


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "serve":
        sys.stderr.write("usage: python -m deltavault.sync.remote serve ROOT\n")
        return 2
    serve(Channel(sys.stdin.buffer, sys.stdout.buffer), os.fsencode(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
