"""deltavault ls: list what a snapshot holds."""

from __future__ import annotations

import argparse
import stat
import time

from deltavault.cli.common import Context
from deltavault.errors import UsageError
from deltavault.fs.paths import display, exact, shown
from deltavault.model.nodes import Node, NodeType
from deltavault.model.windows import WinMeta
from deltavault.objects.walk import find, walk

_TYPE = {NodeType.FILE: "-", NodeType.DIR: "d", NodeType.SYMLINK: "l", NodeType.FIFO: "p",
         NodeType.CHARDEV: "c", NodeType.BLOCKDEV: "b"}
_DOS = ((0x1, "R"), (0x2, "H"), (0x4, "S"), (0x20, "A"), (0x400, "L"))  # FILE_ATTRIBUTE_* as dir /a shows them


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ls", help="list files in a snapshot")
    p.add_argument("snapshot")
    p.add_argument("path", nargs="?", default="", help="only below this path")
    p.add_argument("-l", "--long", action="store_true", help="mode, owner, size and time")
    p.set_defaults(func=run)


def _long(path: bytes, n: Node) -> str:
    mode = _TYPE[n.type] + stat.filemode(n.mode)[1:]
    t = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(n.mtime / 1e9))
    tail = f" -> {display(n.target)}" if n.type == NodeType.SYMLINK else ""
    line = f"{mode} {shown(n.user) or n.uid:>8} {shown(n.group) or n.gid:>8} {n.size:>12} {t} {display(path)}{tail}"
    return line if n.win is None else f"{line}  [{_windows(n.win)}]"


def _windows(w: WinMeta) -> str:
    """NTFS metadata in a few words: owner SID, DOS attributes, named streams."""
    parts = [w.owner or ("descriptor not parsed" if w.sd else "no descriptor")]
    if w.attrib is not None:
        parts.append("".join(c for bit, c in _DOS if w.attrib & bit) or "-")
    parts += [f":{display(s.name)} {s.size}" for s in w.streams]
    return ", ".join(parts)


def _win_json(w: WinMeta) -> dict[str, object]:
    return {"owner_sid": w.owner, "attributes": w.attrib, "reparse": bool(w.reparse),
            "streams": [{"name": exact(s.name), "size": s.size} for s in w.streams]}


def run(ctx: Context) -> int:
    a = ctx.args
    repo = ctx.open_repo()
    _sid, snap = repo.resolve_snapshot(a.snapshot, kind="files")
    if snap.tree is None:
        raise UsageError("a volume snapshot has no file listing")
    root, prefix = snap.tree, b""
    if a.path:
        node = find(repo, snap.tree, a.path)
        if node is None:
            raise UsageError(f"{a.path!r} is not in the snapshot")
        prefix = a.path.strip("/").encode("utf-8", "surrogateescape")
        if node.type != NodeType.DIR or node.subtree is None:
            _print(ctx, prefix, node, a.long)
            return 0
        root = node.subtree
    for path, node in walk(repo, root, prefix):
        _print(ctx, path, node, a.long)
    return 0


def _print(ctx: Context, path: bytes, n: Node, long: bool) -> None:
    ctx.result({"type": "node", "path": exact(path), "path_hex": path.hex(), "node_type": n.type.value,
              "mode": n.mode, "uid": n.uid, "gid": n.gid, "size": n.size, "mtime_ns": n.mtime,
              **({"target": exact(n.target)} if n.type == NodeType.SYMLINK else {}),
              **({"windows": _win_json(n.win)} if n.win is not None else {})},
             _long(path, n) if long else display(path))
