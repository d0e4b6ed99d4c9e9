"""deltavault dump: one file of a snapshot to stdout, or a directory as a tar (or zip)."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from deltavault.cli.common import Context
from deltavault.cli.outfile import OutputFile
from deltavault.errors import UsageError
from deltavault.fs.sources import snapshot_path, source_roots
from deltavault.model.nodes import Node, NodeType
from deltavault.objects.walk import find
from deltavault.restore.dump import dump_file, dump_tar, dump_zip, walk_entries


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dump", help="write a file of a snapshot to stdout, or a directory as a tar")
    p.add_argument("snapshot", help="snapshot id, a unique prefix, or 'latest'")
    p.add_argument("path", help="path in the snapshot (data/a.txt) or original path (/srv/data/a.txt); "
                                "'/' for everything")
    p.add_argument("-a", "--archive", choices=("tar", "zip"), default="tar",
                   help="format for a directory (default tar)")
    p.add_argument("-t", "--target", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    repo = ctx.open_repo()
    with ctx.read_lock(repo, "dump"):
        sid, snap = ctx.snapshot_of_kind(repo, a.snapshot, "files", "use restore --volume for a volume")
        assert snap.tree is not None
        rel = snapshot_path(source_roots(snap.paths), a.path)
        if rel:
            node = find(repo, snap.tree, rel.decode("utf-8", "surrogateescape"))
            if node is None:
                raise UsageError(f"{a.path!r} is not in snapshot {sid[:8]} (see: deltavault ls {sid[:8]})")
        else:  # the whole snapshot: its root directory
            node = Node(name=b"", type=NodeType.DIR, mode=0o755, subtree=snap.tree)
        is_dir = node.type == NodeType.DIR
        if node.type not in (NodeType.FILE, NodeType.DIR):
            raise UsageError(f"{a.path!r} is a {node.type.name.lower()}: dump writes files and directories")
        with _output(ctx, a.target, binary_dir=is_dir) as out:
            if not is_dir:
                nbytes, count = dump_file(repo, node, out), 1
            else:
                entries = walk_entries(repo, node, rel)
                if not rel:
                    next(entries)  # the snapshot's root has no name of its own
                nbytes, count = 0, (dump_zip if a.archive == "zip" else dump_tar)(repo, entries, out)
            out.flush()
    if a.target is not None:  # stdout carries the data itself: no report on it
        kind = "file" if not is_dir else a.archive
        ctx.emit({"type": "dump", "snapshot": sid, "path": a.path, "target": a.target, "format": kind,
                  "entries": count, **({"bytes": nbytes} if not is_dir else {})},
                 f"wrote {a.path} of snapshot {sid[:8]} to {a.target}"
                 + (f" ({count} entries as {kind})" if is_dir else f" ({nbytes} bytes)"))
    return 0


@contextlib.contextmanager
def _output(ctx: Context, target: str | None, *, binary_dir: bool):  # type: ignore[no-untyped-def]
    if target is None:
        stdout = ctx.binary_stdout()
        if binary_dir and os.isatty(stdout.fileno()):
            raise UsageError("an archive is not for a terminal: redirect stdout (> out.tar) or use --target FILE")
        yield stdout
        return
    # Written whole or not at all, never through a planted symlink (cli/outfile.py); 0600
    # whatever the umask, as an archive holds every file of the snapshot, whoever owned it.
    with OutputFile(Path(target), "the dump", 0o600, exact=True).writing() as out:
        yield out
