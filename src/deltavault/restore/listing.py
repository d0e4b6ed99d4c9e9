"""The one check every reader of a snapshot's trees for the user's eyes applies (restore,
mount): names are single components and none is listed twice, or the listing is refused
whole. A tampered repository cannot then plant ``..``, ``a/b`` or a second entry that
shadows the first."""

from __future__ import annotations

from deltavault.errors import CorruptionError
from deltavault.fs.paths import check_name, display
from deltavault.model.nodes import Node


def checked_nodes(nodes: list[Node], where: str) -> list[Node]:
    """``nodes`` of the directory shown as ``where``, each name checked; raises
    CorruptionError for the first unsafe or duplicate name."""
    seen: set[bytes] = set()
    for n in nodes:
        check_name(n.name)
        if n.name in seen:
            raise CorruptionError(f"tree {where or '/'} lists {display(n.name)} twice")
        seen.add(n.name)
    return nodes
