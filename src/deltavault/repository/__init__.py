"""Repository layer: the ``Repository`` façade over config and keys, the object cache, the
index, blob writes and reads, snapshots and locks; packs and the envelope (compress +
encrypt) below them."""
