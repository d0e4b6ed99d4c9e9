"""deltavault backup: back up files and directories (or a stream, or a volume)."""

from __future__ import annotations

import argparse
import os

from deltavault.backup.files.options import FileBackupOptions
from deltavault.backup.files.run import BackupRequest, BackupResult, run_backup
from deltavault.backup.files.stdin import StdinRequest, run_stdin_backup
from deltavault.cli.backup_inputs import add_input_options, apply_input_options, input_paths
from deltavault.cli.common import Context, human, pack_summary, parse_size, problem_lines
from deltavault.cli.volume_backup import add_volume_options, buffer_memory, run_volume_backup
from deltavault.errors import ExitCode, UsageError
from deltavault.fs.paths import display, exact
from deltavault.repository.snapshots import short_id


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("backup", help="back up files and directories")
    p.add_argument("paths", nargs="*", help="files and directories to back up (with --stdin-from-command: "
                                            "the command and its arguments, after --)")
    p.add_argument("--as", dest="as_path", metavar="PATH",
                   help="record the (single) source as PATH: for a snapshot mounted elsewhere")
    p.add_argument("--source-id", help="key for change tracking (default: host and paths)")
    p.add_argument("--host", help="host name to record")
    p.add_argument("--tag", action="append", default=[], help="tag the snapshot (repeatable)")
    add_input_options(p)
    p.add_argument("--one-file-system", action="store_true", help="do not cross mount points")
    p.add_argument("--force", action="store_true", help="read every file, ignoring change detection")
    p.add_argument("--parent", help="compare with this snapshot instead of the catalog or latest")
    p.add_argument("-n", "--dry-run", action="store_true",
                   help="read and compare everything, write nothing: what would be added")
    p.add_argument("--list", action="store_true",
                   help="list each file as it is decided: A (new), M (modified), U (unmodified)")
    p.add_argument("--skip-if-unchanged", action="store_true",
                   help="save no snapshot when nothing changed since the parent snapshot")
    g = p.add_argument_group("a stream as one file")
    g.add_argument("--stdin", action="store_true", help="back up standard input as one file")
    g.add_argument("--stdin-filename", default="stdin", metavar="NAME",
                   help="the file's name in the snapshot (default %(default)s)")
    g.add_argument("--stdin-from-command", action="store_true",
                   help="back up the output of the command given after --; if it exits with an error, "
                        "no snapshot is saved")
    p.add_argument("--delta-threshold", type=parse_size, default=None, metavar="SIZE",
                   help="files this large are stored as page patches when changed in place (default 32M)")
    p.add_argument("--workers", type=int, default=0, help="worker threads (default: cores)")
    p.add_argument("--buffer-memory", type=parse_size, default=None, metavar="SIZE",
                   help="data read but not yet stored, at most (default 8M, or DELTAVAULT_BUFFER_MEMORY); "
                        "a backup needs about 140 MiB with the default")
    p.add_argument("--snapshot", choices=["auto", "btrfs", "lvm", "vss", "none"], default="none",
                   help="read from a point-in-time snapshot of each source's volume, removed afterwards "
                        "(auto: btrfs or LVM when the source is on one; default: none)")
    add_volume_options(p)
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    if a.volume:
        return run_volume_backup(ctx)
    if a.stdin or a.stdin_from_command:
        return _stdin(ctx)
    paths = input_paths(a)
    if not paths:
        raise UsageError("backup needs at least one path (or --files-from FILE, or --stdin)")
    if a.as_path and len(paths) != 1:
        raise UsageError("--as needs exactly one source path")
    logical = [a.as_path] if a.as_path else [os.path.abspath(p) for p in paths]
    opts = FileBackupOptions(one_file_system=a.one_file_system, read_all=a.force, workers=a.workers,
                             buffer_memory=buffer_memory(a))
    apply_input_options(a, opts)
    if a.list:
        opts.on_file = lambda path, status: ctx.result(
            {"type": "file", "status": status, "path": exact(path)}, f"{status}  {display(path)}")
    if a.delta_threshold:
        opts.delta_threshold = a.delta_threshold
    req = BackupRequest(paths=paths, logical_paths=logical, source_id=a.source_id, tags=a.tag,
                        parent=a.parent, options=opts, snapshot=a.snapshot, dry_run=a.dry_run,
                        skip_if_unchanged=a.skip_if_unchanged)
    if a.host:
        req.hostname = a.host
    repo = ctx.open_repo()
    if a.dry_run:
        with ctx.read_lock(repo, "backup --dry-run"):
            result = run_backup(repo, req, ctx.reporter())
    else:
        with repo.lock(command="backup", wait=a.lock_wait):
            result = run_backup(repo, req, ctx.reporter())
    report(ctx, result)
    return int(ExitCode.PARTIAL) if result.partial else 0


