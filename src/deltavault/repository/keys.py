"""Master key and key files.

The master key (64 random bytes) splits into an AES-256-GCM key and a BLAKE3 key for
blob ids. A key file stores it wrapped by a key derived from the password with scrypt.
The file also carries a BLAKE3 checksum of its fields, so damage or tampering is told
apart from a wrong password.
"""

from __future__ import annotations

import base64
import os
import socket
import time
from dataclasses import dataclass

import blake3
import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from deltavault.errors import (
    FormatError,
    KeyFileDamaged,
    Undecodable,
    UnsupportedVersion,
    UsageError,
    WrongPassword,
)
from deltavault.framing import decode_json

KEYFILE_VERSION = 1
_AAD = b"deltavault key v1"
DEFAULT_SCRYPT = (2**15, 8, 1)
# The most a key file may ask of the key derivation, which runs before the password is known
# to be wrong, for every key file in keys/: scrypt's memory (128 * n * r bytes) at most 8
# times and its work (n * r * p) at most 16 times what this build writes (DEFAULT_SCRYPT:
# 32 MiB, 0.1 s). The bounds were n <= 2**22, r <= 64, p <= 16: one key file planted in the
# store asked 32 GiB and an hour of every command on the repository.
MAX_SCRYPT_MEMORY = 256 * 1024 * 1024
MAX_SCRYPT_WORK = 16 * DEFAULT_SCRYPT[0] * DEFAULT_SCRYPT[1] * DEFAULT_SCRYPT[2]


@dataclass(frozen=True)
class MasterKey:
    enc: bytes  # AES-256-GCM key
    mac: bytes  # BLAKE3 key for blob ids and the chunker seed

    @classmethod
    def generate(cls) -> MasterKey:
        raw = os.urandom(64)
        return cls(raw[:32], raw[32:])

    def raw(self) -> bytes:
        return self.enc + self.mac

    def chunker_seed(self) -> int:
        # A secret gear-table seed stops chunk boundaries leaking file contents.
        d = blake3.blake3(b"deltavault chunker seed", key=self.mac).digest(8)
        return (int.from_bytes(d, "little") >> 1) or 1


class KeyFile(msgspec.Struct, kw_only=True):
    v: int
    kdf: str
    n: int
    r: int
    p: int
    salt: str
    nonce: str
    wrapped: str
    created: str
    hostname: str
    checksum: str = ""

    def _body_digest(self) -> str:
        body = msgspec.structs.replace(self, checksum="")
        return blake3.blake3(msgspec.json.encode(body)).hexdigest()


def _kek(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(password)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def scrypt_allowed(n: int, r: int, p: int) -> bool:
    """Whether a key file may ask these scrypt parameters (``MAX_SCRYPT_MEMORY``, ``MAX_SCRYPT_WORK``)."""
    return (n >= 2 and n & (n - 1) == 0 and r >= 1 and p >= 1
            and 128 * n * r <= MAX_SCRYPT_MEMORY and n * r * p <= MAX_SCRYPT_WORK)


def make_key_file(master: MasterKey, password: bytes,
                  params: tuple[int, int, int] = DEFAULT_SCRYPT) -> bytes:
    """A key file wrapping ``master`` under ``password``; refused (UsageError) for scrypt
    parameters that ``parse_key_file`` would not accept: no key file is written that its
    own repository then refuses."""
    n, r, p = params
    if not scrypt_allowed(n, r, p):
        raise UsageError(f"scrypt parameters n={n} r={r} p={p} are outside what a key file may ask "
                         f"(at most {MAX_SCRYPT_MEMORY >> 20} MiB and {MAX_SCRYPT_WORK} n*r*p)")
    salt, nonce = os.urandom(32), os.urandom(12)
    wrapped = AESGCM(_kek(password, salt, n, r, p)).encrypt(nonce, master.raw(), _AAD)
    kf = KeyFile(v=KEYFILE_VERSION, kdf="scrypt", n=n, r=r, p=p, salt=_b64(salt),
                 nonce=_b64(nonce), wrapped=_b64(wrapped),
                 created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                 hostname=socket.gethostname())
    kf.checksum = kf._body_digest()
    return msgspec.json.encode(kf)


def key_file_name(data: bytes) -> str:
    """Key files are stored under their own hash, so adding one never overwrites another."""
    return f"keys/{blake3.blake3(data).hexdigest()}"


def parse_key_file(data: bytes, name: str = "key") -> KeyFile:
    try:
        kf = decode_json(data, KeyFile)
    except Undecodable as exc:
        raise KeyFileDamaged(f"key file {name} is damaged: {exc}") from exc
    if kf.v != KEYFILE_VERSION:
        raise UnsupportedVersion(f"key file {name} has version {kf.v}; this build reads {KEYFILE_VERSION}")
    if kf.checksum != kf._body_digest():
        raise KeyFileDamaged(f"key file {name} fails its checksum: it was damaged or tampered with")
    if kf.kdf != "scrypt" or not scrypt_allowed(kf.n, kf.r, kf.p):
        raise KeyFileDamaged(f"key file {name} has unsupported or unsafe KDF parameters")
    return kf


def unwrap(kf: KeyFile, password: bytes) -> MasterKey:
    try:
        salt, nonce, wrapped = (base64.b64decode(x, validate=True)
                                for x in (kf.salt, kf.nonce, kf.wrapped))
    except ValueError as exc:
        raise KeyFileDamaged(f"key file is damaged: {exc}") from exc
    if len(salt) < 16 or len(nonce) != 12 or len(wrapped) != 64 + 16:
        raise KeyFileDamaged("key file is damaged: salt, nonce or wrapped key has the wrong length")
    try:
        raw = AESGCM(_kek(password, salt, kf.n, kf.r, kf.p)).decrypt(nonce, wrapped, _AAD)
    except InvalidTag:
        raise WrongPassword("wrong password: no key file of this repository opens with it") from None
    if len(raw) != 64:
        raise FormatError("master key has the wrong length")
    return MasterKey(raw[:32], raw[32:])
