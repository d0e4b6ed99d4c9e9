"""On-disk data model: plain msgspec structs shared by every layer. Imports nothing above it."""

from deltavault.model.content import PAGE_SIZE, ContentRef, Full, Hole, Patch, content_size
from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.model.snapshot import Snapshot, SnapshotSummary
from deltavault.model.types import BlobType

__all__ = [
    "PAGE_SIZE", "BlobType", "ContentRef", "Full", "Hole", "Node", "NodeType", "Patch",
    "Snapshot", "SnapshotSummary", "Tree", "content_size",
]
