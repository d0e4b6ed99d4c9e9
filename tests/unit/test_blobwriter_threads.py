"""Workers that fill packs at the same moment, when no uploader runs yet (the first packs of
a backup, or the first after a flush): each started an uploader on a queue of its own, and
a pack put on a queue no uploader read was never written, though its blobs were saved (a
snapshot naming blobs the repository lacks), or flush waited for an uploader that never got
its end mark. Run in a child process with a time limit, so a hang fails this test."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import sys, threading
    from deltavault.model.types import BlobType
    from deltavault.repository.blobs import BlobReader, BlobWriter
    from deltavault.repository.cache import ObjectCache
    from deltavault.repository.envelope import Envelope
    from deltavault.repository.indexstore import IndexStore, WriteStats
    from deltavault.testing.memory import MemoryBackend

    sys.setswitchinterval(1e-6)  # threads switch as often as they can: the race shows at once
    THREADS = 4
    for r in range(300):
        backend = MemoryBackend()
        env = Envelope(None)
        indexes = IndexStore(backend, env, ObjectCache(backend, None), WriteStats())
        writer = BlobWriter(backend, env, indexes, pack_size=1, spool=False)  # each blob fills a pack
        meet = threading.Barrier(THREADS)
        ids: list[bytes] = [b""] * THREADS

        def save(i: int) -> None:
            meet.wait()
            ids[i] = writer.save(BlobType.DATA, b"%d-%d" % (r, i))[0]

        threads = [threading.Thread(target=save, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        writer.flush()
        reader = BlobReader(backend, env, indexes)
        for i, bid in enumerate(ids):
            assert reader.load(bid) == b"%d-%d" % (r, i), (r, i)
        assert [t.name for t in threading.enumerate() if t.name == "dv-upload"] == []
    print("ok")
''')


def test_packs_filled_at_once_by_workers_are_all_written() -> None:
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", (p.returncode, p.stderr[-2000:])
