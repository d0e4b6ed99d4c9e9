"""deltavault copy: copy snapshots from another repository into this one (-r)."""

from __future__ import annotations

import argparse
import os

from deltavault.cli.common import Context, human, pack_summary, read_secret, when
from deltavault.cli.snapshot_filters import add_filters, filtered
from deltavault.errors import ExitCode, UsageError, WrongPassword
from deltavault.maintenance.copy import Copier, describe
from deltavault.repository.snapshots import short_id


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("copy", help="copy snapshots from another repository (--from-repo) into this one")
    p.add_argument("snapshots", nargs="*", help="snapshots to copy (default: all that pass the filters)")
    p.add_argument("--from-repo", metavar="LOCATION", help="the source repository (env DELTAVAULT_FROM_REPOSITORY)")
    p.add_argument("--from-password-file", metavar="FILE",
                   help="the source's password (env DELTAVAULT_FROM_PASSWORD_FILE, or DELTAVAULT_FROM_PASSWORD)")
    p.add_argument("--from-insecure-no-password", action="store_true", help="the source's password is empty")
    p.add_argument("--from-insecure-no-encryption", action="store_true",
                   help="the source is not encrypted: read it all the same (refused otherwise)")
    add_filters(p)
    p.set_defaults(func=run)


def _from_password(a: argparse.Namespace) -> bytes:
    if a.from_insecure_no_password:
        return b""
    return read_secret("DELTAVAULT_FROM_PASSWORD", a.from_password_file or
                       os.environ.get("DELTAVAULT_FROM_PASSWORD_FILE"), what="source repository's password",
                       prompt="source repository password: ",
                       hint="use --from-password-file, DELTAVAULT_FROM_PASSWORD_FILE or DELTAVAULT_FROM_PASSWORD")


def run(ctx: Context) -> int:
    a = ctx.args
    location = a.from_repo or os.environ.get("DELTAVAULT_FROM_REPOSITORY")
    if not location:
        raise UsageError("copy needs the source: --from-repo LOCATION (this repository, -r, is the target)")
    try:
        src = ctx.open_repo(location=location, password=lambda: _from_password(a),
                            unencrypted=a.from_insecure_no_encryption)
    except WrongPassword as exc:
        raise WrongPassword(f"{exc.message} (the source repository, --from-repo)") from exc
    dst = ctx.open_repo()
    with ctx.read_lock(src, "copy (source)"), dst.lock(command="copy", wait=a.lock_wait):
        snaps = filtered(src, a, a.snapshots)
        copier = Copier(src, dst, ctx.reporter())
        if copier.packs.warning():
            ctx.warn(copier.packs.warning("copy"))
        reporter = copier.reporter
        reporter.start("copy")
        try:
            for sid, snap in snaps:
                new = copier.copy(sid, snap)
                if new is not None:
                    ctx.emit({"type": "copy", "snapshot": sid, "copy": new, "action": "copied"},
                             f"copied {short_id(sid)} ({when(snap)}) as {short_id(new)}")
                copier.save_map()
        finally:
            reporter.finish()
    st = copier.stats
    for sid, existing in st.skipped:
        ctx.emit({"type": "copy", "snapshot": sid, "copy": existing, "action": "skipped"},
                 f"skipped {short_id(sid)}: already in the target as {short_id(existing)}")
    for sid, why in st.refused:
        ctx.emit({"type": "copy", "snapshot": sid, "copy": None, "action": "refused", "reason": why})
    ctx.emit({"type": "copy_summary", "copied": len(st.copied), "skipped": len(st.skipped),
              "refused": len(st.refused), "blobs_read": st.blobs_read, "bytes_read": st.bytes_read,
              "blobs_new": st.blobs_new, **pack_summary(copier.packs)}, describe(st) + f"; {human(st.bytes_read)} read from the source")
    return int(ExitCode.PARTIAL) if st.refused else 0
