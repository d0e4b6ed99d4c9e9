"""The thread that collects what sync's worker processes send back: it counted the workers
still running by the goodbye each sends, so a worker killed (by the OOM killer, say) left it
waiting forever and the sync hung at its end; and a callback's error killed it silently. Run
in a child process with a time limit, so a hang fails the test and not the session."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import os, signal, sys
    from deltavault.progress import NullReporter
    from deltavault.sync.local.shards import ShardPool

    def subtree(task, rep, buffers, log):
        relpath = task[0]
        if relpath == b"die":
            os.kill(os.getpid(), signal.SIGKILL)  # busy with a subtree, as the OOM killer finds it
        if relpath == b"odd":
            return "odd"
        return relpath

    got = {}
    pool = ShardPool(2, subtree, 4096, None, NullReporter())
    for name in [b"a", b"die", b"b", b"c"]:
        pool.submit(name, False, True, ((0, 0), (0, 0)), [], lambda r, name=name: got.__setitem__(name, r))
    pool.close()
    assert got == {b"a": b"a", b"die": None, b"b": b"b", b"c": b"c"}, got

    def broken(r):
        raise ValueError("a callback failed")

    pool = ShardPool(2, subtree, 4096, None, NullReporter())
    pool.submit(b"odd", False, True, ((0, 0), (0, 0)), [], broken)
    for name in [b"d", b"e"]:
        pool.submit(name, False, True, ((0, 0), (0, 0)), [], lambda r, name=name: got.__setitem__(name, r))
    try:
        pool.close()
    except ValueError as exc:
        assert str(exc) == "a callback failed"
    else:
        raise AssertionError("the callback's error was lost")
    assert got[b"d"] == b"d" and got[b"e"] == b"e", got
    print("ok")
''')


def test_a_killed_worker_and_a_failed_callback_end_the_pool() -> None:
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", (p.returncode, p.stderr[-2000:])
