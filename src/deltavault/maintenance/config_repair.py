"""Rebuilding a damaged or missing ``config`` from what the repository still holds.

Nothing in the config is needed to read stored data: blobs carry their own compression
flag, packs their own headers, and the master key lives in the key files. The config
only steers new writes (chunker sizes, pack size, compression level) and names the local
cache (``id``). So a lost config costs no data, and it can be rebuilt:

- encryption: encrypted when ``keys/`` holds a key file, which must open with the password
  (without the master key nothing can be rebuilt, nor read, by anyone);
- each setting is taken from the damaged config's own bytes when they still show it and
  the value is one ``init`` would accept (a truncated or bit-flipped file usually keeps
  most fields), else inferred (pack size from the largest pack; the id from the local
  cache directory that holds this repository's index files), else the default;
- ``mac`` is computed afresh under the master key.

What each field came from is reported. A value salvaged from a config that failed its
authentication is only ever a steering value within init's bounds, never trusted for
anything that decides what data is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import msgspec

from deltavault.backends.base import Backend
from deltavault.errors import (
    BackendError,
    CorruptionError,
    KeyFileDamaged,
    ObjectNotFound,
    RepositoryNotFound,
    Undecodable,
)
from deltavault.framing import decode_json
from deltavault.repository import config as configmod
from deltavault.repository import keys as keymod
from deltavault.repository.cache import default_cache_root
from deltavault.repository.config import (
    DEFAULT_COMPRESSION,
    DEFAULT_PACK_SIZE,
    REPO_VERSION,
    ChunkerParams,
    RepoConfig,
    config_mac,
    mac_matches,
)
from deltavault.repository.envelope import Envelope
from deltavault.repository.indexfile import INDEX_AAD
from deltavault.repository.locks import LockManager
from deltavault.repository.snapshots import SNAPSHOT_AAD

_MIB = 1024 * 1024


@dataclass
class ConfigRepair:
    state: str  # sound | rebuilt | would-rebuild
    problem: str = ""  # what was wrong with the config
    sources: dict[str, str] = field(default_factory=dict)  # field -> where its value came from


def check_or_rebuild_config(backend: Backend, password: Callable[[], bytes], *, dry_run: bool = False,
                            cache_root: Path | None = None, unencrypted: bool = False) -> ConfigRepair:
    """Leave a sound config alone; rebuild a missing, unparsable or unauthenticated one.
    Raises with the exact reason when it cannot be rebuilt. A repository without key files
    is rebuilt (or passed as sound) unencrypted only when ``unencrypted`` says one is meant,
    as ``config.open_existing`` opens one: key files deleted by whoever can write the store
    must not turn it into an unencrypted repository."""
    key_names = [o.name for o in backend.list("keys/")]
    try:
        raw: bytes | None = backend.get("config")
    except ObjectNotFound:
        raw = None
    if raw is None and not key_names and not any(True for _ in backend.list("index/")):
        raise RepositoryNotFound(f"no repository at {backend.location()}: no config, no key files, no index")
    masters = _unlock(backend, key_names, password) if key_names else []
    if not masters and not unencrypted:
        configmod.raise_unencrypted(backend)
    problem = _problem(raw, masters)
    if not problem:
        return ConfigRepair("sound")
    master = _repository_key(backend, masters) if masters else None
    cfg, sources = _rebuild(backend, raw, master, cache_root)
    if dry_run:
        return ConfigRepair("would-rebuild", problem, sources)
    with LockManager(backend, Envelope(master)).acquire(exclusive=True, command="repair config"):
        backend.put("config", msgspec.json.encode(cfg))
    return ConfigRepair("rebuilt", problem, sources)


def _unlock(backend: Backend, key_names: list[str], password: Callable[[], bytes]) -> list[keymod.MasterKey]:
    """The distinct master keys of the key files the password opens."""
    out: dict[bytes, keymod.MasterKey] = {}
    try:
        for master, _name in configmod.open_keys(backend, key_names, password()):
            out.setdefault(master.raw(), master)
    except KeyFileDamaged as exc:
        raise CorruptionError(f"the config cannot be rebuilt: {exc.message}; without an intact key file the "
                              "master key is lost and no one can decrypt this repository's data") from exc
    return list(out.values())


def _repository_key(backend: Backend, masters: list[keymod.MasterKey]) -> keymod.MasterKey:
    """Of the master keys the password opens, the one this repository's objects are sealed
    with: a key file opening is no proof that it is this repository's (one of another
    repository with the same password, planted or copied by mistake), and a config rebuilt
    under another key makes every pack and snapshot look damaged, which the repair that
    follows deletes. So the key must open some of the snapshots or index files here, and
    be the only one that does; with none of either here, the only key there is."""
    opening, any_objects = _keys_opening_objects(backend, masters)
    if len(opening) == 1:
        return opening[0]
    if not opening and len(masters) == 1 and not any_objects:
        return masters[0]
    why = ("no snapshot or index file here opens with " + ("it" if len(masters) == 1 else "any of them")
           if not opening else f"objects here open with {len(opening)} of them")
    raise CorruptionError(f"the config cannot be rebuilt: the password opens key files of {len(masters)} "
                          f"master key(s), and {why}: a key file here is another repository's. Nothing was "
                          "changed; put this repository's key files back (or remove the others: "
                          "'deltavault key list' shows their dates and hosts) and run repair again")


def _keys_opening_objects(backend: Backend, masters: list[keymod.MasterKey]) -> tuple[list[keymod.MasterKey], bool]:
    """Which of ``masters`` open some snapshot or index file here, and whether there is any.
    One pass, one object in memory at a time, ending once two keys are found (or the only
    one): every object is tried, since the names (and so the order) are anyone's choice."""
    envs = [(m, Envelope(m)) for m in masters]
    found: list[keymod.MasterKey] = []
    seen = False
    for folder, aad in (("snapshots/", SNAPSHOT_AAD), ("index/", INDEX_AAD)):
        for obj in backend.list(folder):
            if len(found) == min(2, len(masters)):
                return found, True
            seen = True
            try:
                data = backend.get(obj.name)
            except BackendError:
                continue
            for master, env in envs:
                if master in found:
                    continue
                try:
                    env.open(data, aad=aad, what=obj.name)
                except CorruptionError:
                    continue
                found.append(master)
            del data
    return found, seen


