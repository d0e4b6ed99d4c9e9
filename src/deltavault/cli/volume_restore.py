"""deltavault restore --volume SNAPSHOT TARGET (the engine is restore/volume.py)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from deltavault.cli.common import Context, human
from deltavault.errors import ExitCode, UsageError
from deltavault.objects.volumes import load_manifest
from deltavault.repository.snapshots import short_id
from deltavault.restore.existing import OVERWRITE
from deltavault.restore.imageformat import CHOICES, restore_as, target_format
from deltavault.restore.volume import VolumeRestoreOptions, VolumeRestorer, VolumeRestoreStats


def add_volume_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("volume restore (--volume)")
    g.add_argument("--volume", action="store_true",
                   help="restore a volume snapshot to TARGET: an image file or a block device")
    g.add_argument("volume_target", nargs="?", metavar="TARGET", help="with --volume: where to restore")
    # One option for both kinds: files take a policy, a volume only "replace it" (the bare flag).
    p.add_argument("--overwrite", nargs="?", const="always", choices=OVERWRITE, metavar="WHEN",
                   help="files: replace entries already in the target always (default), if-changed (size or "
                        "time differ), if-newer (the snapshot's is newer) or never; --volume: replace an "
                        "existing image file, or the content of a block device")
    g.add_argument("--format", choices=CHOICES, metavar="FORMAT",
                   help="with --volume: the image format to write: raw, qcow2, vhdx, vmdk, or original (the "
                        "format the snapshot was read from). Default: by TARGET's extension (.qcow2, .vhdx, "
                        ".vmdk), else raw; a block device takes raw only")
    g.add_argument("--files", nargs="+", metavar="PATH",
                   help="with --volume: copy only these files or directories of the volume's file system "
                        "into --target DIR (mounts the image read-only; reads only the blocks they need)")
    g.add_argument("--partition", type=int, metavar="N", help="with --files: the partition to read")
    g.add_argument("--fs", choices=["ext4", "xfs", "btrfs", "ntfs"],
                   help="with --files: the file system expected (refused if the volume holds another)")


def run_volume_restore(ctx: Context) -> int:
    a = ctx.args
    if a.format and a.files:
        raise UsageError("--format goes with a volume TARGET, not --files")
    if a.files:
        from deltavault.cli.volume_files import run_volume_files

        return run_volume_files(ctx)
    if a.partition is not None or a.fs:
        raise UsageError("--partition and --fs go with --files")
    target = a.volume_target or a.target
    if not target:
        raise UsageError("restore --volume needs a TARGET (an image file or a block device)")
    if a.include:
        raise UsageError("--include does not apply to volume snapshots")
    repo = ctx.open_repo()
    with ctx.read_lock(repo, "restore"):
        sid, snap = ctx.snapshot_of_kind(repo, a.snapshot, "volume", "restore it without --volume")
        assert snap.volume is not None
        manifest = load_manifest(repo, snap.volume)
        overwrite = a.overwrite not in (None, "never")
        opts = VolumeRestoreOptions(overwrite=overwrite, verify=a.verify,
                                    page_key=repo.master.mac if repo.master else None)
        fmt = target_format(target, a.format, manifest.source_format)
        if fmt == "raw":
            st = VolumeRestorer(repo, manifest, target, opts, ctx.reporter()).run()
        else:
            raw_opts = replace(opts, overwrite=True)  # the temporary raw image is ours

            def restore_raw(path: str) -> VolumeRestoreStats:
                return VolumeRestorer(repo, manifest, path, raw_opts, ctx.reporter()).run()

            st = restore_as(fmt, target, restore_raw, overwrite=overwrite, verify=a.verify)
    obj = {"type": "summary", "kind": "volume", "snapshot": sid, "target": target,
           "target_kind": st.target_kind, "format": st.target_format,
           "source_format": manifest.source_format or None, "size": st.size, "blocks": st.blocks, "holes": st.holes,
           "bytes_written": st.bytes_written, "bytes_zeroed": st.bytes_zeroed, "verified": a.verify,
           "pages_verified": st.pages_verified, "pages_hashed": st.pages_hashed, "pages_mismatched": st.pages_mismatched,
           "mismatched_pages": st.mismatches, "free_space": manifest.free_space,
           "seconds": round(st.seconds, 3)}
    kind = st.target_kind if st.target_format == "raw" else f"{st.target_format} image"
    text = (f"restored volume snapshot {short_id(sid)} to {target} ({kind}): {human(st.size)}, "
            f"{st.blocks} blocks ({st.holes} holes); wrote {human(st.bytes_written)} in {st.seconds:.2f} s")
    if a.verify:
        text += (f"\nverified: {st.pages_verified} pages ({st.pages_hashed} read back, the rest holes), "
                 + ("all match" if not st.pages_mismatched else f"{st.pages_mismatched} DIFFER"))
    ctx.emit(obj, text)
    return int(ExitCode.CORRUPT) if st.pages_mismatched else 0
