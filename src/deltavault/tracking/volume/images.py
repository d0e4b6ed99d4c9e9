"""Disk images in formats only qemu reads (VHDX, VMDK): read-only over NBD from qemu-nbd.

Which format a source file is in comes from its first bytes (``probe``), never from its
name. A block device is always raw. The image is opened read-only: ``qemu-img info`` first
(a truncated or damaged image, or a VMDK whose descriptor names a missing extent, fails
here with qemu's reason), then a read-only qemu-nbd export read with libnbd. These formats
carry no change tracking of their own; the file-system metadata digests of the guest's
file systems (per partition) tell what changed.

A probed VMDK descriptor may name extent files anywhere; one whose extents lie outside its
own directory is refused unless the format was given explicitly (``--source-format vmdk``):
a raw image whose guest wrote a descriptor into its first sector must not make a backup read
host files.
"""

from __future__ import annotations

import bisect
import os
import stat
from typing import Any

from deltavault.errors import SourceError
from deltavault.model.volume import Checkpoint
from deltavault.tracking.volume import qemuproc
from deltavault.tracking.volume.access import ReadOnlyAccess
from deltavault.tracking.volume.qemu import NbdHeld, NbdReader, NbdServer, image_info, image_map
from deltavault.tracking.volume.vmdkgrains import MAX_GRAINS, check_grains, check_sparse_extent

FORMATS = ("raw", "qcow2", "vhdx", "vmdk")
QEMU_ONLY = ("vhdx", "vmdk")
_MAGICS = ((b"QFI\xfb", "qcow2"), (b"vhdxfile", "vhdx"), (b"KDMV", "vmdk"), (b"COWD", "vmdk"))
_DESCRIPTOR = b"# Disk DescriptorFile"


