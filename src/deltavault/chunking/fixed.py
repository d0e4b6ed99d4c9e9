"""Fixed-size blocks (volumes) and block-aligned helpers."""

from __future__ import annotations

MIN_BLOCK = 4 * 1024
MAX_BLOCK = 4 * 1024 * 1024


def check_block_size(size: int) -> int:
    if size < MIN_BLOCK or size > MAX_BLOCK or size & (size - 1):
        raise ValueError(f"block size must be a power of two from 4 KiB to 4 MiB, not {size}")
    return size


def blocks(total: int, block_size: int) -> range:
    return range((total + block_size - 1) // block_size)
