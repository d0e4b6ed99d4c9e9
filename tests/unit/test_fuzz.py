"""Fuzzing every on-disk object's parser: whatever the bytes, a parser either returns a
value or raises a DeltavaultError subclass, never anything else.

The envelope is fuzzed both sealed (AES-GCM rejects any change) and unsealed: an
unencrypted Envelope hands the fuzzed bytes straight to the decoders below it, which is
where parsing bugs live. Structured strategies (msgpack of near-valid shapes) reach past
the first type check. DELTAVAULT_FUZZ_EXAMPLES raises the example count.
"""

from __future__ import annotations

import os
import struct

import blake3
import msgspec
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deltavault.backends.local import LocalBackend
from deltavault.errors import DeltavaultError
from deltavault.objects.trees import decode_tree
from deltavault.repository.envelope import Envelope
from deltavault.repository.index import Index
from deltavault.repository.indexfile import INDEX_AAD, decode_index
from deltavault.repository.keys import MasterKey, make_key_file, parse_key_file, unwrap
from deltavault.repository.pack import (
    HEADER_AAD,
    MAGIC,
    TRAILER,
    parse_header,
    parse_tail,
    read_pack_entries,
)
from deltavault.repository.repository import Repository

EXAMPLES = int(os.environ.get("DELTAVAULT_FUZZ_EXAMPLES", "300"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

PLAIN = Envelope(None)
SEALED = Envelope(MasterKey.generate())

# msgpack-able values shaped like what is stored: ints at the edges, ids of right and wrong length
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                    st.binary(max_size=40), st.sampled_from([os.urandom(32), b"", b"/", b".."]),
                    st.text(max_size=8), st.floats(allow_nan=True))
values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=6),
                                                    st.dictionaries(st.text(max_size=10), c, max_size=6)),
                      max_leaves=30)
_edge = st.one_of(st.integers(-2, 3), st.sampled_from([2**31, 2**32 - 1, 2**32, 2**40, 2**63, 2**64 - 1]),
                  st.integers(0, 10**6))
entry = st.one_of(
    st.lists(st.one_of(st.integers(min_value=-5, max_value=2**64 - 1), st.binary(min_size=31, max_size=33)),
             min_size=4, max_size=6),
    # well-formed entries with values at the edges: type, id, offset, length, raw length
    st.tuples(st.integers(-1, 3), st.binary(min_size=32, max_size=32), _edge, _edge, _edge).map(list))


def typed_only(fn, *args, **kw):  # type: ignore[no-untyped-def]
    try:
        return fn(*args, **kw)
    except DeltavaultError:
        return None


def mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


# ---------------------------------------------------------------- packs
@fuzz
@given(st.binary(max_size=200), st.integers(min_value=0, max_value=2**40))
def test_pack_tail(tail: bytes, size: int) -> None:
    typed_only(parse_tail, tail, size, "p")


@fuzz
@given(st.one_of(st.binary(max_size=300), st.lists(entry, max_size=8).map(msgspec.msgpack.encode),
                 values.map(msgspec.msgpack.encode)), st.integers(min_value=0, max_value=10_000))
def test_pack_header(body: bytes, size: int) -> None:
    for env, sealed in ((PLAIN, b"\x00" + body), (PLAIN, body), (SEALED, body)):
        entries = typed_only(parse_header, env, sealed, size, "p")
        if entries:
            Index().add_pack(b"p" * 32, entries)  # whatever a header yields must be indexable


def _pack(entries: list) -> bytes:  # type: ignore[type-arg]
    header = PLAIN.seal(msgspec.msgpack.encode(entries), aad=HEADER_AAD)
    return MAGIC + b"\x00" * 64 + header + struct.pack("<I4s", len(header), TRAILER)


@fuzz
@given(st.lists(entry, max_size=6), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
       st.integers(min_value=0, max_value=400))
def test_whole_pack(entries: list, edits: list[tuple[int, int]], cut: int) -> None:  # type: ignore[type-arg]
    data = mutate(_pack(entries), edits)
    for d in (data, data[:cut], data[cut:]):
        got = typed_only(read_pack_entries, PLAIN, d, "p")
        if got:
            Index().add_pack(b"p" * 32, got)


# ---------------------------------------------------------------- index files
index_docs = st.fixed_dictionaries(
    {"packs": st.lists(st.tuples(st.one_of(st.binary(min_size=32, max_size=32), st.binary(max_size=33)),
                                 st.lists(entry, max_size=4)), max_size=4)},
    optional={"supersedes": st.lists(st.binary(max_size=33), max_size=3), "v": st.integers(-1, 3)})


