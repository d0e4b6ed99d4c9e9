"""What a sync run may do."""

from __future__ import annotations

from dataclasses import dataclass, field

MiB = 1024 * 1024


@dataclass
class SyncOptions:
    delete: bool = False  # remove DST entries that SRC does not have (mirror)
    checksum: bool = False  # compare content, not size + mtime
    skip_empty_dirs: bool = False
    acl: bool = False  # POSIX ACLs (system.posix_acl_* xattrs)
    xattrs: bool = False  # every other extended attribute
    streams: bool = False  # NTFS named streams (SRC on ntfs-3g); --acl carries the rest of NTFS's metadata
    owner: bool = True  # chown (effective as root)
    excludes: list[str] = field(default_factory=list)
    includes: list[str] = field(default_factory=list)
    default_excludes: bool = True  # $RECYCLE.BIN, System Volume Information at the root
    verify: bool = False
    stop_on_error: bool = False
    # 1 MiB: on the benchmark VM, 8 MiB writes were 2.5x slower in the kernel (large page-cache
    # folios come from memory the host backs lazily); 1 MiB is as fast as smaller ones.
    bufsize: int = 1 * MiB
    threads: int = 2  # threads copying big files
    # Worker processes walking subtrees (1: walk in this process only). They are forked, so a
    # caller that already runs threads of its own should pass 1.
    processes: int = 2
    delta: bool = True  # rewrite only changed pages of big changed files
    delta_min: int = 4 * MiB  # smaller files are copied whole
    inplace: bool = False  # delta may write into the existing file (not atomic)
    attempts: int = 3  # copies of a file that keeps changing before giving up
