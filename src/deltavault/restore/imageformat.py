"""Restoring a volume as a qcow2, VHDX or VMDK image rather than raw.

Which format: ``--format`` when given (``original``: the format the snapshot was read from,
raw for snapshots that did not record it); otherwise the target's extension (``.qcow2``,
``.vhdx``, ``.vmdk``); otherwise raw. A block device is written raw only.

The volume is restored raw into a temporary file beside the target (holes stay holes, so it
takes the room of the data only), converted with ``qemu-img convert`` into a second
temporary file, synced and renamed over the target: the target appears only when complete.
Both temporary files go whatever happens. They are made in a directory of the run's own
(0700, random name) beside the target, held open and named through ``/proc/self/fd/N``:
names another user could know in advance, in a directory they may write in, had them plant
symlinks that the raw restore (to a block device) and qemu-img (to any file) wrote through. ``verify`` also runs ``qemu-img compare`` of the
converted image against the verified raw one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
from collections.abc import Callable

from deltavault.errors import NO_SPACE_ERRNOS, NoSpace, TargetError, Unavailable, UsageError
from deltavault.fs.dirfd import created_dir, identity, lstat_at
from deltavault.fs.paths import display
from deltavault.restore.voltarget import TargetDir
from deltavault.restore.volume import VolumeRestoreStats
from deltavault.tracking.volume import qemuproc

FORMATS = ("raw", "qcow2", "vhdx", "vmdk")
CHOICES = (*FORMATS, "original")
EXTENSIONS = {".qcow2": "qcow2", ".vhdx": "vhdx", ".vmdk": "vmdk"}


def _is_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def target_format(target: str, asked: str | None, recorded: str) -> str:
    """The format to write: see the module's docstring."""
    if asked == "original":
        fmt = recorded or "raw"
    elif asked:
        fmt = asked
    elif _is_device(target):
        return "raw"
    else:
        fmt = EXTENSIONS.get(os.path.splitext(target)[1].lower(), "raw")
    if fmt not in FORMATS:
        raise UsageError(f"cannot write a {fmt} image; --format takes {', '.join(CHOICES)}")
    if fmt != "raw" and _is_device(target):
        raise UsageError(f"{target} is a block device: it takes the raw volume only (--format raw)")
    return fmt


def _qemu_img(args: list[str], what: str, fds: tuple[int, ...] = ()) -> subprocess.CompletedProcess[str]:
    # No timeout: converting the volume is work that follows its size, of our own raw file.
    return qemuproc.run(["qemu-img", *args], what, TargetError, timeout=None, fds=fds)


def _fsync_at(dir_fd: int, name: str) -> None:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restore_as(fmt: str, target: str, restore_raw: Callable[[str], VolumeRestoreStats], *,
               overwrite: bool, verify: bool) -> VolumeRestoreStats:
    """Restore through ``restore_raw(path)`` (a raw image at ``path``) and convert to ``fmt``.
    Both temporary images are made in a directory of our own (0700, of a random name)
    beside the target, named to restore_raw and to qemu-img through ``/proc/self/fd/N``:
    the directory held open, whatever its name names by now."""
    with TargetDir(target) as where:
        _check_target(where, fmt, overwrite=overwrite)
        if shutil.which("qemu-img") is None:
            raise Unavailable(f"writing a {fmt} image needs qemu-img (Debian package qemu-utils)")
        private = b"." + where.name + f".dv-{fmt}-{os.urandom(6).hex()}".encode()
        try:
            os.mkdir(private, 0o700, dir_fd=where.fd)
            pfd, _st = created_dir(where.fd, private)
        except OSError as exc:
            if exc.errno in NO_SPACE_ERRNOS:
                raise NoSpace(f"no space beside {target}") from exc
            raise TargetError(f"cannot create {display(private)} beside {target}: {exc.strerror or exc}") from exc
        try:
            stats = _convert(fmt, target, restore_raw, where, pfd, verify=verify)
        finally:
            try:
                with contextlib.suppress(OSError):  # (never in place of the run's own error)
                    for leftover in ("raw", "out"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(leftover, dir_fd=pfd)
                    left = lstat_at(where.fd, private)
                    if left is not None and identity(left) == identity(os.fstat(pfd)):
                        os.rmdir(private, dir_fd=where.fd)
            finally:
                os.close(pfd)
    stats.target = target
    stats.target_format = fmt
    return stats


def _check_target(where: TargetDir, fmt: str, *, overwrite: bool) -> None:
    """What stands under the target's name, judged as a raw restore judges it (``TargetDir``,
    not followed): the image replaces a file or a symlink, never a device, and a symlink to a
    device in a directory others may write in is refused (it had been judged by ``os.stat``,
    through the link, so a dangling one was replaced without --overwrite)."""
    target = where.target
    st, dev = where.examine()
    if dev is not None:
        os.close(dev)
    if dev is not None or (st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode))):
        raise UsageError(f"{target} is not a regular file: a {fmt} image is written to a file only")
    if st is not None and not overwrite:
        raise UsageError(f"{target} exists; pass --overwrite to replace it")


def _convert(fmt: str, target: str, restore_raw: Callable[[str], VolumeRestoreStats], where: TargetDir,
             pfd: int, *, verify: bool) -> VolumeRestoreStats:
    """The raw image and its conversion in the private directory ``pfd``, the conversion
    then renamed over the target."""
    raw, out = f"/proc/self/fd/{pfd}/raw", f"/proc/self/fd/{pfd}/out"
    try:
        stats = restore_raw(raw)
        p = _qemu_img(["convert", "-f", "raw", "-O", fmt, raw, out], f"converting to {fmt}", (pfd,))
        if p.returncode != 0:
            msg = (p.stderr or p.stdout).strip()
            if "No space" in msg:
                raise NoSpace(f"no space to write the {fmt} image beside {target}: {msg}")
            raise TargetError(f"qemu-img convert to {fmt} failed: {msg}")
        if verify:
            p = _qemu_img(["compare", "-f", "raw", "-F", fmt, raw, out], "comparing the converted image", (pfd,))
            if p.returncode != 0:
                raise TargetError(f"the {fmt} image differs from the restored volume: "
                                  f"{(p.stdout + p.stderr).strip()}")
        _fsync_at(pfd, "out")
        os.rename("out", where.name, src_dir_fd=pfd, dst_dir_fd=where.fd)
        os.fsync(where.fd)
    except OSError as exc:
        if exc.errno in NO_SPACE_ERRNOS:
            raise NoSpace(f"no space to write the {fmt} image beside {target}") from exc
        raise TargetError(f"writing {target}: {exc.strerror or exc}") from exc
    return stats
