"""deltavault restore --volume SNAPSHOT TARGET (the engine is restore/volume.py)."""

from __future__ import annotations

import argparse

from deltavault.cli.common import Context, human
from deltavault.errors import ExitCode, UsageError
from deltavault.objects.volumes import load_manifest
from deltavault.repository.snapshots import short_id
from deltavault.restore.existing import OVERWRITE
from deltavault.restore.volume import VolumeRestoreOptions, VolumeRestorer


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
    g.add_argument("--files", nargs="+", metavar="PATH",
                   help="with --volume: copy only these files or directories of the volume's file system "
                        "into --target DIR (mounts the image read-only; reads only the blocks they need)")
    g.add_argument("--partition", type=int, metavar="N", help="with --files: the partition to read")
    g.add_argument("--fs", choices=["ext4", "xfs", "btrfs", "ntfs"],
                   help="with --files: the file system expected (refused if the volume holds another)")


def run_volume_restore(ctx: Context) -> int:
    a = ctx.args
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
        opts = VolumeRestoreOptions(overwrite=a.overwrite not in (None, "never"), verify=a.verify,
                                    page_key=repo.master.mac if repo.master else None)
        st = VolumeRestorer(repo, manifest, target, opts, ctx.reporter()).run()
    obj = {"type": "summary", "kind": "volume", "snapshot": sid, "target": target,
           "target_kind": st.target_kind, "size": st.size, "blocks": st.blocks, "holes": st.holes,
           "bytes_written": st.bytes_written, "bytes_zeroed": st.bytes_zeroed, "verified": a.verify,
           "pages_verified": st.pages_verified, "pages_mismatched": st.pages_mismatched,
           "mismatched_pages": st.mismatches, "free_space": manifest.free_space,
           "seconds": round(st.seconds, 3)}
    text = (f"restored volume snapshot {short_id(sid)} to {target} ({st.target_kind}): {human(st.size)}, "
            f"{st.blocks} blocks ({st.holes} holes); wrote {human(st.bytes_written)} in {st.seconds:.2f} s")
    if a.verify:
        text += (f"\nverified: {st.pages_verified} pages, "
                 + ("all match" if not st.pages_mismatched else f"{st.pages_mismatched} DIFFER"))
    ctx.emit(obj, text)
    return int(ExitCode.CORRUPT) if st.pages_mismatched else 0
