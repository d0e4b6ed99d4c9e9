"""Tree blobs: a directory's entries (``model.nodes.Tree``) as msgpack, and back.

Every reader of trees (backup's previous state, restore, ls, diff, check, prune, repair)
decodes them here, so a tree that does not parse is the same ``CorruptionError`` for all.
"""

from __future__ import annotations

import msgspec

from deltavault.errors import CorruptionError, Undecodable
from deltavault.framing import decode_msgpack
from deltavault.fs.paths import display
from deltavault.model.nodes import Node, Tree, unrestorable
from deltavault.objects.store import BlobLoader


def encode_tree(nodes: list[Node]) -> bytes:
    return msgspec.msgpack.encode(Tree(nodes))


def decode_tree(raw: bytes) -> Tree:
    """The tree, each field within what a file system holds (``model.nodes``), or
    ``CorruptionError``: a writer of the repository with its key can store any tree."""
    try:
        tree = decode_msgpack(raw, Tree)
    except Undecodable as exc:
        raise CorruptionError(f"tree does not parse: {exc}") from exc
    for node in tree.nodes:
        why = unrestorable(node)
        if why is not None:
            raise CorruptionError(f"tree does not parse: entry {display(node.name)} has {why}")
    return tree


def load_nodes(repo: BlobLoader, tree_id: bytes) -> list[Node]:
    return decode_tree(repo.load_blob(tree_id)).nodes
