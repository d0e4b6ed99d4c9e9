"""Mounting and unmounting: in the foreground for ``deltavault mount``, or on a private
directory in a thread of this process for the commands that read an image through the
mount (file-level restore, the NBD export).

Leaving: libfuse's own handlers take SIGINT, SIGTERM and SIGHUP in the foreground and
unmount before ``run_foreground`` returns; ``fusermount3 -u`` (or ``umount``) from outside
ends it the same way. A background mount is unmounted by ``BackgroundMount.__exit__``,
which the caller reaches on every exit path (Python turns SIGINT and, in the CLI,
SIGTERM into exceptions); only SIGKILL can leave one behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType

from deltavault.errors import DeltavaultError, TargetError, Unavailable
from deltavault.fs.mounts import parse_mountinfo, read_mountinfo
from deltavault.fs.trusted import open_target_root
from deltavault.restore.mount.namespace import Namespace

FUSE_DEVICE = (10, 229)  # misc major, FUSE minor
READY_WAIT = 30.0
READ_AHEAD_KB = 1024
MAX_THREADS = 16  # libfuse's worker threads; Python runs one at a time, C code in parallel


@dataclass
class MountOptions:
    allow_other: bool = False  # other users may enter (the snapshots' own permissions apply)
    debug: bool = False  # libfuse's request log on stderr


@contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP wait until the block is done, then raise
    KeyboardInterrupt: a step that mounts, attaches or undoes either happens and is
    recorded, or does not happen. (Blocking the signals would not do: libfuse's threads
    would take them, and Python runs the handler in the main thread anyway.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old = {s: signal.signal(s, lambda signum, _frame: got.append(signum))
           for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if got:
        raise KeyboardInterrupt


def check_fuse() -> None:
    """Raise ``Unavailable`` unless this machine can make a FUSE mount."""
    hint = "load the fuse module (modprobe fuse); in a container, pass the device /dev/fuse"
    try:
        st = os.stat("/dev/fuse")
    except OSError:
        raise Unavailable(f"FUSE is not available: /dev/fuse is missing ({hint})") from None
    if not stat.S_ISCHR(st.st_mode) or (os.major(st.st_rdev), os.minor(st.st_rdev)) != FUSE_DEVICE:
        raise Unavailable(f"FUSE is not available: /dev/fuse is not the FUSE device ({hint})")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        raise Unavailable(f"FUSE is not available: /dev/fuse: {exc.strerror}") from None
    try:
        from deltavault.restore.mount import fuseops  # loads libfuse3
    except (ImportError, OSError) as exc:
        raise Unavailable(f"FUSE is not available: libfuse3 or mfusepy is missing ({exc}); "
                          "scripts/install-system-deps.sh and pip install -e . install them") from None
    if fuseops.LIBFUSE_MAJOR != 3:
        raise Unavailable("FUSE is not available: libfuse 3 is missing (install fuse3)")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise Unavailable("FUSE is not available: fusermount3 is missing (install fuse3)")


def is_mount_point(path: str) -> bool:
    real = os.path.realpath(path)
    return any(m.mount_point == real for m in parse_mountinfo(read_mountinfo()))


def check_mount_point(path: str) -> str:
    """The absolute mount point, without symlinks, refused when it is missing, not a
    directory, in use, or reached through another user's symlink (fs/trusted.py: one alice
    made, ``/home/alice/mnt -> /etc``, had root's mount hide /etc under the snapshot)."""
    try:
        fd = open_target_root(os.fsencode(path), "the mount point", create=False)
    except FileNotFoundError:
        raise TargetError(f"mount point {path} does not exist (create the directory first)") from None
    try:
        real = os.fsdecode(os.readlink(f"/proc/self/fd/{fd}"))  # the kernel's name of what was opened
    finally:
        os.close(fd)
    if is_mount_point(real):
        raise TargetError(f"mount point {path} is busy: something is mounted there already "
                          f"(fusermount3 -u {path} or umount it first)")
    return real


