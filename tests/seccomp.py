"""A real seccomp filter for a child process: the kernel answers one system call with an
error, as container runtimes and systemd's SystemCallFilter do (older Docker profiles
refuse copy_file_range with EPERM). Linux on x86_64 or aarch64."""

from __future__ import annotations

import ctypes
import platform
import struct

NUMBERS = {"copy_file_range": {"x86_64": 326, "aarch64": 285}, "fsetxattr": {"x86_64": 190, "aarch64": 7}}
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
_RET_ERRNO, _RET_ALLOW = 0x00050000, 0x7FFF0000


class _Fprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def refuse(syscall: str, err: int) -> None:
    """From now on, in this process, ``syscall`` fails with ``err`` (for good: a filter
    cannot be removed)."""
    nr = NUMBERS[syscall][platform.machine()]
    prog = b"".join([struct.pack("HBBI", _LD_W_ABS, 0, 0, 0),  # the system call's number
                     struct.pack("HBBI", _JEQ_K, 0, 1, nr),
                     struct.pack("HBBI", _RET_K, 0, 0, _RET_ERRNO | err),
                     struct.pack("HBBI", _RET_K, 0, 0, _RET_ALLOW)])
    buf = ctypes.create_string_buffer(prog)
    fprog = _Fprog(len(prog) // 8, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS, which a filter needs
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")
