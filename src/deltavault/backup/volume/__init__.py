"""Volume backup engine: block devices and disk images, reading only the blocks a change
source (``deltavault.tracking.volume``) names.

``run.run_volume_backup`` is the entry point."""
