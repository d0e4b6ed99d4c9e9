"""deltavault mount: the repository's snapshots as a read-only file system (FUSE)."""

from __future__ import annotations

import argparse
import os

from deltavault.cli.common import Context, human, parse_size
from deltavault.restore.mount.blobs import DEFAULT_CACHE, MountBlobs
from deltavault.restore.mount.namespace import Namespace
from deltavault.restore.mount.session import (
    MountOptions,
    check_fuse,
    check_mount_point,
    run_foreground,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mount", help="mount the snapshots read-only (FUSE); browse and copy files out")
    p.add_argument("mountpoint", help="an empty directory")
    p.add_argument("--snapshot", metavar="ID",
                   help="show only this snapshot (an id, a unique prefix, or 'latest') at the mount point")
    p.add_argument("--cache-size", type=parse_size, default=DEFAULT_CACHE, metavar="SIZE",
                   help=f"memory for blobs read (default {human(DEFAULT_CACHE)})")
    p.add_argument("--refresh", type=float, default=5.0, metavar="SECONDS",
                   help="look for new and removed snapshots this often, when the mount is used (default 5)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users in (each snapshot's own permissions and ACLs apply)")
    p.add_argument("--debug-fuse", action="store_true", help="log every FUSE request on stderr")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    check_fuse()
    where = check_mount_point(a.mountpoint)
    repo = ctx.open_repo()
    blobs = MountBlobs(repo, a.cache_size)
    ns = Namespace(repo, blobs, snapshot=a.snapshot, refresh=a.refresh, reporter=ctx.reporter())

    def ready() -> None:
        ctx.emit({"type": "mounted", "mountpoint": where, "pid": os.getpid()},
                 f"mounted the repository read-only at {where}\n"
                 f"leave with Ctrl-C, 'kill {os.getpid()}' or 'fusermount3 -u {where}'")
        ctx.stdout.flush()

    try:
        run_foreground(ns, where, MountOptions(allow_other=a.allow_other, debug=a.debug_fuse), ready)
    finally:
        blobs.close()
    st = blobs.stats
    ctx.emit({"type": "summary", "mountpoint": where, "bytes_read": repo.traffic.bytes_read,
              "blobs_loaded_bytes": st.bytes_loaded, "cache_hits": st.hits, "cache_misses": st.misses,
              "index_reloads": st.refreshes},
             f"unmounted {where}; read {human(repo.traffic.bytes_read)} from the repository")
    return 0
