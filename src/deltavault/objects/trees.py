"""Tree blobs: a directory's entries (``model.nodes.Tree``) as msgpack, and back.

Every reader of trees (backup's previous state, restore, ls, diff, check, prune, repair)
decodes them here, so a tree that does not parse is the same ``CorruptionError`` for all.
"""

from __future__ import annotations

import msgspec

from deltavault.errors import CorruptionError, Undecodable
from deltavault.framing import decode_msgpack
from deltavault.model.nodes import Node, Tree
from deltavault.objects.store import BlobLoader


def encode_tree(nodes: list[Node]) -> bytes:
    return msgspec.msgpack.encode(Tree(nodes))


def decode_tree(raw: bytes) -> Tree:
    try:
        return decode_msgpack(raw, Tree)
    except Undecodable as exc:
        raise CorruptionError(f"tree does not parse: {exc}") from exc


def load_nodes(repo: BlobLoader, tree_id: bytes) -> list[Node]:
    return decode_tree(repo.load_blob(tree_id)).nodes
