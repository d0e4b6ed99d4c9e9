"""Ports for the servers the tests start (sshd, SeaweedFS, the NBD server).

A port that bind(0) found free is, once that socket closes, just as free for any outgoing
connection, and the kernel hands those out from the same ephemeral range: in CI one of weed's
own connections took the S3 port before its listener bound it ("bind: address already in
use", every S3 test in error). So ports are drawn below that range where it leaves room."""

from __future__ import annotations

import random
import socket
from collections.abc import Sequence
from pathlib import Path


def _ephemeral() -> range:
    """The ports the kernel hands out to outgoing connections and to bind(0)."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        lo, hi = 32768, 60999
    return range(lo, hi + 1)


def free_port(taken: set[int] | None = None, offsets: Sequence[int] = (0,)) -> int:
    """A port P, free now with P+o for each of ``offsets``, none of them in ``taken`` (which
    gets them all) nor in the ephemeral range."""
    taken = set() if taken is None else taken
    eph = _ephemeral()
    top = max(offsets)
    rnd = random.Random()
    for _ in range(500):
        port = rnd.randrange(10000, 22000) if eph.start >= 22001 + top else rnd.randrange(1024, 65535 - top)
        group = [port + o for o in offsets]
        if any(q in taken or q in eph for q in group):
            continue
        try:
            for q in group:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
        except OSError:
            continue
        taken.update(group)
        return port
    raise RuntimeError("no free port")
