"""deltavault serve --volume SNAPSHOT: instant recovery over NBD (restore/serve.py)."""

from __future__ import annotations

import argparse

from deltavault.cli.common import Context, human, parse_size
from deltavault.errors import UsageError
from deltavault.fs.paths import shown
from deltavault.repository.snapshots import short_id
from deltavault.restore.mount.blobs import DEFAULT_CACHE
from deltavault.restore.serve import DEFAULT_LISTEN, ServeOptions, serve_volume


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="export a volume snapshot over NBD (boot a VM from the backup)")
    p.add_argument("--volume", required=True, metavar="SNAPSHOT",
                   help="the volume snapshot: an id, a unique prefix, or 'latest'")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--listen", metavar="HOST:PORT", help=f"TCP address to serve on (default {DEFAULT_LISTEN})")
    where.add_argument("--socket", metavar="PATH", help="serve on this Unix socket instead")
    p.add_argument("--writable-overlay", metavar="FILE",
                   help="accept writes into this qcow2 copy-on-write overlay (made if missing; reused "
                        "with the same snapshot); without it the export is read-only")
    p.add_argument("--cache-size", type=parse_size, default=DEFAULT_CACHE, metavar="SIZE",
                   help=f"memory for blocks read (default {human(DEFAULT_CACHE)})")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    repo = ctx.open_repo()
    sid, snap = repo.resolve_snapshot(a.volume, kind="volume" if a.volume == "latest" else None)
    if snap.volume is None:
        raise UsageError(f"snapshot {short_id(sid)} is a {shown(snap.kind)} snapshot: serve exports volume "
                         "snapshots (deltavault mount shows file snapshots)")
    opts = ServeOptions(listen=a.listen, socket=a.socket, overlay=a.writable_overlay, cache_bytes=a.cache_size)

    def ready(uri: str) -> None:
        mode = f"writes go to {opts.overlay}" if opts.overlay else "read-only"
        ctx.emit({"type": "serving", "uri": uri, "snapshot": sid, "overlay": opts.overlay},
                 f"serving volume snapshot {short_id(sid)} at {uri} ({mode})\n"
                 f"e.g. qemu-system-x86_64 -drive file={uri},format=raw ; leave with Ctrl-C")
        ctx.stdout.flush()

    res = serve_volume(repo, sid, snap, opts, ready, ctx.reporter())
    ctx.emit({"type": "summary", "uri": res.address, "bytes_read": res.bytes_read,
              "seconds": round(res.seconds, 3)},
             f"stopped serving {res.address}; read {human(res.bytes_read)} from the repository")
    return 0
