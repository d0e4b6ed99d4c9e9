"""deltavault backup --volume: options and output (the engine is backup/volume/)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from deltavault.backup.volume.options import (
    CBT_MODES,
    DEFAULT_BLOCK_SIZE,
    SOURCE_FORMATS,
    VolumeOptions,
    VolumeReport,
    VolumeRequest,
)
from deltavault.backup.volume.run import run_volume_backup as backup_volume
from deltavault.backup.volume.state import LocalState
from deltavault.cli.common import Context, human, parse_size
from deltavault.errors import UsageError
from deltavault.fs.files import write_cache_file
from deltavault.repository.snapshots import short_id
from deltavault.workers import DEFAULT_BUFFER_MEMORY

MIN_BUFFER_MEMORY = 4 * 1024 * 1024


def buffer_memory(a: argparse.Namespace) -> int:
    """``--buffer-memory``, else DELTAVAULT_BUFFER_MEMORY, else the default."""
    value = a.buffer_memory
    if value is None:
        env = os.environ.get("DELTAVAULT_BUFFER_MEMORY")
        if not env:
            return DEFAULT_BUFFER_MEMORY
        try:
            value = parse_size(env)
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"DELTAVAULT_BUFFER_MEMORY: {exc}") from None
    if value < MIN_BUFFER_MEMORY:
        raise UsageError(f"--buffer-memory: at least {MIN_BUFFER_MEMORY >> 20}M")
    return int(value)


def add_volume_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("volume backup (--volume)")
    g.add_argument("--volume", action="store_true",
                   help="back up one block device or disk image (raw, qcow2, VHDX or VMDK) block by block")
    g.add_argument("--source-format", choices=SOURCE_FORMATS, default="auto",
                   help="the image's format: auto (default: from its first bytes; a device is raw), or "
                        "raw, qcow2, vhdx, vmdk to insist (raw reads an image file's bytes as they are)")
    g.add_argument("--block-size", type=parse_size, default=DEFAULT_BLOCK_SIZE, metavar="SIZE",
                   help=f"block size, a power of two from 4K to 4M (default {human(DEFAULT_BLOCK_SIZE)})")
    g.add_argument("--cbt", choices=CBT_MODES, default="auto",
                   help="change tracking: auto (qemu bitmap for qcow2, else file-system metadata "
                        "digests), fs, qemu, btrfs (image file on btrfs), digests (read everything)")
    g.add_argument("--verify-cbt", type=int, default=0, metavar="N",
                   help="read N blocks the change source called unchanged and check their digests")
    g.add_argument("--free-space", choices=("skip", "read"), default="skip",
                   help="skip: do not read blocks a known file system calls free (restored as zeros); "
                        "read: capture them too, for an image identical whatever free space holds")
    g.add_argument("--snapshot-dir", metavar="DIR",
                   help="--cbt btrfs: where to keep the read-only snapshots "
                        "(default <subvolume>/.deltavault-snapshots)")
    g.add_argument("--bitmap-granularity", type=parse_size, default=65536, metavar="SIZE",
                   help="qcow2: granularity of the dirty bitmaps this creates (default 64K)")
    g.add_argument("--report", metavar="FILE", help="also write the run's JSON report to FILE")


def run_volume_backup(ctx: Context) -> int:
    a = ctx.args
    if len(a.paths) != 1:
        raise UsageError("backup --volume needs exactly one block device or image file")
    opts = VolumeOptions(block_size=a.block_size, cbt=a.cbt, verify_cbt=a.verify_cbt,
                         free_space=a.free_space, workers=a.workers, snapshot_dir=a.snapshot_dir,
                         bitmap_granularity=a.bitmap_granularity, source_format=a.source_format,
                         buffer_memory=buffer_memory(a))
    req = VolumeRequest(path=a.paths[0], logical=a.as_path, source_id=a.source_id, tags=a.tag,
                        parent=a.parent, options=opts)
    if a.host:
        req.hostname = a.host
    repo = ctx.open_repo()
    with repo.lock(command="backup", wait=a.lock_wait):
        result = backup_volume(repo, req, ctx.reporter())
    rep = result.report
    obj: dict[str, Any] = {"type": "summary", "kind": "volume", "snapshot": result.snapshot_id,
                           **rep.as_dict()}
    paths = _write_reports(obj, a.report, repo.cache_dir, result.snapshot.source_id, result.snapshot_id)
    obj["report_files"] = paths
    ctx.emit(obj, _text(result.snapshot_id, rep, paths))
    return 0


def _write_reports(obj: dict[str, Any], extra: str | None, cache_dir: Path | None, source_id: str,
                   sid: str) -> list[str]:
    out = []
    state = LocalState.load(cache_dir, source_id)
    targets = [Path(extra)] if extra else []
    if state.dir is not None:
        targets.append(state.dir / "reports" / f"{sid}.json")
    text = json.dumps(obj, indent=1) + "\n"
    for path in targets:
        if not (extra and path == Path(extra)):  # the cache's copy: private, best effort
            if write_cache_file(path, text.encode()):
                out.append(str(path))
            continue
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
            out.append(str(path))
        except OSError as exc:
            raise UsageError(f"cannot write the report to {extra}: {exc.strerror}") from exc
    return out


def _text(sid: str, r: VolumeReport, paths: list[str]) -> str:
    lines = [f"snapshot {short_id(sid)} saved: volume {r.source}, {human(r.size)}"
             + (f", {r.file_system}" if r.file_system else "")
             + (f" (parent {short_id(r.parent)})" if r.parent else " (no parent: full read)")]
    lines.append(f"change source: {r.change_source}" + (f" ({'; '.join(r.notes)})" if r.notes else ""))
    lines += [f"  passed over {x['source']}: {x['reason']}" for x in r.rejected]
    lines.append(f"blocks:  {r.blocks_changed} of {r.blocks_total} changed "
                 f"({r.pages_changed} pages, {human(r.bytes_changed)})")
    lines.append(f"read:    {human(r.bytes_read)}; skipped {human(r.bytes_free_skipped)} free, "
                 f"{human(r.bytes_zero_skipped)} known zero"
                 + (f"; the source reported {human(r.bytes_dirty)} changed" if r.bytes_dirty is not None else ""))
    if r.verify_cbt is not None:
        v = r.verify_cbt
        lines.append(f"verify-cbt: {v['blocks_sampled']} blocks, {v['pages_checked']} pages checked, "
                     f"{v['pages_mismatched']} differ")
    lines.append(f"added:   {human(r.bytes_added)} to the repository")
    lines.append(f"time:    {r.seconds:.2f} s")
    lines += [f"warning: {w}" for w in r.warnings]
    if paths:
        lines.append(f"report:  {paths[0]}")
    return "\n".join(lines)
