"""deltavault init: create a repository."""

from __future__ import annotations

import argparse

from deltavault.backends.base import unwrap
from deltavault.backends.retention import Retention
from deltavault.backends.s3 import S3Backend
from deltavault.cli.common import Context, parse_size, read_password, require_password
from deltavault.errors import UsageError
from deltavault.repository.config import DEFAULT_COMPRESSION, DEFAULT_PACK_SIZE, USEFUL_PACK_SIZES
from deltavault.repository.repository import Repository


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create a repository")
    p.add_argument("--pack-size", type=_pack_size, default=DEFAULT_PACK_SIZE, metavar="SIZE",
                   help="target pack size, 4M to 128M (default 32M)")
    p.add_argument("--compression", type=_compression, default=DEFAULT_COMPRESSION,
                   help="'auto' (default: level 3 for text-like data, -3 for high-entropy data) or a zstd level")
    p.add_argument("--immutable", type=int, metavar="DAYS",
                   help="S3: keep everything written (packs, index, snapshots, keys, config) under Object "
                        "Lock retention for DAYS days after each write; the bucket needs Object Lock "
                        "(created with it when missing)")
    p.add_argument("--immutable-mode", choices=["governance", "compliance"], default="governance",
                   help="governance (default): the bypass permission can still delete early; compliance: "
                        "no one can, not even the account's root")
    p.set_defaults(func=run)


def _pack_size(text: str) -> int:
    size = parse_size(text)
    low, high = USEFUL_PACK_SIZES
    if not low <= size <= high:
        raise argparse.ArgumentTypeError(
            f"{text} is outside 4 MiB to 128 MiB: smaller packs mean many objects and requests, larger "
            "ones slow uploads and prune's repacking (the default, 32 MiB, suits disks and object stores)")
    return size


def _compression(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("compression is 'auto' or a zstd level such as 3") from None


def run(ctx: Context) -> int:
    a = ctx.args
    backend = ctx.backend()
    retention = ""
    if a.immutable is not None:
        retention = str(Retention.parse(f"{a.immutable_mode}:{a.immutable}"))
    # --insecure-no-encryption (a global option: every later command gives it too)
    pw = None if a.insecure_no_encryption else require_password(read_password(a, confirm=True), a, "password")
    store = unwrap(backend)
    if isinstance(store, S3Backend):
        note = store.prepare_bucket(object_lock=bool(retention))
        if note:
            ctx.say(note)
    elif retention:
        raise UsageError("--immutable needs a repository on S3 with Object Lock (-r s3:...)")
    # The cache options hold here too: --no-cache made a cache folder, --cache-dir one elsewhere.
    repo = Repository.init(backend, pw, pack_size=a.pack_size, compression=a.compression, retention=retention,
                           cache_root=ctx.cache_root(), use_cache=not a.no_cache)
    ctx.emit({"type": "init", "repository": backend.location(), "id": repo.config.id,
              "encryption": repo.config.encryption, "retention": retention},
             f"created repository {repo.config.id[:8]} at {backend.location()} "
             f"({'encrypted' if pw is not None else 'NOT encrypted'})"
             + (f"; every object but locks is retained {a.immutable} days ({a.immutable_mode} mode)"
                if retention else ""))
    return 0
