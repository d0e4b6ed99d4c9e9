"""``cat``: the repository's objects as they are stored, for debugging. Documents come back
as JSON-ready values (bytes as hex, names as exact strings); blobs and packs as bytes."""

from __future__ import annotations

from typing import Any

import msgspec

from deltavault.errors import FormatError, ObjectNotFound, Undecodable, UsageError
from deltavault.framing import decode_json
from deltavault.fs.sources import snapshot_path, source_roots
from deltavault.model.nodes import NodeType
from deltavault.model.types import match_prefix
from deltavault.objects.trees import load_nodes
from deltavault.objects.walk import find
from deltavault.repository import keyring
from deltavault.repository.pack import pack_name
from deltavault.repository.repository import Repository

KINDS = ("config", "snapshot", "index", "key", "lock", "tree", "blob", "pack")


def _plain(obj: Any) -> Any:
    """msgspec structs into JSON values, bytes as hex (names and link targets are turned
    into exact strings by the caller, where they read better)."""
    def conv(o: Any) -> Any:
        if isinstance(o, bytes):
            return o.hex()
        if isinstance(o, dict):
            return {k: conv(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [conv(v) for v in o]
        return o
    return conv(msgspec.to_builtins(obj, builtin_types=(bytes,)))


def _json(raw: bytes, name: str) -> Any:
    try:
        return decode_json(raw, Any)
    except Undecodable as exc:
        raise FormatError(f"{name} does not parse: {exc}") from exc


def inspect(repo: Repository, kind: str, ref: str | None) -> Any | bytes:
    if kind == "config":
        return _json(repo.backend.get("config"), "config")
    if ref is None:
        raise UsageError(f"cat {kind} needs an id" + (" (SNAPSHOT or SNAPSHOT:PATH)" if kind == "tree" else ""))
    if kind == "snapshot":
        sid, snap = repo.resolve_snapshot(ref)
        return {"id": sid, **_plain(snap)}
    if kind == "index":
        name = "index/" + match_prefix([n.removeprefix("index/") for n in repo.index_names()], ref, "index file")
        f = repo.indexes.read_file(name)
        return {"id": name.removeprefix("index/"), "supersedes": [x.hex() for x in f.supersedes],
                "packs": [{"id": p.id.hex(), "blobs": [{"id": b.id.hex(), "type": b.type, "offset": b.offset,
                                                         "length": b.length, "raw_length": b.raw_length}
                                                        for b in p.blobs]} for p in f.packs]}
    if kind == "key":
        name = keyring.resolve_key(repo, ref)
        return _json(repo.backend.get(name), name)
    if kind == "lock":
        names = [n.removeprefix("locks/") for n, _ in repo.locks.list_locks()]
        name = "locks/" + match_prefix(names, ref, "lock")
        info = dict(repo.locks.list_locks()).get(name)
        if info is None:
            raise ObjectNotFound(f"{name} is gone")
        return {"id": name.removeprefix("locks/"), **_plain(info)}
    if kind == "tree":
        return _tree(repo, ref)
    if kind == "blob":
        return repo.load_blob(_blob_id(repo, ref))
    if kind == "pack":
        ids = [p.hex() for p in repo.list_pack_names()]
        return repo.backend.get(pack_name(bytes.fromhex(match_prefix(ids, ref.lower(), "pack"))))
    raise UsageError(f"cat knows {', '.join(KINDS)}, not {kind!r}")


def _blob_id(repo: Repository, ref: str) -> bytes:
    try:
        full = bytes.fromhex(ref)
    except ValueError:
        raise UsageError(f"{ref!r} is not a blob id (hex)") from None
    if len(full) == 32:
        if full not in repo.index:
            raise UsageError(f"no blob {ref[:16]} in the index")
        return full
    hits = [b for b in repo.index.blob_ids() if b.hex().startswith(ref.lower())]
    return bytes.fromhex(match_prefix([h.hex() for h in hits], ref.lower(), "blob"))


def _tree(repo: Repository, ref: str) -> Any:
    """A directory of a snapshot (SNAPSHOT or SNAPSHOT:PATH) or a tree blob by id."""
    snap_ref, _, path = ref.partition(":")
    try:
        sid, snap = repo.resolve_snapshot(snap_ref)
        tree = snap.tree
        if tree is None:
            raise UsageError(f"snapshot {sid[:8]} is a volume snapshot: it has no trees")
        if path.strip("/"):
            node = find(repo, tree, snapshot_path(source_roots(snap.paths), path).decode("utf-8", "surrogateescape"))
            if node is None or node.type != NodeType.DIR or node.subtree is None:
                raise UsageError(f"{path!r} is not a directory of snapshot {sid[:8]}")
            tree = node.subtree
    except UsageError:
        if path:
            raise
        tree = _blob_id(repo, ref)
    nodes = load_nodes(repo, tree)
    out = []
    for n in nodes:
        d = _plain(n)
        d["name"] = n.name.decode("utf-8", "surrogateescape")
        if n.type == NodeType.SYMLINK:
            d["target"] = n.target.decode("utf-8", "surrogateescape")
        out.append(d)
    return {"id": tree.hex(), "nodes": out}
