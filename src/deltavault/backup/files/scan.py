"""Summing what a backup will read, in the background, so a terminal progress bar can show
a total and an ETA. It leaves out what the archiver leaves out (options.Excludes, the
skipped paths, other file systems, Source.only), so the total is what the run will see."""

from __future__ import annotations

import os
import stat
import threading

from deltavault.backup.files.options import Excludes, FileBackupOptions, Source
from deltavault.fs.dirfd import DIR_FLAGS
from deltavault.progress import Reporter


def scan_totals(sources: list[Source], opts: FileBackupOptions) -> tuple[int, int]:
    """(bytes, files) of the regular files a backup with ``opts`` would read at most."""
    excluded = Excludes(opts)
    total = count = 0
    for src in sources:
        try:
            root_dev = os.lstat(src.path).st_dev
        except OSError:
            continue
        base = src.logical or src.path
        only = src.only or set()
        leading = {p[:i] for p in only for i in range(len(p)) if p[i:i + 1] == b"/"}
        # (path to read, original path, snapshot path, everything below is kept)
        stack = [(src.path, base, src.name, src.only is None)]
        while stack:
            p, orig, rel, whole = stack.pop()
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and not excluded.too_large(st):
                total += st.st_size
                count += 1
            if not stat.S_ISDIR(st.st_mode) or (opts.one_file_system and st.st_dev != root_dev):
                continue
            try:
                fd = os.open(p, DIR_FLAGS)
            except OSError:
                continue
            try:
                names = sorted(os.fsencode(n) for n in os.listdir(fd))
                marker = excluded.marker(fd, names)
            except OSError:
                names, marker = [], None
            finally:
                os.close(fd)
            for name in [marker] if marker is not None else names:
                child, child_rel = os.path.join(p, name), rel + b"/" + name
                child_orig = orig.rstrip(b"/") + b"/" + name
                keep = whole or child_rel in only
                if (keep or child_rel in leading) and child not in opts.skip_paths and not excluded(child_orig):
                    stack.append((child, child_orig, child_rel, keep))
    return total, count


def start_scanner(sources: list[Source], opts: FileBackupOptions, reporter: Reporter) -> None:
    """Sum sizes in a background thread and hand the totals to ``reporter``."""

    def scan() -> None:
        total, count = scan_totals(sources, opts)
        reporter.set_totals(total_bytes=total, total_items=count)

    threading.Thread(target=scan, name="dv-scan", daemon=True).start()
