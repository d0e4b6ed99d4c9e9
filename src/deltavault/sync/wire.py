"""The sync protocol between a sender and a receiver on two hosts, over ssh: msgpack frames
(deltavault.framing) on the ssh process's stdin and stdout.

In a push the sender runs here (sync/push.py) and the agent on DST's host
(``deltavault sync-agent``); in a pull the sender runs on SRC's host
(``deltavault sync-source``) and the agent here (sync/pull.py). The sender drives; the
agent answers only "hello", "dir", "check" and "finish", and, while it fetches a file by
delta, makes requests of its own (sync/remote.py). A reader thread on the sender's side
(``Duplex``) takes the agent's frames off the wire as they come, so neither side ever
waits to write while the other is writing, and the pipes cannot deadlock.

    hello {version, dest, options, source, root, features, ntfs}
                                              -> {ok, dest, features, ntfs} | {error, code}
    dir {path, entries, protected, included}  -> {want: [[name, "whole"|"delta"|"check"]], records}
    check {path, items: [[blake3, entry]]}    -> {want, records}   (same size: is it the same content?)
    put {path, e} then {d: bytes} | {z: n} ... then {end: blake3} | {abort: why}
    delta {path, e} then the agent fetches the file (remote.fetch) and says "bye"
    enddir {path, e}                          (the directory's own metadata, after its contents)
    finish {problems, stopped}                -> {records, stats}

A pull starts with {op: "source", version, path, options, snapshot} to sync-source.
Every request that has a reply carries an "id", and its reply the same, so the sender can
keep several in flight (it lists the next directories while sending files of earlier ones).
Replies carry "records" (what the agent did: [action, path, size, written, digest, problem
kind, message]) and "fatal" (the destination is full or read-only: "full: ..." or
"read-only: ..."). "source" and "dest" in hello describe each tree (sync/guard.py), so that
two ends on the same kernel refuse to overlap. "root" (version 2) is SRC's root as an
entry (below, named "_", no xattrs): from it the agent decides, before the first listing,
whether DST's root must be taken for the run (receiver/root.py); its final metadata comes
with its "enddir", as every directory's does. Each end refuses a peer of another version
(exit 2, naming both versions): a version 1 agent would write in a DST root it never took.

Features. Each side's hello lists the FEATURES it speaks; an older one lists none and
ignores fields it does not know. "ntfs": the sender's hello says ``ntfs: true`` when SRC is
on ntfs-3g and --acl or --streams asks for its metadata; an agent that speaks "ntfs"
answers with DST's view (``ntfs: {streams: "windows"|"xattr"|"none"}``, or None when DST
is not ntfs-3g), and from then on entries carry a 12th field, ``win`` (below). A sender
that meets an agent without it sends 11 fields (data and POSIX metadata only), warns once
and names each entry's losses in its own log.

Streams (feature "ntfs", DST on ntfs-3g with streams_interface=windows): after a file's
content (a "put" that ended with "end", or a "delta" that did not change), when its entry's
``win`` lists streams, the agent asks for each, as it does during a delta:

    {op: "whole", path: stream}       -> {d: bytes} ... then {end: blake3} | {abort: why}
    {op: "open", path: stream, pages} then "get" ...  (remote delta, sync/remote.py)
    {op: "bye"}                       (always, even when it asks for none)

A reply {abort: "changed"} (or an "open" error with ``changed``) means the file changed
while its streams were read: the agent discards it and the sender sends it again. Onto any
other DST, streams travel as ``user.`` xattrs in the entry's xattrs (up to 64 KiB).

An entry is a msgpack list:

    [name, kind, mode, uid, gid, atime_ns, mtime_ns, size, rdev, extra, xattrs]

kind: "f" file (extra: GROUP when it has other links in SRC: the first name of a hard-link
group), "d" directory, "l" symlink (extra: its target), "h" a further name of a file
already sent (extra: the first name's path), "s" special (FIFO or device node).
xattrs: [[name, value], ...] when --acl or --xattrs is on, else None. Owners are numeric.
win (feature "ntfs" only): {sd, attrib, times, reparse, streams, lost, warnings} of a file
or directory: ntfs-3g's ``system.ntfs_*`` values (sd, times, reparse empty and attrib None
when not asked for or absent), ``streams`` [[name, size], ...] (files, when DST takes
streams as files), ``lost`` what SRC's side could not carry (for the log line), in a
"check" under --checksum ``digests`` [[name, blake3], ...] of those streams; in a
subdirectory's entry in its parent's listing (--streams), ``inline`` [[name, bytes], ...]:
the directory's own streams (up to 1 MiB each; 64 KiB when DST keeps them as xattrs).
"""