@fuzz
@given(st.one_of(st.binary(max_size=300), index_docs.map(msgspec.msgpack.encode), values.map(msgspec.msgpack.encode)))
@example(msgspec.msgpack.encode({"packs": [[b"p" * 32, [[0, b"i" * 32, 8, 2**32, -1]]]]}))  # length, raw out of range
def test_index_file(raw: bytes) -> None:
    f = typed_only(decode_index, raw, "i")
    if f is not None:
        idx = Index()
        for p in f.packs:
            idx.add_pack(p.id, p.blobs)
        for bid, _pid, _e, _pos in idx.iter_records():
            assert idx.lookup(bid) is not None


# ---------------------------------------------------------------- trees
node = st.fixed_dictionaries(
    {"name": st.binary(max_size=12), "type": st.sampled_from(["f", "d", "l", "p", "c", "b", "x", ""])},
    optional={"size": st.integers(-5, 2**64 - 1), "content": st.lists(st.lists(scalars, max_size=5), max_size=3),
              "subtree": st.binary(max_size=33), "pages": st.lists(st.binary(max_size=33), max_size=2),
              "xattrs": st.lists(st.lists(st.binary(max_size=5), max_size=3), max_size=2),
              "mode": st.integers(-1, 2**40), "mtime": st.integers(-(2**63), 2**64 - 1)})


@fuzz
@given(st.one_of(st.binary(max_size=300),
                 st.fixed_dictionaries({"nodes": st.lists(node, max_size=4)},
                                       optional={"v": st.integers(-1, 3)}).map(msgspec.msgpack.encode),
                 values.map(msgspec.msgpack.encode)))
@example(b"\x81\xa5nodes\x91\x83\xa4name\xc4\x01a\xa4type\xa1f\xa4user\xa1\x80")  # user: invalid UTF-8
def test_tree(raw: bytes) -> None:
    typed_only(decode_tree, raw)


# ---------------------------------------------------------------- snapshots, config, locks (via a repository)
snap_docs = st.fixed_dictionaries(
    {"time": st.one_of(st.text(max_size=5), st.integers(-5, 2**63)), "time_ns": st.integers(-(2**63), 2**64 - 1),
     "hostname": st.one_of(st.text(max_size=5), st.none())},
    optional={"tree": st.binary(max_size=33), "volume": st.binary(max_size=33), "paths": st.lists(scalars, max_size=2),
              "summary": values, "v": st.integers(-1, 3), "kind": st.text(max_size=6)})


@pytest.fixture(scope="module")
def plain_repo(tmp_path_factory: pytest.TempPathFactory) -> Repository:
    return Repository.init(LocalBackend(tmp_path_factory.mktemp("fuzzrepo"), fsync=False), None)


@fuzz
@given(raw=st.one_of(st.binary(max_size=300), snap_docs.map(msgspec.msgpack.encode)), flags=st.sampled_from([b"\x00", b""]))
@example(raw=b"\x83\xa4time\xa1\x80\xa7time_ns\x01\xa8hostname\xa1h", flags=b"\x00")  # invalid UTF-8
def test_snapshot(plain_repo: Repository, raw: bytes, flags: bytes) -> None:
    data = flags + raw
    sid = blake3.blake3(data).hexdigest()
    plain_repo.backend.put(f"snapshots/{sid}", data)
    try:
        typed_only(plain_repo.load_snapshot, sid)
    finally:
        plain_repo.backend.delete(f"snapshots/{sid}")


@fuzz
@given(raw=st.one_of(st.binary(max_size=200), values.map(msgspec.json.encode)))
def test_lock_records(plain_repo: Repository, raw: bytes) -> None:
    plain_repo.backend.put("locks/fuzz", b"\x00" + raw)
    try:
        for _name, info in plain_repo.locks.list_locks():
            plain_repo.locks.is_stale(info)
    finally:
        plain_repo.backend.delete("locks/fuzz")


@fuzz
@given(st.one_of(st.binary(max_size=300), values.map(msgspec.json.encode)),
       st.lists(st.tuples(st.integers(0, 10**4), st.integers(0, 255)), max_size=3))
def test_config(raw: bytes, edits: list[tuple[int, int]]) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        b = LocalBackend(d, fsync=False)
        cfg = msgspec.json.encode({"format": "deltavault", "v": 1, "id": "00" * 16, "encryption": "none"})
        b.put("config", mutate(cfg, edits) if edits else raw)
        typed_only(Repository.open, b, lambda: b"", cache_root=Path(d) / "c", unencrypted=True)