def _stdin(ctx: Context) -> int:
    a = ctx.args
    if a.stdin and a.stdin_from_command:
        raise UsageError("use --stdin or --stdin-from-command, not both")
    if a.stdin_from_command and not a.paths:
        raise UsageError("--stdin-from-command needs the command after --: "
                         "deltavault backup --stdin-from-command -- pg_dump mydb")
    if a.stdin and a.paths:
        raise UsageError("--stdin backs up standard input and takes no paths")
    req = StdinRequest(filename=a.stdin_filename, command=list(a.paths) if a.stdin_from_command else [],
                       tags=a.tag, dry_run=a.dry_run)
    if a.host:
        req.hostname = a.host
    repo = ctx.open_repo()
    with repo.lock(command="backup --stdin", wait=a.lock_wait):
        result = run_stdin_backup(repo, req, ctx.reporter())
    report(ctx, result)
    return 0


def report(ctx: Context, r: BackupResult) -> None:
    st = r.stats
    problems = [p for p in r.problems if p.partial]
    rejected = r.snapshot.summary.rejected if r.snapshot.summary else []
    obj = {"type": "summary", "snapshot": r.snapshot_id, "parent": r.parent, "change_source": r.change_source,
           "files_new": st.files_new, "files_changed": st.files_changed, "files_unmodified": st.files_unmodified,
           "files_reread": st.files_reread, "dirs": st.dirs, "bytes_read": st.bytes_read,
           "bytes_total": st.bytes_total, "bytes_added": r.bytes_added, "bytes_downloaded": r.bytes_downloaded,
           "seconds": round(r.seconds, 3), "errors": len(problems), "dry_run": r.dry_run, "skipped": r.skipped,
           **pack_summary(r.packs),
           **({"source_snapshots": r.snapshots} if r.snapshots else {}),
           "rejected": [{"source": x.source, "reason": x.reason} for x in rejected],
           "problems": [{"path": p.path, "kind": p.kind, "message": p.message, "partial": p.partial}
                        for p in r.problems]}
    parent = (f" (parent {short_id(r.parent)}, compared via {r.change_source})" if r.parent
              else " (first run: no parent)")
    if r.snapshot_id is not None:
        head = f"snapshot {short_id(r.snapshot_id)} saved" + parent
    elif r.dry_run:
        head = "dry run: nothing was written" + parent
    else:
        head = f"nothing changed since snapshot {short_id(r.parent or '')}: no snapshot saved (--skip-if-unchanged)"
    lines = [
        head,
        f"files:      {st.files_new} new, {st.files_changed} changed, {st.files_unmodified} unmodified; {st.dirs} dirs"
        + (f" ({st.files_reread} re-read for the racy window)" if st.files_reread else ""),
        f"read:       {human(st.bytes_read)} of {human(st.bytes_total)}",
        f"added:      {human(r.bytes_added)} to the repository" if not r.dry_run else
        f"would add:  {human(r.bytes_added)} (before compression)",
        f"downloaded: {human(r.bytes_downloaded)} from the repository",
        f"time:       {r.seconds:.2f} s",
    ]
    for s in r.snapshots:
        lines.append(f"source:     {s['path']} read from a {s['kind']} snapshot"
                     + (f" ({s['snapshot']})" if s["snapshot"] else "") + (f"; {s['note']}" if s["note"] else ""))
    lines += [f"passed over {x.source}: {x.reason}" for x in rejected]
    lines += [f"warning:    {p.message}" for p in r.problems if p.kind in ("catalog", "repository", "host secret")]
    if problems:
        lines.append(f"{len(problems)} file(s) could not be saved completely:")
        lines += problem_lines(problems)
    ctx.emit(obj, "\n".join(lines))
