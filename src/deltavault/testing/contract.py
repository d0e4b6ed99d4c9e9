"""The contract every storage backend passes, as pytest test classes.

A test module subclasses ``BackendContract`` and provides the fixture ``new_backend``: a
callable returning a backend at a fresh, empty location each time it is called. Backends
that other processes can open by location (local, sftp, S3) also subclass
``CrashContract`` (a writer SIGKILLed in the middle of a put) and, where a full disk can be
arranged, ``FullDiskContract`` with the fixture ``full_backend`` (a backend with about
1 MiB of room left). Backends that store from a file without reading it into memory
(``put_file``: local, sftp, S3) also subclass ``StreamingPutContract``.

What is asserted is what the layers above rely on: a put is atomic (a reader, a lister or
a crash never sees part of an object), names cannot leave the root, listings are complete
and show no temporary objects, and failures arrive as the typed exceptions of
``deltavault.errors`` with the right retryability.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Callable

import pytest

from deltavault.backends.base import TEMP_PREFIX, Backend, put_file
from deltavault.errors import BackendError, NoSpace, ObjectNotFound

NewBackend = Callable[[], Backend]
MiB = 1024 * 1024


class BackendContract:
    def test_a_fresh_location_exists_once_written(self, new_backend: NewBackend) -> None:
        b = new_backend()
        assert not b.exists()
        assert list(b.list("")) == []
        b.put("config", b"c")
        assert b.exists()

    def test_round_trip_and_ranged_reads(self, new_backend: NewBackend) -> None:
        b = new_backend()
        data = os.urandom(3 * MiB + 17)  # several requests for network backends
        b.put("data/ab/ab01", data)
        assert b.get("data/ab/ab01") == data
        assert b.get("data/ab/ab01", 1000, 5000) == data[1000:6000]
        assert b.get("data/ab/ab01", -40) == data[-40:]
        assert b.get("data/ab/ab01", len(data) - 3, 100) == data[-3:]
        assert b.get("data/ab/ab01", 5, len(data) + 300_000) == data[5:]
        assert b.get("data/ab/ab01", 0, 10) == data[:10]  # still answering in order
        b.put("empty", b"")
        assert b.get("empty") == b"" and b.stat("empty").size == 0

    def test_put_file_stores_the_first_bytes_of_a_file(self, new_backend: NewBackend) -> None:
        """A spooled pack: the first ``size`` bytes of the file, whatever follows them and
        wherever the file's position is; a second put of it (a retry) stores it again whole."""
        b = new_backend()
        data = os.urandom(3 * MiB + 17)
        with tempfile.TemporaryFile() as f:
            f.write(data + b"not part of the object")
            f.flush()
            for _ in range(2):
                put_file(b, "data/ab/ab02", f.fileno(), len(data))
                assert b.get("data/ab/ab02") == data and b.stat("data/ab/ab02").size == len(data)
            put_file(b, "index/empty", f.fileno(), 0)
            assert b.get("index/empty") == b""

    def test_listing_is_complete_and_shows_no_temporary_object(self, new_backend: NewBackend) -> None:
        b = new_backend()
        names = {"config": 1, "index/i1": 2, "data/00/p1": 3, "data/ff/p2": 4, "snapshots/s": 5}
        for n, size in names.items():
            b.put(n, b"x" * size)
        b.put(f"data/00/{TEMP_PREFIX}-p3-abc", b"half")  # what a killed writer leaves
        assert sorted((o.name, o.size) for o in b.list("")) == sorted(names.items())
        assert sorted(o.name for o in b.list("data/")) == ["data/00/p1", "data/ff/p2"]
        assert [o.name for o in b.list("index/")] == ["index/i1"]
        assert list(b.list("locks/")) == []

    def test_stat_replace_and_delete(self, new_backend: NewBackend) -> None:
        b = new_backend()
        b.put("index/i1", b"x")
        assert b.stat("index/i1").size == 1
        b.put("index/i1", b"yz")  # a replace is atomic too
        assert b.get("index/i1") == b"yz" and b.stat("index/i1").size == 2
        b.delete("index/i1")
        b.delete("index/i1")  # deleting what is gone is not an error
        assert list(b.list("index/")) == []

    def test_missing_objects_are_typed_and_not_retryable(self, new_backend: NewBackend) -> None:
        b = new_backend()
        b.put("index/short", b"12345")
        for call in (lambda: b.get("index/nope"), lambda: b.stat("index/nope"),
                     lambda: b.get("index/short", -10)):
            with pytest.raises(ObjectNotFound) as err:
                call()
            assert err.value.retryable is False

    def test_names_cannot_leave_the_root(self, new_backend: NewBackend) -> None:
        b = new_backend()
        calls: list[Callable[[str], object]] = [b.get, lambda n: b.put(n, b"x"), b.delete, b.stat]
        for bad in ("../escape", "/etc/passwd", "data/../../escape"):
            for call in calls:
                with pytest.raises(BackendError) as err:
                    call(bad)
                assert err.value.retryable is False

    def test_readers_never_see_part_of_an_object(self, new_backend: NewBackend) -> None:
        b = new_backend()
        versions = [b"a" * (2 * MiB), b"b" * (3 * MiB + 1), b"c" * 4097]
        seen: set[bytes] = set()
        bad: list[str] = []
        done = threading.Event()

        def read() -> None:
            while not done.is_set():
                try:
                    got = b.get("data/obj")
                except ObjectNotFound:
                    continue
                if got not in versions:
                    bad.append(f"read {len(got)} bytes, not one whole version")
                seen.add(got[:1])
                bad.extend(f"listed {o.name}" for o in b.list("data/") if TEMP_PREFIX in o.name)

        reader = threading.Thread(target=read)
        reader.start()
        try:
            for i in range(24):
                b.put("data/obj", versions[i % 3])
        finally:
            done.set()
            reader.join()
        assert bad == []
        assert b.get("data/obj") == versions[23 % 3]

    def test_concurrent_writers(self, new_backend: NewBackend) -> None:
        b = new_backend()

        def write(t: int) -> None:
            for i in range(15):
                b.put(f"data/{t:02x}/obj{i}", bytes([t]) * (1000 + i))

        threads = [threading.Thread(target=write, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        listed = {o.name: o.size for o in b.list("data/")}
        assert len(listed) == 60
        for t in range(4):
            assert b.get(f"data/{t:02x}/obj7") == bytes([t]) * 1007


class CrashContract:
    """A writer process SIGKILLed at random moments of a large put: afterwards the object is
    either absent or complete, and no temporary object is listed. Needs ``new_backend``
    backends whose ``location()`` ``open_backend`` accepts in another process, and the
    environment that process needs in ``backend_env`` (a fixture; {} if none)."""

    def test_a_writer_killed_in_a_put_leaves_no_partial_object(self, new_backend: NewBackend,
                                                                backend_env: dict[str, str]) -> None:
        b = new_backend()
        b.put("config", b"c")
        size = 48 * MiB
        script = textwrap.dedent(f"""
            import sys, time
            from deltavault.backends import open_backend
            b = open_backend({b.location()!r})
            data = bytes([int(sys.argv[1])]) * {size}
            t0 = time.monotonic()
            b.put("data/warm-" + sys.argv[1], data)
            sys.stdout.write(f"{{time.monotonic() - t0}}\\n"); sys.stdout.flush()
            b.put("data/big", data)
            sys.stdout.write("done\\n"); sys.stdout.flush()
        """)
        rng = random.Random(7)
        outcomes = {"absent": 0, "whole": 0}
        for trial in range(6):
            p = subprocess.Popen([sys.executable, "-c", script, str(trial + 1)], stdout=subprocess.PIPE,
                                 env={**os.environ, **backend_env}, text=True)
            assert p.stdout is not None
            took = float(p.stdout.readline())  # how long one such put takes here
            time.sleep(rng.uniform(0.0, took))  # so the kill lands anywhere in the second
            b.delete(f"data/warm-{trial + 1}")
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
            try:
                got = b.get("data/big")
            except ObjectNotFound:
                outcomes["absent"] += 1
            else:
                assert len(got) == size and got.count(got[:1]) == size, "a partial or mixed object is visible"
                outcomes["whole"] += 1
            assert [o.name for o in b.list("data/")] in ([], ["data/big"])
        print(f"killed puts: {outcomes}")  # which happens is the kernel's business; both are sound


class StreamingPutContract:
    """``put_file`` sends the file without holding the object in memory: the Python
    allocations of a 48 MiB put_file peak under 8 MiB (tracemalloc; the object read back
    matches). A backup's packs go up this way (issue #18: peak memory)."""

    def test_put_file_does_not_hold_the_object_in_memory(self, new_backend: NewBackend) -> None:
        b = new_backend()
        b.put("config", b"c")  # connected first: the connection's own allocations are not the put's
        size = 48 * MiB
        digest = hashlib.sha256()
        with tempfile.TemporaryFile() as f:
            for _ in range(size // MiB):
                piece = os.urandom(MiB)
                digest.update(piece)
                f.write(piece)
            f.flush()
            tracemalloc.start()
            try:
                put_file(b, "data/cd/big", f.fileno(), size)
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        assert peak < 8 * MiB, f"put_file of {size >> 20} MiB allocated up to {peak / MiB:.1f} MiB"
        assert b.stat("data/cd/big").size == size
        assert hashlib.sha256(b.get("data/cd/big")).digest() == digest.digest()


class FullDiskContract:
    """A put that does not fit raises NoSpace (not retryable), leaves nothing behind, and
    what was stored before is intact. Needs the fixture ``full_backend``. 2 MiB: just over
    the room, where only the last writes of the put are refused."""

    @pytest.mark.parametrize("how", ["put", "put_file"])
    @pytest.mark.parametrize("size", [2 * MiB, 8 * MiB])
    def test_a_full_disk_is_no_space_and_keeps_what_was_stored(self, full_backend: Backend, size: int,
                                                               how: str) -> None:
        b = full_backend
        b.put("index/small", b"kept")
        data = os.urandom(size)
        with pytest.raises(NoSpace) as err:
            if how == "put":
                b.put("data/00/huge", data)
            else:
                with tempfile.TemporaryFile() as f:
                    f.write(data)
                    f.flush()
                    put_file(b, "data/00/huge", f.fileno(), size)
        assert err.value.retryable is False
        assert b.get("index/small") == b"kept"
        assert [o.name for o in b.list("data/")] == []
