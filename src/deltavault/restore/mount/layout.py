"""The top of the mount, built from the snapshot list:

    snapshots/<time>_<id>/...           each files snapshot's tree (and ``latest``)
    volumes/<time>_<id>/disk.img        each volume snapshot's image, partN.img per partition
    by-host/<host>/<path>/<time>        links to the above, one directory per source path,
    by-host/<host>/<path>/latest        and a link to its newest snapshot

Host names and paths come from the repository, which may have been tampered with: each
becomes a path component only if ``check_name`` accepts it, as restore requires of names
in trees; a snapshot whose host or path it refuses is left out of by-host (and reported).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3

from deltavault.errors import CorruptionError
from deltavault.fs.paths import check_name
from deltavault.model.snapshot import Snapshot
from deltavault.repository.snapshots import short_id

ROOT_INO = 1


def ino(*parts: bytes) -> int:
    """A stable inode number (63 bits, never 0 or 1) for what ``parts`` name."""
    n = int.from_bytes(blake3.blake3(b"\0".join(parts)).digest(8), "little") >> 1
    return n if n > ROOT_INO else n + 2


@dataclass
class SynthDir:
    ino: int
    mtime_ns: int
    children: dict[bytes, Item] = field(default_factory=dict)


@dataclass
class SynthLink:
    ino: int
    mtime_ns: int
    target: bytes


@dataclass
class SnapRoot:
    """A snapshot's own directory: its root tree (files) or its images (volume)."""

    ino: int
    sid: str
    snap: Snapshot


Item = SynthDir | SynthLink | SnapRoot


def time_name(snap: Snapshot) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(snap.time_ns // 1_000_000_000))


def root_entry(logical_path: str) -> bytes:
    """The name backup gives a source path in the snapshot's root tree (its last component)."""
    name = os.fsencode(os.path.basename(os.path.normpath(logical_path)))
    if name in (b"", b".", b".."):
        name = os.fsencode(os.path.basename(os.path.abspath(logical_path)))
    return name or b"root"


def _components(text: str) -> list[bytes]:
    return [check_name(os.fsencode(p)) for p in text.split("/") if p]


def _unique(children: dict[bytes, Item], name: bytes, sid: str) -> bytes:
    return name if name not in children else name + b"_" + short_id(sid).encode()


def build_layout(snaps: list[tuple[str, Snapshot]], problem: Callable[[str, str], None]) -> SynthDir:
    """The synthetic directories over ``snaps`` (oldest first)."""
    newest = snaps[-1][1].time_ns if snaps else time.time_ns()
    root = SynthDir(ROOT_INO, newest)
    tops = {name: SynthDir(ino(b"top", name), newest) for name in (b"snapshots", b"volumes", b"by-host")}
    root.children.update(tops)
    where: dict[str, bytes] = {}  # snapshot id -> its path from the root
    for sid, snap in snaps:
        top_name = b"volumes" if snap.kind == "volume" else b"snapshots"
        top = tops[top_name]
        name = f"{time_name(snap)}_{short_id(sid)}".encode()
        if name in top.children:  # two ids alike in 8 digits, in the same second
            name = f"{time_name(snap)}_{sid}".encode()
        top.children[name] = SnapRoot(ino(b"snap", sid.encode()), sid, snap)
        top.children[b"latest"] = SynthLink(ino(b"latest", top_name), snap.time_ns, name)
        where[sid] = top_name + b"/" + name
    for sid, snap in snaps:
        try:
            host = check_name(os.fsencode(snap.hostname or "unknown"))
            paths = [(p, _components(p)) for p in (snap.paths or ["/"])]
        except CorruptionError as exc:
            problem(f"snapshot {short_id(sid)}", f"left out of by-host: {exc.message}")
            continue
        for logical, parts in paths:
            _add_link(tops[b"by-host"], host, logical, parts, sid, snap, where[sid])
    return root


def _add_link(by_host: SynthDir, host: bytes, logical: str, parts: list[bytes], sid: str,
              snap: Snapshot, target: bytes) -> None:
    d = by_host
    for comp in [host, *parts]:
        child = d.children.get(comp)
        if not isinstance(child, SynthDir):
            # A path component wins over a link of the same name, which moves aside.
            if child is not None:
                d.children[comp + b"_" + b"link"] = child
            child = d.children[comp] = SynthDir(ino(b"by-host", d.ino.to_bytes(8, "little"), comp),
                                                snap.time_ns)
        child.mtime_ns = max(child.mtime_ns, snap.time_ns)
        d = child
    depth = 2 + len(parts)  # by-host/<host>/<parts...>
    if snap.kind != "volume":
        target += b"/" + root_entry(logical)
    up = b"../" * depth + target
    name = _unique(d.children, time_name(snap).encode(), sid)
    d.children[name] = SynthLink(ino(b"link", sid.encode(), logical.encode()), snap.time_ns, up)
    if not isinstance(d.children.get(b"latest"), SynthDir):  # a source path may be named so
        d.children[b"latest"] = SynthLink(ino(b"latest", d.ino.to_bytes(8, "little")), snap.time_ns, name)
