"""Key files: list, add and remove the passwords that open a repository.

Every key file wraps the same master key under its own password (keys.py), so adding one
never touches data, and removing one only removes that password. A process never removes
the key file it opened the repository with: two admins removing keys at the same time
still leave both of theirs, so a repository cannot lose its last key this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import msgspec

from deltavault.backends.base import Backend
from deltavault.errors import CorruptionError, DeltavaultError, Undecodable, UsageError
from deltavault.framing import decode_json
from deltavault.fs.paths import shown
from deltavault.model.types import match_prefix
from deltavault.repository import config as configmod
from deltavault.repository import keys as keymod


class KeyedRepository(Protocol):
    backend: Backend
    master: keymod.MasterKey | None
    key_name: str | None


@dataclass
class KeyInfo:
    name: str  # keys/<hash>
    created: str = ""
    hostname: str = ""
    current: bool = False
    problem: str = ""  # why the file could not be read, if it could not

    @property
    def short(self) -> str:
        return shown(self.name.removeprefix("keys/")[:8])  # an object name: anyone's choice


def _master(repo: KeyedRepository) -> keymod.MasterKey:
    if repo.master is None:
        raise UsageError("this repository is not encrypted: it has no keys")
    return repo.master


def list_keys(repo: KeyedRepository) -> list[KeyInfo]:
    _master(repo)
    out = []
    for obj in repo.backend.list("keys/"):
        info = KeyInfo(obj.name, current=obj.name == repo.key_name)
        try:
            kf = keymod.parse_key_file(repo.backend.get(obj.name), obj.name)
            info.created, info.hostname = kf.created, kf.hostname
        except DeltavaultError as exc:
            info.problem = exc.message
        out.append(info)
    out.sort(key=lambda k: (k.created, k.name))
    return out


def add_key(repo: KeyedRepository, password: bytes,
            scrypt: tuple[int, int, int] = keymod.DEFAULT_SCRYPT) -> str:
    """Store a new key file for ``password``; returns its name."""
    if not password:
        raise UsageError("the new password is empty")
    data = keymod.make_key_file(_master(repo), password, scrypt)
    name = keymod.key_file_name(data)
    repo.backend.put(name, data)
    return name


def resolve_key(repo: KeyedRepository, ref: str) -> str:
    """A key file's name from its id or a unique prefix of it."""
    _master(repo)
    ref = ref.removeprefix("keys/")
    if not ref:
        raise UsageError("no key matches ''")
    ids = [o.name.removeprefix("keys/") for o in repo.backend.list("keys/")]
    return "keys/" + match_prefix(ids, ref, "key")


def remove_key(repo: KeyedRepository, ref: str) -> str:
    name = resolve_key(repo, ref)
    if name == repo.key_name:
        raise UsageError(f"key {KeyInfo(name).short} is the one this command opened the repository "
                         "with; open it with another password to remove this one (or use key passwd)")
    repo.backend.delete(name)
    return name


def change_password(repo: KeyedRepository, password: bytes,
                    scrypt: tuple[int, int, int] = keymod.DEFAULT_SCRYPT) -> tuple[str, str]:
    """Add a key for the new password, then remove the current one: a crash in between
    leaves both passwords working, never neither. Returns (new name, removed name)."""
    old = repo.key_name
    if old is None:
        raise UsageError("this repository is not encrypted: it has no password")
    new = add_key(repo, password, scrypt)
    repo.backend.delete(old)
    repo.key_name = new
    return new, old


class KeyExport(msgspec.Struct, kw_only=True):
    """What ``key export`` writes: a key file (the master key wrapped by a password) and the
    id of the repository it opens. Without that password it opens nothing."""

    format: str = "deltavault-key"
    v: int = 1
    repository: str
    key: msgspec.Raw


def export_key(repo: KeyedRepository, repo_id: str, password: bytes | None = None,
               scrypt: tuple[int, int, int] = keymod.DEFAULT_SCRYPT) -> bytes:
    """The master key for safe keeping: wrapped by ``password`` when given (a password for
    the export alone), else the key file in use, as it is stored."""
    master = _master(repo)
    if password is not None:
        data = keymod.make_key_file(master, password, scrypt)
    else:
        assert repo.key_name is not None
        data = repo.backend.get(repo.key_name)
    return msgspec.json.format(msgspec.json.encode(KeyExport(repository=repo_id, key=msgspec.Raw(data))))


def import_key(backend: Backend, data: bytes, password: bytes) -> str:
    """Check an export: for this repository, opened by ``password``, holding the master key
    the repository's config is authenticated with; then store its key file, so the password
    opens the repository again (also after every key file there was lost). Returns its name."""
    try:
        exp = decode_json(data, KeyExport)
    except Undecodable as exc:
        raise UsageError(f"not a deltavault key export: {exc}") from exc
    if exp.format != "deltavault-key":
        raise UsageError("not a deltavault key export")
    cfg = configmod.read(backend)
    if cfg.encryption == "none":
        raise UsageError("this repository is not encrypted: it has no keys")
    if exp.repository != cfg.id:
        raise UsageError(f"the key is for repository {exp.repository[:8]}, not this one ({cfg.id[:8]})")
    raw = bytes(exp.key)
    master = keymod.unwrap(keymod.parse_key_file(raw, "the export"), password)
    if cfg.mac != configmod.config_mac(cfg, master):
        raise CorruptionError("the repository's config does not authenticate with this key: the config is "
                              "damaged or edited, or the export is not this repository's")
    name = keymod.key_file_name(raw)
    backend.put(name, raw)
    return name
