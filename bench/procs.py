"""Reading a process tree from /proc, for the memory benchmarks (memory.py, sparse_memory.py)."""

from __future__ import annotations

import os


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (every thread's), or none once it is gone."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return out
