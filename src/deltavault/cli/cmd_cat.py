"""deltavault cat: a repository object as stored, for debugging (restic's cat)."""

from __future__ import annotations

import argparse
import contextlib
import json

from deltavault.cli.common import Context
from deltavault.maintenance.inspect import KINDS, inspect


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cat", help="print a repository object: config, snapshot, index, key, lock, "
                                   "tree (SNAP[:PATH]), blob, pack")
    p.add_argument("kind", choices=KINDS, help="what to print; blob and pack are written raw")
    p.add_argument("id", nargs="?", help="its id or a unique prefix (tree: SNAPSHOT[:PATH] or a tree id)")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    a = ctx.args
    repo = ctx.open_repo(use_cache=a.kind not in ("index", "snapshot"))  # show what is stored, not a copy
    # Reading locks takes none: cat's own lock would be among those it shows and match a prefix.
    guard = contextlib.nullcontext() if a.kind == "lock" else ctx.read_lock(repo, "cat")
    with guard:
        got = inspect(repo, a.kind, a.id)
    if isinstance(got, bytes):
        out = ctx.binary_stdout()
        out.write(got)
        out.flush()
    elif ctx.json:
        ctx.stdout.write(json.dumps(got) + "\n")
    else:
        ctx.stdout.write(json.dumps(got, indent=2) + "\n")
    return 0