from __future__ import annotations

import os
import queue
import stat
import threading
from dataclasses import dataclass
from typing import IO, Any, Protocol

from deltavault.errors import CorruptionError, DeltavaultError, NoSpace, TargetError
from deltavault.framing import read_frame, write_frame
from deltavault.fs.ntfs import ReadResult
from deltavault.fs.paths import check_name
from deltavault.sync.options import SyncOptions

VERSION = 2  # 2: hello carries SRC's root entry (receiver/root.py); peers of another version are refused
FEATURES = ["ntfs"]  # optional parts of the protocol this side speaks (hello)
KINDS = ("f", "d", "l", "h", "s")
GROUP = b"L"  # the extra of a file that is the first name of a hard-link group (older agents ignore it)


# ---------------------------------------------------------------------------- entries

def entry(name: bytes, kind: str, st: os.stat_result, *, extra: bytes | None = None,
          xattrs: list[tuple[bytes, bytes]] | None = None, win: dict[str, Any] | None = None) -> list[Any]:
    out = [name, kind, st.st_mode, st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns,
           st.st_size if stat.S_ISREG(st.st_mode) else 0, st.st_rdev, extra,
           [list(x) for x in xattrs] if xattrs is not None else None]
    if win is not None:  # (only after both sides said "ntfs": an older agent takes 11 fields)
        out.append(win)
    return out


@dataclass
class WinEntry:
    """An entry's NTFS metadata as it travels: what ntfs-3g gave SRC's side, the streams
    to send as files (name -> size), and what SRC's side could not carry."""

    meta: ReadResult
    streams: dict[bytes, int]
    lost: list[str]
    inline: dict[bytes, bytes] | None = None  # a directory's streams, with its parent's listing
    digests: dict[bytes, bytes] | None = None  # its streams' BLAKE3, in a "check" (--checksum)


def win_wire(meta: ReadResult, *, streams: dict[bytes, int] | None = None, lost: list[str] | None = None,
             inline: dict[bytes, bytes] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "sd": meta.sd, "attrib": meta.attrib, "times": meta.times, "reparse": meta.reparse,
        "streams": [[n, size] for n, size in (streams or {}).items()], "lost": lost or [],
        "warnings": meta.warnings}
    if inline is not None:
        out["inline"] = [[n, v] for n, v in inline.items()]
    return out


def win_from(raw: Any) -> WinEntry:
    """A received ``win``, checked (stream names are checked where they are used)."""
    if not isinstance(raw, dict):
        raise ValueError
    sd, attrib, times, reparse = raw["sd"], raw["attrib"], raw["times"], raw["reparse"]
    if not all(isinstance(v, bytes) for v in (sd, times, reparse)) or not (attrib is None or isinstance(attrib, int)):
        raise ValueError
    streams = {bytes(n): int(size) for n, size in raw.get("streams") or []}
    lost = [str(x) for x in raw.get("lost") or []]
    warnings = [str(x) for x in raw.get("warnings") or []]
    inline = None if raw.get("inline") is None else {bytes(n): bytes(v) for n, v in raw["inline"]}
    digests = None if raw.get("digests") is None else {bytes(n): bytes(v) for n, v in raw["digests"]}
    return WinEntry(ReadResult(sd, "", attrib, times, reparse, sorted(streams), warnings), streams, lost, inline,
                    digests)


def kind_of(st: os.stat_result) -> str | None:
    """The wire kind of a source entry; None for what is not copied (sockets, unknown types)."""
    m = st.st_mode
    if stat.S_ISREG(m):
        return "f"
    if stat.S_ISDIR(m):
        return "d"
    if stat.S_ISLNK(m):
        return "l"
    if stat.S_ISFIFO(m) or stat.S_ISCHR(m) or stat.S_ISBLK(m):
        return "s"
    return None


