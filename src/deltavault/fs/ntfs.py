"""NTFS metadata through ntfs-3g (a FUSE mount, ``fuseblk`` on a block device, ``fuse``
on an image file): security descriptors, DOS attributes, times, reparse data and the names
of named data streams, read and set through ntfs-3g's ``system.ntfs_*`` xattrs.

Those names are not listed by listxattr, so they are asked for by name, and only on a mount
that is ntfs-3g's. How streams show depends on the mount's ``streams_interface`` option,
which mountinfo does not show; it is probed on the mount's root:

- ``windows``: a stream is the file ``name:stream``; the names are the NUL-separated
  ``ntfs.streams.list`` xattr (listed by listxattr on this interface);
- ``xattr`` (ntfs-3g's default): each stream is the xattr ``user.stream``; one over 64 KiB
  cannot be read (E2BIG);
- ``none``: streams are not visible at all.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from typing import Protocol

from deltavault.fs.dirfd import fd_path, mount_id, open_regular
from deltavault.fs.meta import over_message, read_upto, xattr_names
from deltavault.fs.mounts import parse_mountinfo, read_mountinfo
from deltavault.fs.ntfssd import BadDescriptor, owner_group
from deltavault.fs.paths import display

ACL = b"system.ntfs_acl"
ATTRIB = b"system.ntfs_attrib"
TIMES = b"system.ntfs_times"
REPARSE = b"system.ntfs_reparse_data"
STREAMS_LIST = b"ntfs.streams.list"
XATTR_STREAM = b"user."
FUSE_TYPES = ("fuseblk", "fuse", "fuse.ntfs-3g", "fuseblk.ntfs-3g")
STREAM_XATTR_MAX = 65536  # the VFS limit on one xattr value

WINDOWS, XATTR, NONE = "windows", "xattr", "none"

# FILE_ATTRIBUTE_* bits, for messages and tests
READONLY, HIDDEN, SYSTEM, DIRECTORY, ARCHIVE, REPARSE_POINT = 0x1, 0x2, 0x4, 0x10, 0x20, 0x400


@dataclass(frozen=True)
class NtfsView:
    """An ntfs-3g mount, and how it shows named streams."""

    streams: str  # WINDOWS | XATTR | NONE


class NtfsFields(Protocol):
    """What is set back (model.windows.WinMeta has these)."""

    @property
    def sd(self) -> bytes: ...
    @property
    def attrib(self) -> int | None: ...
    @property
    def times(self) -> bytes: ...
    @property
    def reparse(self) -> bytes: ...


@dataclass
class ReadResult:
    sd: bytes  # security descriptor (system.ntfs_acl)
    owner: str  # its owner SID as text, "" if it did not parse
    attrib: int | None
    times: bytes
    reparse: bytes
    stream_names: list[bytes]
    warnings: list[str] = field(default_factory=list)  # kept, but not as well as it should be
    losses: list[str] = field(default_factory=list)  # what exists and could not be read
    inline: dict[bytes, bytes] = field(default_factory=dict)  # streams read as user.* xattrs


def _errno(exc: OSError) -> int:
    return exc.errno or 0


def _get(target: int | bytes, name: bytes) -> bytes | None:
    try:
        return os.getxattr(target, name)
    except OSError as exc:
        if _errno(exc) in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


def probe(fd: int) -> NtfsView | None:
    """The NTFS view of the object ``fd`` (an fd or an ``O_PATH`` handle) if it lies on an
    ntfs-3g mount, else None."""
    try:
        mid = mount_id(fd)
    except OSError:
        return None
    mounts = [m for m in parse_mountinfo(read_mountinfo()) if m.mount_id == mid]
    if not mounts or mounts[0].fstype not in FUSE_TYPES:
        return None
    try:
        if _get(fd_path(fd), ATTRIB) is None:
            return None
    except OSError:
        return None
    return NtfsView(_stream_interface(fd_path(fd)))


def _stream_interface(target: bytes) -> str:
    try:
        os.getxattr(target, STREAMS_LIST)
        return WINDOWS
    except OSError:
        pass
    try:
        os.getxattr(target, b"user.deltavault-probe")
    except OSError as exc:
        if _errno(exc) == errno.ENODATA:
            return XATTR  # the user.* namespace exists: streams are xattrs
    return NONE


def read_meta(target: int | bytes, view: NtfsView, *, streams: bool = True) -> ReadResult:
    """The NTFS metadata of the object ``target`` (an fd, or a /proc/self/fd path of a
    handle) and the names of its named streams. A descriptor that does not parse is kept as
    bytes, with a warning; an attribute that cannot be read is left out, as a loss
    (ntfs-3g gives EIO for the root directory's descriptor on a volume mkntfs made)."""
    warnings: list[str] = []
    losses: list[str] = []

    def get(name: bytes, what: str) -> bytes | None:
        try:
            return _get(target, name)
        except OSError as exc:
            losses.append(f"NTFS {what} unreadable: {exc.strerror or exc}")
            return None

    sd = get(ACL, "security descriptor") or b""
    owner = ""
    if sd:
        try:
            owner = owner_group(sd)[0]
        except BadDescriptor as exc:
            warnings.append(f"security descriptor kept as bytes, not understood: {exc}")
    attrib = get(ATTRIB, "DOS attributes")
    res = ReadResult(sd, owner, int.from_bytes(attrib, "little") if attrib else None,
                     get(TIMES, "times") or b"", get(REPARSE, "reparse data") or b"", [], warnings, losses)
    if not streams:
        return res
    if view.streams == WINDOWS:
        raw = get(STREAMS_LIST, "stream list") or b""
        res.stream_names = sorted(n for n in raw.split(b"\0") if n)
    elif view.streams == XATTR:
        _read_inline(target, res)
    return res


def _read_inline(target: int | bytes, res: ReadResult) -> None:
    """The streams of ``target`` that ntfs-3g's xattr interface shows as ``user.`` xattrs,
    read into ``res``: up to INLINE_MAX together (fs.meta.read_upto). Those past it are not
    read, and named as a loss."""
    names, listed = xattr_names(target, follow=True)
    if not listed:
        res.losses.append("its streams have more names than listxattr returns: none stored "
                          "(mount with streams_interface=windows)")
    got = read_upto(target, [n for n in names if n.startswith(XATTR_STREAM)], follow=True)
    for n, value in got.values:
        stream = n[len(XATTR_STREAM):]
        res.stream_names.append(stream)
        res.inline[stream] = value
    for n in got.big:
        res.losses.append(f"stream {display(n[len(XATTR_STREAM):])} is over 64 KiB, which ntfs-3g's "
                          "streams_interface=xattr cannot read: not stored (mount with "
                          "streams_interface=windows)")
    if got.over:
        res.losses.append(over_message([n[len(XATTR_STREAM):] for n in got.over], "streams",
                                       "one entry's streams read as xattrs")
                          + " (mount with streams_interface=windows)")


def not_kept(meta: ReadResult) -> list[str]:
    """What of ``meta`` a DST that is not ntfs-3g cannot keep (streams aside), for log lines."""
    return [what for what, has in (("security descriptor", bool(meta.sd)), ("DOS attributes", meta.attrib is not None),
                                   ("creation time", bool(meta.times)), ("reparse data", bool(meta.reparse))) if has]


def valid_stream_name(name: bytes) -> bool:
    """A stream name that can be joined to a file name: one component, no ':' (a damaged or
    hostile repository may name anything)."""
    return bool(name) and b"/" not in name and b"\0" not in name and b":" not in name


def open_stream_file(dir_fd: int, name: bytes, stream: bytes) -> int:
    """The stream ``stream`` of the file ``name`` (streams_interface=windows), open for
    reading through a checked handle (fs.dirfd.open_regular), its cached pages dropped.

    The kernel keeps the pages of ``name:stream`` under that name, not under the file
    that holds the stream: once another file is renamed over ``name``, a read of
    ``name:stream`` returned the old file's stream (seen on ntfs-3g 2022.10.3, seconds
    later and after a stat showed the new inode) until the pages were dropped."""
    fd = open_regular(dir_fd, name + b":" + stream)
    try:
        drop_cached(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


def drop_cached(fd: int) -> None:
    """Forget the cached pages of an open stream (see ``open_stream_file``)."""
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def is_ntfs_xattr(name: bytes, view: NtfsView) -> bool:
    """An xattr that is ntfs-3g's view of NTFS metadata or streams, not an xattr of its own."""
    return name == STREAMS_LIST or (view.streams == XATTR and name.startswith(XATTR_STREAM))


def apply_meta(target: int | bytes, win: NtfsFields, *, last: bool) -> list[str]:
    """Set NTFS metadata on ``target`` (fd or /proc/self/fd path). Reparse data and the
    descriptor first (``last`` False); then (``last`` True, after content, mode and POSIX
    times, which would change them) the DOS attributes and the times."""
    steps: list[tuple[str, bytes, bytes]] = []
    if not last:
        if win.reparse:
            steps.append(("reparse data", REPARSE, win.reparse))
        if win.sd:
            steps.append(("security descriptor", ACL, win.sd))
    else:
        if win.attrib is not None:
            steps.append(("DOS attributes", ATTRIB, win.attrib.to_bytes(4, "little")))
        if win.times:
            steps.append(("times", TIMES, win.times))
    out = []
    for what, name, value in steps:
        try:
            os.setxattr(target, name, value)
        except OSError as exc:
            out.append(f"NTFS {what}: {exc.strerror or exc}")
    return out
