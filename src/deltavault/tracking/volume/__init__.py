"""Volume change sources: which pages of a block device or disk image changed since the
previous snapshot's checkpoint, and the readers and accesses that open the volume.

A new source implements ``base.ChangeSource`` (a file-system scanner: ``base.FsScanner``,
registered in ``fsdetect``) and is offered by ``backup.volume.run``."""
