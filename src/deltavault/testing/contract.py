"""The contract every storage backend passes, as pytest test classes.

A test module subclasses ``BackendContract`` and provides the fixture ``new_backend``: a
callable returning a backend at a fresh, empty location each time it is called. Backends
that other processes can open by location (local, sftp, S3) also subclass
``CrashContract`` (a writer SIGKILLed in the middle of a put) and, where a full disk can be
arranged, ``FullDiskContract`` with the fixture ``full_backend`` (a backend with about
1 MiB of room left).

What is asserted is what the layers above rely on: a put is atomic (a reader, a lister or
a crash never sees part of an object), names cannot leave the root, listings are complete
and show no temporary objects, and failures arrive as the typed exceptions of
``deltavault.errors`` with the right retryability.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import pytest

from deltavault.backends.base import TEMP_PREFIX, Backend
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


class FullDiskContract:
    """A put that does not fit raises NoSpace (not retryable), leaves nothing behind, and
    what was stored before is intact. Needs the fixture ``full_backend``."""

    def test_a_full_disk_is_no_space_and_keeps_what_was_stored(self, full_backend: Backend) -> None:
        b = full_backend
        b.put("index/small", b"kept")
        with pytest.raises(NoSpace) as err:
            b.put("data/00/huge", os.urandom(8 * MiB))
        assert err.value.retryable is False
        assert b.get("index/small") == b"kept"
        assert [o.name for o in b.list("data/")] == []
