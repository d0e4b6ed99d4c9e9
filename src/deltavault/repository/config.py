"""The repository's config and its keys: creating them (init), reading and checking them
(open), and unlocking the master key with a password.

The config is a plain JSON object at ``config``; for an encrypted repository it carries a
keyed BLAKE3 (``mac``) under the master key, so an edited config is noticed. ``config`` is
written last by init: a repository without it does not exist yet.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable, Iterator

import blake3
import msgspec

from deltavault.backends import retention as retention_mod
from deltavault.backends.base import Backend
from deltavault.errors import (
    CorruptionError,
    FormatError,
    KeyFileDamaged,
    ObjectNotFound,
    ObjectTooLarge,
    RepositoryExists,
    RepositoryNotFound,
    Undecodable,
    UnsupportedVersion,
    UsageError,
    WrongPassword,
)
from deltavault.framing import decode_json
from deltavault.repository import keys as keymod
from deltavault.repository.keyhint import KeyHint

REPO_VERSION = 1
DEFAULT_PACK_SIZE = 32 * 1024 * 1024
# What `init --pack-size` accepts (restic's range): smaller packs mean many objects and
# requests on an object store, larger ones slow uploads and make prune repack more. The
# format itself allows 1 MiB to 1 GiB (tests use 1 MiB packs; repair keeps what is there).
USEFUL_PACK_SIZES = (4 * 1024 * 1024, 128 * 1024 * 1024)
DEFAULT_COMPRESSION = "auto"

PasswordSource = Callable[[], bytes]


class ChunkerParams(msgspec.Struct, kw_only=True):
    # FastCDC: mean chunk about min + avg (320 KiB)
    min: int = 64 * 1024
    avg: int = 256 * 1024
    max: int = 2 * 1024 * 1024


class RepoConfig(msgspec.Struct, kw_only=True):
    format: str = "deltavault"
    v: int = REPO_VERSION
    id: str
    encryption: str  # "aes-256-gcm+scrypt" | "none"
    chunker: ChunkerParams = msgspec.field(default_factory=ChunkerParams)
    pack_size: int = DEFAULT_PACK_SIZE
    compression: int | str = DEFAULT_COMPRESSION  # "auto" or a zstd level
    # Keyed BLAKE3 of the fields above under the master key (empty when unencrypted),
    # so an edited config is noticed.
    mac: str = ""
    # S3 Object Lock on everything written: "governance:DAYS" or "compliance:DAYS", "" for
    # none (backends/retention.py). Authenticated by ``mac`` too.
    retention: str = ""


def config_mac(cfg: RepoConfig, master: keymod.MasterKey) -> str:
    """Keyed BLAKE3 of the config's JSON with ``mac`` empty, under the master key's MAC half.
    An empty ``retention`` is left out, so configs from before it existed still match."""
    fields = msgspec.structs.asdict(msgspec.structs.replace(cfg, mac=""))
    if not fields["retention"]:
        del fields["retention"]
    return blake3.blake3(msgspec.json.encode(fields), key=master.mac).hexdigest()


def mac_matches(cfg: RepoConfig, master: keymod.MasterKey) -> bool:
    """Whether the config is authenticated under ``master`` (in constant time). Compared as
    bytes: ``hmac.compare_digest`` raises TypeError for a str with non-ASCII characters,
    which an edited config's ``mac`` may hold."""
    return hmac.compare_digest(cfg.mac.encode(), config_mac(cfg, master).encode())


Unlocked = tuple[RepoConfig, keymod.MasterKey | None, str | None]  # config, master key, key file name


def create(backend: Backend, password: bytes | None, *, pack_size: int, compression: int | str,
           chunker: ChunkerParams | None, scrypt: tuple[int, int, int], retention: str = "") -> Unlocked:
    """Write a new repository's key file (when ``password`` is not None) and config."""
    try:
        backend.stat("config")
        raise RepositoryExists(f"a repository already exists at {backend.location()}")
    except ObjectNotFound:
        pass
    retention_mod.apply(backend, retention, creating=True)  # refused before anything is written
    if not 1024 * 1024 <= pack_size <= 1024**3:
        raise UsageError("pack size must be between 1 MiB and 1 GiB")
    if compression != "auto" and not (isinstance(compression, int) and -7 <= compression <= 22):
        raise UsageError("compression must be 'auto' or a zstd level from -7 to 22")
    master = keymod.MasterKey.generate() if password is not None else None
    cfg = RepoConfig(id=os.urandom(16).hex(), encryption="aes-256-gcm+scrypt" if master else "none",
                     chunker=chunker or ChunkerParams(), pack_size=pack_size, compression=compression,
                     retention=retention)
    key_name = None
    if master:
        cfg.mac = config_mac(cfg, master)
        kf = keymod.make_key_file(master, password or b"", scrypt)
        key_name = keymod.key_file_name(kf)
        backend.put(key_name, kf)
    # config last: a repository without it does not exist yet
    backend.put("config", msgspec.json.encode(cfg))
    return cfg, master, key_name