def _problem(raw: bytes | None, masters: list[keymod.MasterKey]) -> str:
    """Why the config is not usable, or "" when it is."""
    if raw is None:
        return "the config is missing"
    try:
        cfg = decode_json(raw, RepoConfig)
    except Undecodable as exc:
        return f"the config does not parse ({exc})"
    if cfg.format != "deltavault" or cfg.v != REPO_VERSION:
        return f"the config names format {cfg.format!r} version {cfg.v}"
    if masters and not any(mac_matches(cfg, m) for m in masters):
        return "the config fails its authentication (edited or damaged)"
    if not masters and cfg.encryption != "none":
        return "the config says encrypted, but there are no key files"
    return ""


def _rebuild(backend: Backend, raw: bytes | None, master: keymod.MasterKey | None,
             cache_root: Path | None) -> tuple[RepoConfig, dict[str, str]]:
    text = (raw or b"").decode("utf-8", "replace")
    sources: dict[str, str] = {}

    def pick(name: str, salvaged: object, inferred: object, default: object) -> object:
        for value, where in ((salvaged, "salvaged from the damaged config"), (inferred, "inferred"),
                             (default, "default")):
            if value is not None:
                sources[name] = where
                return value
        raise AssertionError(name)

    rid = pick("id", _field(text, "id", r'"([0-9a-f]{32})"'), _cached_id(backend, cache_root), os.urandom(16).hex())
    chunker = pick("chunker", _salvage_chunker(text), None, ChunkerParams())
    pack = _field(text, "pack_size", r"(\d+)")
    pack_size = pick("pack_size", int(pack) if pack and _MIB <= int(pack) <= 1024 * _MIB else None,
                     _pack_size_from_packs(backend), DEFAULT_PACK_SIZE)
    comp = pick("compression", _salvage_compression(text), None, DEFAULT_COMPRESSION)
    cfg = RepoConfig(id=str(rid), encryption="aes-256-gcm+scrypt" if master else "none",
                     chunker=chunker, pack_size=int(str(pack_size)),  # type: ignore[arg-type]
                     compression=comp)  # type: ignore[arg-type]
    if master is not None:
        cfg.mac = config_mac(cfg, master)
    sources["encryption"] = "from the key files" if master else "no key files: unencrypted"
    return cfg, sources


def _field(text: str, name: str, value_re: str) -> str | None:
    m = re.search(rf'"{name}"\s*:\s*{value_re}', text)
    return m.group(1) if m else None


def _salvage_chunker(text: str) -> ChunkerParams | None:
    m = re.search(r'"chunker"\s*:\s*(\{[^{}]*\})', text)
    if not m:
        return None
    try:
        c = decode_json(m.group(1).encode(), ChunkerParams)
    except Undecodable:
        return None
    ok = 16 * 1024 <= c.min <= c.avg <= c.max <= 64 * _MIB and c.avg & (c.avg - 1) == 0
    return c if ok else None


def _salvage_compression(text: str) -> int | str | None:
    v = _field(text, "compression", r'("auto"|-?\d+)')
    if v is None:
        return None
    if v == '"auto"':
        return "auto"
    return int(v) if -7 <= int(v) <= 22 else None


def _pack_size_from_packs(backend: Backend) -> int | None:
    """Packs are cut once they reach the pack size, so the largest ones show it (rounded up
    to a MiB); None when no pack is larger than the default, which then fits."""
    largest = max((o.size for o in backend.list("data/")), default=0)
    if largest <= DEFAULT_PACK_SIZE * 3 // 2:
        return None
    return min(1024 * _MIB, -(-largest // _MIB) * _MIB)


def _cached_id(backend: Backend, cache_root: Path | None) -> str | None:
    """The id of the local cache directory holding index files of this repository: keeping
    it keeps the catalog, so the next backup stays incremental."""
    root = cache_root or default_cache_root()
    names = {o.name.rsplit("/", 1)[-1] for o in backend.list("index/")}
    try:
        dirs = [d for d in root.iterdir() if re.fullmatch(r"[0-9a-f]{32}", d.name)]
    except OSError:
        return None
    for d in dirs:
        try:
            cached = {p.name for p in (d / "index").iterdir()}
        except OSError:
            continue
        # Index file names are hashes of their content: sharing one means the same repository.
        if cached & names and all(blake3.blake3((d / "index" / n).read_bytes()).hexdigest() == n
                                  for n in list(cached & names)[:3]):
            return d.name
    return None


__all__ = ["ConfigRepair", "check_or_rebuild_config"]
