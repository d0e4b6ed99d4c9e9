"""qemuproc.in_use against qemu's own messages (block/file-posix.c). Only a lock another
process holds (EAGAIN, with qemu's hint "Is another process using the image") is "in use";
a file system that cannot lock (NFS without lockd, some FUSE and CIFS mounts: ENOLCK,
EOPNOTSUPP) gets the same words with the errno after them, and is no VM holding the image.
(Such a file system cannot be made here: the strings are qemu's formats.)"""

from __future__ import annotations

import pytest

from deltavault.tracking.volume.qemuproc import in_use

HINT = "\nIs another process using the image [/vm/disk.qcow2]?"


@pytest.mark.parametrize("message", [
    "qemu-img: Could not open '/vm/disk.qcow2': Failed to get \"write\" lock" + HINT,
    "qemu-img: Could not open '/vm/disk.qcow2': Failed to get shared \"write\" lock" + HINT,
    "qemu-nbd: Failed to blk_new_open '/vm/disk.qcow2': Failed to get \"consistent read\" lock" + HINT,
    "qemu-img: Could not open '/vm/disk.qcow2': Failed to lock byte 100" + HINT,
])
def test_a_lock_another_process_holds_is_in_use(message: str) -> None:
    assert in_use(message)


@pytest.mark.parametrize("message", [
    "qemu-img: Could not open '/vm/disk.qcow2': Failed to lock byte 100: No locks available",
    "qemu-img: Could not open '/vm/disk.qcow2': Failed to lock byte 100: Operation not supported",
    "qemu-img: Could not open '/vm/disk.qcow2': Failed to get \"write\" lock: No locks available",
    "qemu-img: Could not open '/vm/blocks/disk.qcow2': Image is not in qcow2 format",
    "qemu-img: Can't make bitmap 'dv-1' persistent in '#block194': Too much space will be occupied",
])
def test_a_file_system_that_cannot_lock_is_not_in_use(message: str) -> None:
    assert not in_use(message)