# ---------------------------------------------------------------- key files
GOOD_KEY = make_key_file(MasterKey.generate(), b"pw", (2**4, 1, 1))
key_docs = st.fixed_dictionaries(
    {"v": st.integers(-1, 3), "kdf": st.sampled_from(["scrypt", "argon2", ""]), "n": st.integers(-2, 2**23),
     "r": st.integers(-1, 70), "p": st.integers(-1, 20), "salt": st.text(max_size=12),
     "nonce": st.text(max_size=20), "wrapped": st.text(max_size=30), "created": st.text(max_size=3),
     "hostname": st.text(max_size=3)})


def _with_checksum(d: dict) -> bytes:  # type: ignore[type-arg]
    # A tampered file that also fixed its checksum must still fail cleanly.
    body = msgspec.json.encode({**d, "checksum": ""})
    d = {**d, "checksum": blake3.blake3(body).hexdigest()}
    return msgspec.json.encode(d)


@settings(max_examples=max(50, EXAMPLES // 3), deadline=None, database=None)
@given(st.one_of(st.binary(max_size=300), key_docs.map(msgspec.json.encode), key_docs.map(_with_checksum),
                 st.lists(st.tuples(st.integers(0, 10**4), st.integers(0, 255)), min_size=1, max_size=3)
                 .map(lambda e: mutate(GOOD_KEY, e))))
def test_key_file(raw: bytes) -> None:
    kf = typed_only(parse_key_file, raw, "k")
    if kf is not None and kf.n <= 2**14 and kf.r * kf.n <= 2**16:  # keep scrypt cheap
        typed_only(unwrap, kf, b"pw")


# ---------------------------------------------------------------- envelope
@fuzz
@given(st.binary(max_size=400), st.sampled_from([b"\x00", b"\x01", b"\x02", b""]))
def test_envelope(body: bytes, flag: bytes) -> None:
    typed_only(PLAIN.open, flag + body)
    typed_only(SEALED.open, flag + body, aad=INDEX_AAD)


@fuzz
@given(st.binary(min_size=1, max_size=2000))
def test_envelope_zstd_frames(data: bytes) -> None:
    import zstandard

    frame = zstandard.ZstdCompressor().compress(data)
    for cut in (len(frame), len(frame) - 1, len(frame) // 2):
        got = typed_only(PLAIN.open, b"\x01" + frame[:cut])
        assert got is None or got == data


@fuzz
@given(st.binary(min_size=1, max_size=500), st.integers(4, 13), st.integers(0, 255))
@example(b"x" * 354, 4, 0xE2)  # frame descriptor now declares an 8-byte content size of ~2**55 (was MemoryError)
def test_envelope_zstd_frame_header(data: bytes, pos: int, val: int) -> None:
    import zstandard

    frame = bytearray(zstandard.ZstdCompressor().compress(data))
    frame[pos % len(frame)] = val  # magic is bytes 0-3; the frame header follows
    got = typed_only(PLAIN.open, b"\x01" + bytes(frame))
    assert got is None or len(got) <= 2 * len(data) + 1024 or got == data


# ---------------------------------------------------------------- patch blobs
@fuzz
@given(st.binary(max_size=200), st.integers(0, 300),
       st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), max_size=4), st.binary(max_size=50))
def test_patch_blob(raw: bytes, size: int, ranges: list[tuple[int, int]], data: bytes) -> None:
    from deltavault.objects.patch import MAGIC as PMAGIC
    from deltavault.objects.patch import apply_patches

    structured = PMAGIC + struct.pack("<I", len(ranges)) + b"".join(struct.pack("<II", *r) for r in ranges) + data
    for blob in (raw, PMAGIC + raw, structured):
        typed_only(apply_patches, bytes(size), [blob], size)


# ---------------------------------------------------------------- volume manifests and block maps
@fuzz
@given(st.one_of(st.binary(max_size=300), values.map(msgspec.msgpack.encode),
                 st.fixed_dictionaries({"first": st.integers(-1, 2**64 - 1), "refs": st.lists(st.lists(scalars, max_size=5), max_size=3)},
                                       optional={"v": st.integers(-1, 3)}).map(msgspec.msgpack.encode),
                 st.fixed_dictionaries({"size": st.integers(-1, 2**64 - 1), "block_size": st.integers(-1, 2**40),
                                        "segments": st.lists(st.lists(st.binary(max_size=33), max_size=3), max_size=3)},
                                       optional={"zero": st.binary(max_size=20), "v": st.integers(-1, 3)})
                 .map(msgspec.msgpack.encode)))
@example(b"\x84\xa4size\x01\xaablock_size\x01\xa8segments\x90\xaafree_space\xa1\x80")  # invalid UTF-8
def test_volume_manifest_and_block_map(raw: bytes) -> None:
    vol = pytest.importorskip("deltavault.model.volume")
    for kind in (vol.VolumeManifest, vol.BlockMap, vol.DigestState):
        typed_only(vol.decode, raw, kind, "volume object")