def read(backend: Backend) -> RepoConfig:
    """The config, checked to be one this build reads."""
    try:
        raw = backend.get("config")
    except ObjectNotFound:
        if any(True for _ in backend.list("keys/")) or any(True for _ in backend.list("index/")):
            raise CorruptionError(f"the repository at {backend.location()} has lost its config; "
                                  "'deltavault repair' rebuilds it") from None
        raise RepositoryNotFound(f"no repository at {backend.location()} (run 'deltavault init')") from None
    try:
        cfg = decode_json(raw, RepoConfig)
    except Undecodable as exc:
        raise FormatError(f"repository config is damaged: {exc}; 'deltavault repair' rebuilds it") from exc
    if cfg.format != "deltavault":
        raise FormatError("not a deltavault repository")
    if cfg.compression != "auto" and not isinstance(cfg.compression, int):
        raise FormatError(f"repository config: unknown compression {cfg.compression!r}")
    if cfg.v != REPO_VERSION:
        raise UnsupportedVersion(f"repository format {cfg.v}; this build reads {REPO_VERSION}")
    return cfg


def open_existing(backend: Backend, password: PasswordSource, *, unencrypted: bool = False,
                  hint: KeyHint | None = None) -> Unlocked:
    """Read the config and, for an encrypted repository, unlock the master key and
    authenticate the config with it. The password is asked for only when needed.

    An unencrypted repository is opened only when the caller says one is meant
    (``unencrypted``): its config carries no MAC, so whoever can write the store can
    replace an encrypted repository by an unencrypted one (a config saying "none", no key
    files) and the next backup would store every file in plain text there, the next
    restore bring back whatever files that writer chose.

    ``hint``: the key file that opened this location last (keyhint.py), whose key is derived
    while the config and key files are read, and which is kept for the next open."""
    asked: list[bytes] = []

    def once() -> bytes:  # a prompt asks once, whoever needs it first
        if not asked:
            asked.append(password())
        return asked[0]

    if hint is not None:
        hint.start(once)
    cfg = read(backend)
    key_names = [o.name for o in backend.list("keys/")]
    if not key_names and cfg.encryption == "none":
        if not unencrypted:
            raise_unencrypted(backend)
        return cfg, None, None
    if not key_names:
        raise CorruptionError("repository is encrypted but has no key files")
    # The master key is the one the config is authenticated with, not merely one a key file
    # yields: a key file of another repository opened by the same password (planted, or
    # copied by mistake) named first had made the config "fail its authentication", and
    # the repair that message sent the user to rebuilt the config under that other key,
    # then found every pack and snapshot "damaged" and deleted them.
    for master, key_name in open_keys(backend, key_names, once(), hint.unwrap if hint is not None else None):
        if mac_matches(cfg, master):
            retention_mod.apply(backend, cfg.retention, creating=False)
            if hint is not None:
                hint.keep(key_name)
            return cfg, master, key_name
    raise CorruptionError("repository config fails its authentication under every key file the password "
                          "opens: it was edited or damaged, or those key files are another repository's; "
                          "'deltavault repair' rebuilds it with the key this repository's data is sealed with")


def raise_unencrypted(backend: Backend) -> None:
    """Refuse a repository that is unencrypted when none was said to be (``open_existing``)."""
    raise UsageError(f"the repository at {backend.location()} has no key files, so it is not encrypted; "
                     "refusing it: if it was made with 'init --insecure-no-encryption', give "
                     "--insecure-no-encryption; if it was encrypted, whoever can write its store replaced it, "
                     "so write nothing to it and trust nothing read from it")


def open_keys(backend: Backend, key_names: list[str], password: bytes,
              unwrap: Callable[[bytes, str, bytes], keymod.MasterKey] | None = None,
              ) -> Iterator[tuple[keymod.MasterKey, str]]:
    """The master key of each key file the password opens, with that file's name, in name
    order (lazily: each costs a key derivation). A key file opening is no proof that it is
    this repository's: the caller checks the key against what the repository holds. None
    opens: WrongPassword (or, for a single key file, why it is damaged)."""
    damaged: KeyFileDamaged | ObjectTooLarge | None = None
    opened = False
    for name in sorted(key_names):
        try:
            data = backend.get(name)
            master = (unwrap(data, name, password) if unwrap is not None
                      else keymod.unwrap(keymod.parse_key_file(data, name), password))
        except (KeyFileDamaged, ObjectTooLarge) as exc:  # one planted beside the real one locks no one out
            damaged = exc
            continue
        except WrongPassword:
            continue
        opened = True
        yield master, name
    if opened:
        return
    if damaged is not None and len(key_names) == 1:
        raise damaged
    raise WrongPassword("wrong password: no key file of this repository opens with it")