def probe(path: str) -> str:
    """The format of ``path`` by its first bytes: raw for a device or anything unknown."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return "raw"
        with open(path, "rb") as f:
            head = f.read(1024)
    except OSError:
        return "raw"
    for magic, fmt in _MAGICS:
        if head.startswith(magic):
            return fmt
    if head.lstrip(b"\n\r\t ").startswith(_DESCRIPTOR):
        return "vmdk"
    return "raw"


def extent_files(info: dict[str, Any]) -> list[str]:
    data = info.get("format-specific", {}).get("data", {})
    return [str(e["filename"]) for e in data.get("extents", []) if e.get("filename")]


def check_info(path: str, fmt: str, info: dict[str, Any], *, probed: bool) -> None:
    """Refuse an image qemu sees as another format, or (probed VMDK) with foreign extents."""
    got = info.get("format")
    if got != fmt:
        raise SourceError(f"{path}: qemu reads it as {got}, not {fmt}")
    if fmt == "vmdk" and probed:
        home = os.path.dirname(os.path.realpath(path))
        for name in extent_files(info):
            where = os.path.realpath(os.path.join(home, name))
            if os.path.dirname(where) != home:
                raise SourceError(f"{path}: its VMDK descriptor names an extent outside its directory "
                                  f"({name}); pass --source-format vmdk if that is intended")
    if info.get("backing-filename") and probed:
        raise SourceError(f"{path}: a {fmt} image with a backing file ({info['backing-filename']}) is "
                          "read only with --source-format given explicitly")


def check_extents(path: str, info: dict[str, Any]) -> None:
    """Refuse a VMDK whose extent files are cut short, or whose sparse extents claim more
    grains than can be served in bounded time. qemu reads what lies past the end of an extent
    file as zeros, silently (a sparse extent's last grains, a flat extent's tail), and
    ``qemu-img info`` and ``check`` say nothing when only the last grain is cut; so each
    guest range must end within its file.

    First every sparse extent's grains, as qemu reads its header (``qemu-img info``: from the
    footer when the header says so), and their sum, are bounded (``check_grains``): what
    qemu will do per grain, the map below and every NBD status call after, is bounded by
    that. A sparse extent (KDMV) is then walked by ``vmdkgrains``, bounded by its file; the
    others (flat, other sparse kinds) are checked with one ``qemu-img map`` of the image,
    whatever their number (one map per extent opened every extent each time: quadratic in
    a descriptor of thousands of extents). (VHDX: qemu refuses such an image when it
    opens it.)"""
    home = os.path.dirname(os.path.realpath(path))
    extents: list[tuple[int, int, str]] = []  # (first guest byte, end, file) of those to map
    start = total = 0
    for e in info.get("format-specific", {}).get("data", {}).get("extents", []):
        size = int(e.get("virtual-size", 0))
        name = os.path.join(home, str(e.get("filename", "")))
        first, start = start, start + size
        if e.get("cluster-size") is not None:  # sparse (qemu gives a flat extent none)
            total += check_grains(path, name, int(e.get("cluster-size") or 0), size)
            if total > MAX_GRAINS:
                raise SourceError(f"{path}: its extents claim {total} grains in all; more than {MAX_GRAINS}, "
                                  "an 8 TiB disk of 64 KiB grains, are refused")
            if check_sparse_extent(path, name):
                continue
        if size:
            extents.append((first, start, name))
    if extents:
        _check_mapped(path, extents, image_map(path, "vmdk", extents[0][0], extents[-1][1] - extents[0][0]))


def _check_mapped(path: str, extents: list[tuple[int, int, str]], mapped: list[dict[str, Any]]) -> None:
    """Each range ``qemu-img map`` places in one of ``extents`` (first guest byte, end,
    file) ends within that file."""
    sizes: dict[str, int] = {}
    for m in mapped:
        if "offset" not in m:
            continue
        g, n, off = int(m["start"]), int(m["length"]), int(m["offset"])
        i = bisect.bisect_right(extents, g, key=lambda x: x[0]) - 1
        if i < 0 or g >= extents[i][1]:
            continue  # in an extent walked by vmdkgrains
        _first, end, name = extents[i]
        if name not in sizes:
            try:
                sizes[name] = os.stat(name).st_size
            except OSError as exc:
                raise SourceError(f"{path}: its extent {name}: {exc.strerror or exc}") from None
        n = min(n, end - g)
        if off + n > sizes[name]:
            raise SourceError(
                f"{path}: truncated: its extent file {name} is {sizes[name]} bytes long, but holds the "
                f"disk's bytes {g}..{g + n} at {off}..{off + n} (what lies past its end would be read as zeros)")


class ImageAccess(ReadOnlyAccess, NbdHeld):
    """A VHDX or VMDK image (any format qemu-nbd reads), read-only through qemu-nbd."""

    kind = "image"

    def __init__(self, path: str, fmt: str, *, probed: bool) -> None:
        self.path = path
        self.source_format = fmt
        self.probed = probed
        self.server: NbdServer | None = None
        self.reader: NbdReader | None = None

    def open(self, prev: Checkpoint | None, new_id: str) -> NbdReader:
        try:
            info = image_info(self.path)
        except SourceError as exc:
            raise self._unreadable(exc) from None
        check_info(self.path, self.source_format, info, probed=self.probed)
        if self.source_format == "vmdk":
            try:
                check_extents(self.path, info)
            except SourceError as exc:
                raise self._unreadable(exc) from None
        self.server = NbdServer(self.path, None, fmt=self.source_format)
        h = self.server.connect(["base:allocation"])
        self.reader = NbdReader(h, f"{self.path} ({self.source_format} over NBD)")
        return self.reader

    def _unreadable(self, exc: SourceError) -> SourceError:
        why = "in use" if qemuproc.in_use(exc.message) else "damaged, truncated, or a file it names is missing"
        return SourceError(f"cannot open {self.path} as a {self.source_format} image ({why}): {exc.message}")

    def close(self) -> None:
        self._disconnect()