class Entry:
    """A received entry, checked: its name is one safe component and its fields have types."""

    __slots__ = ("extra", "kind", "name", "st", "win", "xattrs")

    def __init__(self, raw: Any) -> None:
        try:
            if not isinstance(raw, list) or len(raw) not in (11, 12):
                raise ValueError
            name, kind, mode, uid, gid, atime, mtime, size, rdev, extra, xattrs = raw[:11]
            self.win: WinEntry | None = win_from(raw[11]) if len(raw) == 12 else None
            self.name = check_name(name)
            if kind not in KINDS or not all(isinstance(v, int) for v in (mode, uid, gid, atime, mtime, size, rdev)):
                raise ValueError
            if extra is not None and not isinstance(extra, bytes):
                raise ValueError
            self.kind: str = kind
            self.extra: bytes | None = extra
            self.xattrs: list[tuple[bytes, bytes]] | None = (
                None if xattrs is None else [(bytes(k), bytes(v)) for k, v in xattrs])
        except (ValueError, TypeError, KeyError):
            raise CorruptionError(f"the sender sent a malformed entry: {raw!r:.200}") from None
        # A real stat_result, so the local engine's metadata helpers apply unchanged.
        self.st = os.stat_result((mode, 0, 0, 1, uid, gid, size, atime // 10**9, mtime // 10**9, 0,
                                  atime / 1e9, mtime / 1e9, 0.0, atime, mtime, 0, 4096, 0, rdev))


class Paths:
    """Checks the paths the sender sends: each component one safe name. A path whose
    parent was checked costs one name (the paths of a tree 5,000 deep are long)."""

    def __init__(self) -> None:
        self._ok: set[bytes] = {b""}

    def __call__(self, raw: Any) -> bytes:
        if not isinstance(raw, bytes):
            raise CorruptionError("the sender sent a malformed path")
        if raw in self._ok:
            return raw
        parent, sep, name = raw.rpartition(b"/")
        if sep and not parent:
            check_name(parent)  # an empty first component ("/abs"): refused
        if parent not in self._ok:
            for part in parent.split(b"/"):
                check_name(part)
        check_name(name)
        self._ok.add(raw)
        return raw


def fatal_error(fatal: str, where: str = "") -> DeltavaultError:
    """The error for the agent's ``fatal``: NoSpace for a full disk, else TargetError."""
    kind, _, message = fatal.partition(": ")
    return (NoSpace if kind == "full" else TargetError)(f"{where}: {message}" if where else message)


_OPTIONS = ("delete", "checksum", "skip_empty_dirs", "acl", "xattrs", "streams", "owner", "excludes", "includes",
            "default_excludes", "verify", "stop_on_error", "delta", "delta_min", "bufsize")


def options_wire(opts: SyncOptions) -> dict[str, Any]:
    return {k: getattr(opts, k) for k in _OPTIONS}


def options_from(raw: dict[str, Any]) -> SyncOptions:
    return SyncOptions(**{k: raw[k] for k in _OPTIONS if k in raw})


# ---------------------------------------------------------------------------- frames

class Frames(Protocol):
    """What the protocol needs of a connection."""

    @property
    def sent(self) -> int: ...

    @property
    def received(self) -> int: ...

    def send(self, obj: Any) -> None: ...

    def recv(self) -> Any: ...


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


class Duplex:
    """The sender's channel to the agent, read by a thread of its own. Replies are taken off the wire as they
    come, so the agent never waits to write while this side is writing (however many requests
    are in flight, the pipes cannot fill both ways). Replies are matched to requests by id;
    the agent's own requests (during a delta) go to ``recv``."""

    def __init__(self, chan: Channel) -> None:
        self._chan = chan
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._replies: dict[int, Any] = {}
        self._failed: BaseException | None = None
        self._cond = threading.Condition()
        self._next_id = 0
        self._reader = threading.Thread(target=self._read, name="dv-push-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                msg = self._chan.recv()
            except BaseException as exc:  # EOF, a broken frame: handed to whoever waits
                with self._cond:
                    self._failed = exc
                    self._cond.notify_all()
                self._requests.put(_Failed(exc))
                return
            if isinstance(msg, dict) and "op" in msg:
                self._requests.put(msg)
            else:
                rid = msg.get("id") if isinstance(msg, dict) else None
                with self._cond:
                    self._replies[rid if isinstance(rid, int) else -1] = msg
                    self._cond.notify_all()

    @property
    def sent(self) -> int:
        return self._chan.sent

    @property
    def received(self) -> int:
        return self._chan.received

    def send(self, obj: Any) -> None:
        self._chan.send(obj)

    def request(self, obj: dict[str, Any]) -> int:
        """Send a request that has a reply; returns the id to wait for."""
        self._next_id += 1
        self._chan.send({**obj, "id": self._next_id})
        return self._next_id

    def reply(self, rid: int) -> Any:
        with self._cond:
            while rid not in self._replies:
                if self._failed is not None:
                    raise self._failed
                self._cond.wait()
            return self._replies.pop(rid)

    def recv(self) -> Any:
        msg = self._requests.get()
        if isinstance(msg, _Failed):
            self._requests.put(msg)  # and to every later reader
            raise msg.exc
        return msg


@dataclass
class _Failed:
    exc: BaseException
