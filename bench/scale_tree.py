"""Trees of N small files for bench/scale_files.py: deterministic, generated untimed.

Sizes are log-uniform from 100 B to 16 KiB (median about 1.3 KiB, mean about 3.2 KiB), as
source trees and mail stores have them: many tiny files, a few larger. Content is half
random bytes and half their hex (so zstd finds something to compress, as in real text),
each file opened by its own index, so no two files are equal and no tool dedups them
away. Layout: ``dNNN/sNNN/fNNN`` with 200 files per leaf and up to 100 leaves per branch,
so directories hold 100 to 1000 entries.

The 1%-change step (``change``) rewrites 1% of the files (new content, same size class),
removes 0.05% and adds 0.05% in a new leaf: the same files for every tool, since it is
seeded.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from pathlib import Path

FILES_PER_LEAF = 200
LEAVES_PER_BRANCH = 100
MIN_SIZE, MAX_SIZE = 100, 16 * 1024


def _pool(seed: int) -> bytes:
    raw = random.Random(seed).randbytes(1 << 20)
    return raw + raw.hex().encode()  # 3 MiB: 1 MiB random, 2 MiB hex of it


def _size(rnd: random.Random) -> int:
    return int(math.exp(rnd.uniform(math.log(MIN_SIZE), math.log(MAX_SIZE))))


def _content(pool: bytes, rnd: random.Random, tag: bytes) -> bytes:
    n = _size(rnd)
    at = rnd.randrange(len(pool) - n)
    return tag + pool[at:at + n]


def rel(i: int) -> str:
    leaf = i // FILES_PER_LEAF
    return f"d{leaf // LEAVES_PER_BRANCH:03d}/s{leaf % LEAVES_PER_BRANCH:03d}/f{i % FILES_PER_LEAF:03d}"


def generate(root: Path, n: int, seed: int = 1, only: set[int] | None = None) -> int:
    """Writes ``n`` files under ``root``; returns their bytes. ``only``: write just these
    (the rest of the sequence is drawn, not written), to put a changed tree back."""
    pool = _pool(seed)
    rnd = random.Random(seed + 1)
    total = 0
    made: set[str] = set()
    for i in range(n):
        data = _content(pool, rnd, b"%d\n" % i)
        if only is not None and i not in only:
            continue
        path = root / rel(i)
        parent = str(path.parent)
        if parent not in made:
            os.makedirs(parent, exist_ok=True)
            made.add(parent)
        with open(path, "wb") as f:
            f.write(data)
        total += len(data)
    return total


def _picked(n: int, seed: int) -> tuple[list[int], list[int]]:
    rnd = random.Random(seed)
    k, r = max(1, n // 100), max(1, n // 2000)
    picked = rnd.sample(range(n), k + r)
    return picked[:k], picked[k:]


def change(root: Path, n: int, seed: int = 2) -> dict[str, int]:
    """Rewrites 1% of the ``n`` files, removes 0.05% and adds as many (deterministic)."""
    pool = _pool(seed)
    rnd = random.Random(seed + 1)
    modified, removed = _picked(n, seed)
    for i in modified:
        (root / rel(i)).write_bytes(_content(pool, rnd, b"changed %d\n" % i))
    for i in removed:
        (root / rel(i)).unlink()
    new = root / "added"
    new.mkdir(exist_ok=True)
    for k in range(len(removed)):
        (new / f"n{k:05d}").write_bytes(_content(pool, rnd, b"added %d\n" % k))
    return {"modified": len(modified), "removed": len(removed), "added": len(removed)}


def put_back(root: Path, n: int, seed: int = 1, change_seed: int = 2) -> None:
    """Undoes ``change``: content and names as ``generate`` made them (times are new)."""
    modified, removed = _picked(n, change_seed)
    shutil.rmtree(root / "added")
    generate(root, n, seed, only={*modified, *removed})
