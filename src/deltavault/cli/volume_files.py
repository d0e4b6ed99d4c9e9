"""deltavault restore --volume SNAPSHOT --files PATH... --target DIR (restore/volfiles.py)."""

from __future__ import annotations

from deltavault.cli.common import Context, human
from deltavault.errors import ExitCode, UsageError
from deltavault.repository.snapshots import short_id
from deltavault.restore.volfiles import VolumeFilesOptions, restore_volume_files


def run_volume_files(ctx: Context) -> int:
    a = ctx.args
    if not a.target or a.volume_target:
        raise UsageError("restore --volume --files needs --target DIR (and no image TARGET)")
    if a.include or a.overwrite:
        raise UsageError("--include and --overwrite do not apply to --files")
    repo = ctx.open_repo()
    with ctx.read_lock(repo, "restore"):
        sid, snap = ctx.snapshot_of_kind(repo, a.snapshot, "volume", "restore it without --volume")
        opts = VolumeFilesOptions(files=a.files, target=a.target, partition=a.partition, fstype=a.fs,
                                  owner=not a.no_owner)
        res = restore_volume_files(repo, sid, snap, opts, ctx.reporter())
    c = res.copy
    obj = {"type": "summary", "kind": "volume-files", "snapshot": sid, "target": a.target,
           "image": res.image, "fs": res.fstype, "files": c.files, "dirs": c.dirs, "links": c.links,
           "other": c.other, "bytes_copied": c.bytes_copied, "bytes_read": res.bytes_read,
           "volume_size": res.volume_size, "seconds": round(res.seconds, 3), "errors": len(c.problems),
           "problems": [{"path": p, "message": m} for p, m in c.problems]}
    text = (f"restored {c.files} files, {c.dirs} dirs ({human(c.bytes_copied)}) from the {res.fstype} "
            f"file system of volume snapshot {short_id(sid)} ({res.image}) to {a.target} in "
            f"{res.seconds:.2f} s\nread {human(res.bytes_read)} from the repository "
            f"for a volume of {human(res.volume_size)}")
    if c.problems:
        text += f"\n{len(c.problems)} problem(s):\n" + "\n".join(f"  {p}: {m}" for p, m in c.problems)
    ctx.emit(obj, text)
    return int(ExitCode.PARTIAL) if c.problems else 0
