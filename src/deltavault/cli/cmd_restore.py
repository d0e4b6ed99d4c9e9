"""deltavault restore: restore a snapshot or chosen paths of it."""

from __future__ import annotations

import argparse

from deltavault.cli.common import Context, human
from deltavault.cli.volume_restore import add_volume_options, run_volume_restore
from deltavault.errors import ExitCode, UsageError
from deltavault.repository.snapshots import short_id
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("restore", help="restore a snapshot")
    p.add_argument("snapshot", help="snapshot id, a unique prefix, or 'latest'")
    p.add_argument("-t", "--target", help="directory to restore into")
    p.add_argument("-i", "--include", action="append", default=[], metavar="PATH",
                   help="restore only this path of the snapshot (repeatable)")
    p.add_argument("--verify", action="store_true", help="re-read every written file and check it")
    p.add_argument("--no-owner", action="store_true", help="do not restore ownership")
    p.add_argument("--no-special", action="store_true",
                   help="skip device nodes and FIFOs (symlinks are still restored)")
    p.add_argument("--no-setuid", action="store_true",
                   help="clear the setuid and setgid bits of restored files")
    add_volume_options(p)
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    if a.volume:
        return run_volume_restore(ctx)
    if a.volume_target:
        raise UsageError(f"unexpected argument {a.volume_target!r} (a volume TARGET needs --volume)")
    if not a.target:
        raise UsageError("restore needs --target DIR")
    repo = ctx.open_repo()
    with ctx.read_lock(repo, "restore"):
        sid, snap = ctx.snapshot_of_kind(repo, a.snapshot, "files", "use restore --volume")
        assert snap.tree is not None
        opts = RestoreOptions(include=a.include, verify=a.verify, owner=not a.no_owner,
                              special=not a.no_special, setuid=not a.no_setuid)
        restorer = FileRestorer(repo, a.target, opts, ctx.reporter())
        st = restorer.run(snap.tree)
    probs = restorer.problems
    incomplete = snap.summary.errors if snap.summary is not None else 0
    obj = {"type": "summary", "snapshot": sid, "target": a.target, "files": st.files, "dirs": st.dirs,
           "links": st.links, "special": st.special, "skipped_special": st.skipped_special,
           "bytes_written": st.bytes_written, "bytes_verified": st.bytes_verified, "verified": a.verify,
           "snapshot_incomplete": incomplete, "errors": len(probs), "problems": [p.__dict__ for p in probs]}
    text = (f"restored snapshot {short_id(sid)} to {a.target}: {st.files} files, {st.dirs} dirs, "
            f"{st.links} hard links, {st.special} other; {human(st.bytes_written)}")
    if st.skipped_special:
        text += f"\nskipped {st.skipped_special} device node(s) and FIFO(s) (--no-special)"
    if incomplete and snap.summary is not None:
        shown = snap.summary.incomplete
        text += (f"\nnote: this snapshot is incomplete: {incomplete} entr{'y' if incomplete == 1 else 'ies'} "
                 "could not be read when it was taken, so the restore cannot hold them"
                 + "".join(f"\n  {p}" for p in shown)
                 + (f"\n  ... and {incomplete - len(shown)} more" if incomplete > len(shown) else ""))
    if a.verify:
        text += f"\nverified: {human(st.bytes_verified)} re-read, " + (
            "all match" if not any(p.kind == "verify" for p in probs) else "MISMATCHES found")
    if probs:
        text += f"\n{len(probs)} problem(s):\n" + "\n".join(f"  {p.kind}: {p.path}: {p.message}" for p in probs)
    ctx.emit(obj, text)
    if any(p.kind == "corrupt" for p in probs):
        return int(ExitCode.CORRUPT)
    return int(ExitCode.PARTIAL) if probs else 0
