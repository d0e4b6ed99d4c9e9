"""Repository layer: blobs, packs, index, envelope (compress + encrypt), keys, locks."""

from deltavault.repository.repository import ChunkerParams, RepoConfig, Repository, short_id

__all__ = ["ChunkerParams", "RepoConfig", "Repository", "short_id"]
