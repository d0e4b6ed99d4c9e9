"""Change tracking outside a backup engine: sources that say what changed since a checkpoint.

``volume``: change sources of block devices and disk images (file-system metadata digests,
QEMU dirty bitmaps, btrfs snapshots, block digests) and the readers that open them. The
file engine's own change detection (the catalog) lives beside it in backup/files/."""
