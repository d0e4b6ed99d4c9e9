"""deltavault backup: what to read and what to leave out (--files-from, --exclude-file, ...),
turned into paths and backup options."""

from __future__ import annotations

import argparse
import glob
import os

from deltavault.backup.files.options import FileBackupOptions
from deltavault.cli.common import parse_size
from deltavault.errors import UsageError
from deltavault.fs.patterns import Pattern, read_pattern_file


def add_input_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to back up and what to leave out (patterns: see the user guide)")
    g.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="leave out what matches (repeatable); '*.tmp', 'cache', 'src/a/b' match at any "
                        "depth, '/srv/data/tmp' only there")
    g.add_argument("--iexclude", action="append", default=[], metavar="PATTERN",
                   help="as --exclude, ignoring case")
    g.add_argument("--exclude-file", action="append", default=[], metavar="FILE",
                   help="patterns from FILE, one a line ('#' starts a comment)")
    g.add_argument("--iexclude-file", action="append", default=[], metavar="FILE",
                   help="as --exclude-file, ignoring case")
    g.add_argument("--exclude-caches", action="store_true",
                   help="leave out the contents of directories holding a valid CACHEDIR.TAG")
    g.add_argument("--exclude-if-present", action="append", default=[], metavar="NAME[:HEADER]",
                   help="leave out the contents of directories holding NAME (starting with HEADER)")
    g.add_argument("--exclude-larger-than", type=parse_size, metavar="SIZE",
                   help="leave out files larger than SIZE (e.g. 1G)")
    g.add_argument("--files-from", action="append", default=[], metavar="FILE",
                   help="back up the paths listed in FILE, one a line ('#' comments; globs expanded)")
    g.add_argument("--files-from-verbatim", action="append", default=[], metavar="FILE",
                   help="paths listed in FILE exactly: one a line, or NUL-separated if FILE holds a NUL "
                        "(as find -print0 writes)")
    g.add_argument("--files-from-raw", action="append", default=[], metavar="FILE",
                   help="paths in FILE separated by NUL bytes (restic's name for it)")


def input_paths(a: argparse.Namespace) -> list[str]:
    """The paths on the command line and in every --files-from* file, in order, each once."""
    paths = list(a.paths)
    for f in a.files_from:
        for line in _read(f).decode("utf-8", "surrogateescape").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            hits = sorted(glob.glob(line)) if glob.has_magic(line) else [line]
            paths += hits or [line]  # a glob matching nothing is reported missing, as a path is
    for f in a.files_from_verbatim:
        data = _read(f)
        items = data.split(b"\0") if b"\0" in data else data.split(b"\n")
        paths += [os.fsdecode(x) for x in items if x]
    for f in a.files_from_raw:
        paths += [os.fsdecode(x) for x in _read(f).split(b"\0") if x]
    if (a.files_from or a.files_from_verbatim or a.files_from_raw) and len(paths) == len(a.paths):
        raise UsageError("the --files-from file(s) list no path")
    return list(dict.fromkeys(paths))


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from exc


def apply_input_options(a: argparse.Namespace, opts: FileBackupOptions) -> None:
    """Exclusions into ``opts``; every pattern is checked here, so a bad one is a usage error
    before anything is read."""
    opts.excludes = [*a.exclude, *(p for f in a.exclude_file for p in read_pattern_file(f))]
    opts.iexcludes = [*a.iexclude, *(p for f in a.iexclude_file for p in read_pattern_file(f))]
    for text in [*opts.excludes, *opts.iexcludes]:
        Pattern(text)
    for m in a.exclude_if_present:
        if not m.partition(":")[0] or "/" in m.partition(":")[0]:
            raise UsageError(f"--exclude-if-present takes a file name (NAME or NAME:HEADER), not {m!r}")
    opts.exclude_if_present = list(a.exclude_if_present)
    opts.exclude_caches = a.exclude_caches
    opts.exclude_larger_than = a.exclude_larger_than
