"""deltavault restore: restore a snapshot or chosen paths of it."""

from __future__ import annotations

import argparse
import os

from deltavault.cli.common import Context, human, problem_lines
from deltavault.cli.volume_restore import add_volume_options, run_volume_restore
from deltavault.errors import ExitCode, UsageError
from deltavault.fs.paths import display, exact, one_line
from deltavault.fs.patterns import Pattern
from deltavault.repository.snapshots import short_id
from deltavault.restore.dryrun import DryRun, dry_run
from deltavault.restore.files import FileRestorer
from deltavault.restore.options import RestoreOptions


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("restore", help="restore a snapshot")
    p.add_argument("snapshot", help="snapshot id, a unique prefix, or 'latest'")
    p.add_argument("-t", "--target", help="directory to restore into")
    p.add_argument("-i", "--include", action="append", default=[], metavar="PATTERN",
                   help="restore only what matches (repeatable): a path (data/reports, /srv/data/reports) "
                        "or a pattern (data/*.txt, '**/*.conf'); see Patterns in the user guide")
    p.add_argument("-e", "--exclude", action="append", default=[], metavar="PATTERN",
                   help="do not restore what matches, nor what is below it (repeatable)")
    p.add_argument("--delete", action="store_true",
                   help="make the target match the snapshot: remove what it holds and the snapshot does not")
    p.add_argument("-n", "--dry-run", action="store_true", help="say what would be restored and removed; "
                                                               "change nothing")
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
        raise UsageError(f"the target is given with --target: deltavault restore {a.snapshot} --target "
                         f"{a.volume_target} (a TARGET without --target is only for restore --volume)")
    if a.format:
        raise UsageError("--format is for restore --volume (the image format to write)")
    if not a.target:
        raise UsageError("restore needs --target DIR")
    for text in [*a.include, *a.exclude]:
        Pattern(text)  # a bad pattern is a usage error before anything is read
    repo = ctx.open_repo()
    with ctx.read_lock(repo, "restore"):
        sid, snap = ctx.snapshot_of_kind(repo, a.snapshot, "files", "use restore --volume")
        assert snap.tree is not None
        opts = RestoreOptions(include=a.include, exclude=a.exclude, paths=snap.paths,
                              overwrite=a.overwrite or "always", delete=a.delete, verify=a.verify,
                              owner=not a.no_owner, special=not a.no_special, setuid=not a.no_setuid)
        if a.dry_run:
            return _dry_run(ctx, sid, dry_run(repo, snap.tree, os.fsencode(a.target), opts))
        restorer = FileRestorer(repo, a.target, opts, ctx.reporter())
        st = restorer.run(snap.tree)
    probs = restorer.problems
    incomplete = snap.summary.errors if snap.summary is not None else 0
    obj = {"type": "summary", "snapshot": sid, "target": a.target, "files": st.files, "dirs": st.dirs,
           "links": st.links, "special": st.special, "skipped_special": st.skipped_special,
           "bytes_written": st.bytes_written, "bytes_verified": st.bytes_verified, "verified": a.verify,
           "skipped": st.skipped, "deleted": st.deleted, "dry_run": False, "ntfs_not_kept": st.ntfs_not_kept,
           "warnings": [w.__dict__ for w in restorer.warnings],
           "snapshot_incomplete": incomplete, "errors": len(probs), "problems": [p.__dict__ for p in probs]}
    text = (f"restored snapshot {short_id(sid)} to {a.target}: {st.files} files, {st.dirs} dirs, "
            f"{st.links} hard links, {st.special} other; {human(st.bytes_written)}")
    if st.skipped:
        text += f"\nleft {st.skipped} existing entr{'y' if st.skipped == 1 else 'ies'} as they were (--overwrite " \
                f"{opts.overwrite})"
    if st.deleted:
        text += f"\nremoved {st.deleted} entr{'y' if st.deleted == 1 else 'ies'} the snapshot does not have (--delete)"
    if st.skipped_special:
        text += f"\nskipped {st.skipped_special} device node(s) and FIFO(s) (--no-special)"
    for w in restorer.warnings:
        text += f"\nwarning: {w.message}"
    if incomplete and snap.summary is not None:
        shown = snap.summary.incomplete
        text += (f"\nnote: this snapshot is incomplete: {incomplete} entr{'y' if incomplete == 1 else 'ies'} "
                 "could not be read when it was taken, so the restore cannot hold them"
                 + "".join(f"\n  {one_line(p)}" for p in shown)  # stored: one line each
                 + (f"\n  ... and {incomplete - len(shown)} more" if incomplete > len(shown) else ""))
    if a.verify:
        text += f"\nverified: {human(st.bytes_verified)} re-read, " + (
            "all match" if not any(p.kind == "verify" for p in probs) else "MISMATCHES found")
    if probs:
        text += f"\n{len(probs)} problem(s):\n" + "\n".join(problem_lines(probs))
    ctx.emit(obj, text)
    if any(p.kind == "corrupt" for p in probs):
        return int(ExitCode.CORRUPT)
    return int(ExitCode.PARTIAL) if probs else 0


def _dry_run(ctx: Context, sid: str, d: DryRun) -> int:
    a = ctx.args
    for path in d.deleted:
        ctx.emit({"type": "delete", "path": exact(path), "dry_run": True}, f"would remove {display(path)}")
    for path in d.unreadable:
        ctx.emit({"type": "problem", "kind": "corrupt", "path": exact(path), "message": "directory listing unreadable"},
                 f"corrupt: {display(path) or '/'}: directory listing unreadable")
    for pattern in d.unmatched:
        ctx.emit({"type": "problem", "kind": "missing", "path": pattern, "message": "matches nothing in the snapshot"},
                 f"missing: {pattern}: matches nothing in the snapshot")
    ctx.emit({"type": "summary", "snapshot": sid, "target": a.target, "dry_run": True, "files": d.files,
              "replaced": d.replaced, "dirs": d.dirs, "special": d.other, "bytes_written": d.nbytes,
              "skipped": d.skipped, "deleted": len(d.deleted), "errors": len(d.unmatched) + len(d.unreadable)},
             f"dry run: restoring {short_id(sid)} to {a.target} would write {d.files} files ({human(d.nbytes)}; "
             f"{d.replaced} replacing entries there), {d.dirs} dirs, {d.other} other; leave {d.skipped} existing "
             f"entr{'y' if d.skipped == 1 else 'ies'} and remove {len(d.deleted)}; nothing was changed")
    if d.unreadable:
        return int(ExitCode.CORRUPT)
    return int(ExitCode.PARTIAL) if d.unmatched else 0
