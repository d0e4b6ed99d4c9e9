"""Which file system a volume holds, if any this project understands (ext2/3/4, NTFS).

A file system that cannot be parsed is not an error: the volume is then backed up block by
block, with no free-space skipping and no metadata digests, and the report says why.
"""

from __future__ import annotations

import importlib

from deltavault.errors import DeltavaultError
from deltavault.tracking.volume.base import FsScanner
from deltavault.tracking.volume.readers import VolumeReader


def detect(reader: VolumeReader) -> tuple[FsScanner | None, str]:
    """(scanner, "") or (None, why there is none): a file system at the start of the volume,
    else a partition table with file systems in its partitions."""
    scanner, why = detect_file_system(reader)
    if scanner is not None or not why.startswith(NONE_AT_START):
        return scanner, why
    from deltavault.tracking.volume.partitions import detect_partitions

    return detect_partitions(reader, detect_file_system)


NONE_AT_START = "no ext2/3/4 or NTFS file system at the start"


def detect_file_system(reader: VolumeReader) -> tuple[FsScanner | None, str]:
    """(scanner, "") or (None, why there is none), for a file system at offset 0."""
    # Imported here: the dissect parsers take about 70 ms to load, which every other
    # command would pay at start-up.
    for name, module_name, cls_name in (("ext4", "ext4", "Ext4Scanner"), ("NTFS", "ntfs", "NtfsScanner")):
        module = importlib.import_module(f"deltavault.tracking.volume.{module_name}")
        try:
            if not module.probe(reader):
                continue
            scanner: FsScanner = getattr(module, cls_name)(reader)
            return scanner, ""
        except DeltavaultError:
            raise  # the source itself failed: not a parsing question
        except Exception as exc:  # untrusted on-disk structures: any parse failure
            return None, f"the {name} file system could not be parsed: {exc}"
    return None, f"{NONE_AT_START} of the volume"