def _mount(ns: Namespace, mount_point: str, opts: MountOptions, on_ready: Callable[[], None]) -> None:
    from deltavault.restore.mount.fuseops import Fuse, MountOps

    mounted = threading.Event()
    # fuse_main changes the process's directory to / before it serves (in the foreground
    # too), for every thread: a repository given by a relative path was then looked for under
    # / and every file read failed (test_mount_files.py). Put back in init, before any request.
    cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def ready() -> None:
        os.fchdir(cwd)
        # init runs before libfuse has answered the kernel's INIT: the mount is not usable
        # (nor can it be unmounted) until then, so the caller hears of it from a thread that
        # waits for the first answer from the mount itself (a stat of its root).
        mounted.set()
        threading.Thread(target=_announce, args=(mount_point, on_ready), daemon=True).start()

    try:
        Fuse(MountOps(ns, ready), mount_point, foreground=True, ro=True, default_permissions=True,
             allow_other=opts.allow_other, fsname="deltavault", subtype="deltavault", debug=opts.debug,
             max_threads=MAX_THREADS, max_idle_threads=MAX_THREADS)
    except RuntimeError as exc:
        # fuse_main's 8: its loop ended by a signal, after which it unmounted: a clean exit.
        # Anything else: it never mounted, and libfuse said why on stderr.
        if not (mounted.is_set() and str(exc) == "8"):
            raise TargetError(f"cannot mount at {mount_point} (libfuse error {exc})") from None
    finally:
        os.close(cwd)


def _announce(mount_point: str, on_ready: Callable[[], None]) -> None:
    try:
        os.stat(mount_point)  # served by the mount: returns once INIT has been answered
    except OSError:
        pass
    _tune_read_ahead(mount_point)
    on_ready()


def _tune_read_ahead(mount_point: str) -> None:
    """Let the kernel read ahead 1 MiB at a time instead of FUSE's 128 KiB: eight times
    fewer requests for a sequential reader (measured: 270 -> 420 MB/s). Best effort: only
    root may, and after init has returned (stat asks the mount itself)."""
    try:
        dev = os.stat(mount_point).st_dev
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
            f.write(f"{READ_AHEAD_KB}\n")
    except OSError:
        pass


def run_foreground(ns: Namespace, mount_point: str, opts: MountOptions,
                   on_ready: Callable[[], None]) -> None:
    """Serve until unmounted: Ctrl-C, SIGTERM, SIGHUP or ``fusermount3 -u``."""
    # libfuse installs its unmounting handlers only over default ones; Python's would
    # never run while the main thread is inside libfuse.
    old = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        _mount(ns, mount_point, opts, on_ready)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def unmount(path: str) -> bool:
    """Unmount a FUSE mount of ours, waiting while it is busy, then lazily."""
    tool = ["umount"] if os.geteuid() == 0 else ["fusermount3", "-u"]
    for _ in range(50):
        if not is_mount_point(path):
            return True
        if subprocess.run([*tool, path], capture_output=True).returncode == 0:
            return True
        time.sleep(0.1)
    lazy = ["umount", "-l"] if os.geteuid() == 0 else ["fusermount3", "-uz"]
    return subprocess.run([*lazy, path], capture_output=True).returncode == 0


class BackgroundMount:
    """The namespace mounted on a new private directory while the ``with`` block runs."""

    def __init__(self, ns: Namespace, opts: MountOptions | None = None) -> None:
        self.ns = ns
        self.opts = opts or MountOptions()
        self.path = ""
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._old_hup: object = None

    def _run(self) -> None:
        try:
            _mount(self.ns, self.path, self.opts, self._ready.set)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def __enter__(self) -> str:
        check_fuse()
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGHUP) == signal.SIG_DFL:
            # SIGHUP left at its default would be taken by libfuse and unmount under us.
            self._old_hup = signal.signal(signal.SIGHUP, _hangup)
        # Until this returns, the with statement will not call __exit__: whatever ends
        # __enter__ (a signal between two steps too) must undo what it made.
        try:
            with deferred_signals():
                self._start()
                up = self._error is None and is_mount_point(self.path)
            if not up:
                if isinstance(self._error, DeltavaultError):
                    raise self._error
                raise Unavailable(f"the FUSE mount at {self.path} did not come up ({self._error or 'timeout'})")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.path

    def _start(self) -> None:
        self.path = tempfile.mkdtemp(prefix="dv-mount-")  # 0700: ours alone
        # fuse_main changes the process's directory to /; relative paths must keep working.
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._thread = threading.Thread(target=self._run, name="dv-fuse", daemon=True)
            self._thread.start()
            self._ready.wait(READY_WAIT)
        finally:
            os.fchdir(cwd)
            os.close(cwd)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        with deferred_signals():
            if self.path:
                unmount(self.path)
            if self._thread is not None:
                self._thread.join(10)
            if self.path:
                try:
                    os.rmdir(self.path)
                except OSError:
                    pass
                self.path = ""
        if self._old_hup is not None:  # after deferred_signals has put back what it found
            signal.signal(signal.SIGHUP, self._old_hup)  # type: ignore[arg-type]
            self._old_hup = None


def _hangup(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt
