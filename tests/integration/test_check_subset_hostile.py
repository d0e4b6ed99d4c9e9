"""``check --read-data-subset`` against a hostile writer with the key (see
test_hostile_writer_sizes.py): the packs a subset reads get the checks ``--read-data``
gives every pack (patches parsed as restore parses them, blobs compared with their indexed
length); a pack outside the subset is not read, locally or on S3 (counted by the proxy)."""

from __future__ import annotations

import msgspec
import pytest

from deltavault.model.content import Full, Patch
from deltavault.model.nodes import Node, NodeType
from tests.conftest import Cli
from tests.integration.test_hostile_writer import _planted, _planted_volume
from tests.integration.test_hostile_writer_sizes import _not_a_patch, _repo
from tests.s3proxy import Proxy
from tests.seaweed import Seaweed

F = NodeType.FILE
M = 4  # slices: the planted pack is in exactly one of 1/4 .. 4/4


def _slices(pack: bytes) -> tuple[str, list[str]]:
    """The slice of ``M`` that reads ``pack``, and the others."""
    n = pack[0] % M + 1
    return f"{n}/{M}", [f"{k}/{M}" for k in range(1, M + 1) if k != n]


def _planted_patch(cli: Cli, volume: bool) -> tuple[str, bytes, bytes, str]:
    """A snapshot whose one patch blob does not parse (in a pack of its own): its id, the
    blob's, its pack's, and what check says of it."""
    bad = _not_a_patch(cli)
    if volume:
        block = _repo(cli).blob_id(b"\1" * 4096)
        sid = _planted_volume(cli, [Full(block, 4096), Patch(block, [bad], 4096, b"\1")])
        says = ("(volume): 1 block(s) of 4096 bytes that restore refuses (so the volume), at byte offsets 4096 "
                f"(patch {bad.hex()[:16]} does not apply: patch blob: bad magic")
    else:
        hello = _repo(cli).blob_id(b"hello")
        sid = _planted(cli, [Node(name=b"patched", type=F, mode=0o644, content=[Patch(hello, [bad], 5, b"\1")],
                                  size=5)])
        says = f"patched: restore refuses its content: patch {bad.hex()[:16]} does not apply: patch blob: bad magic"
    loc = _repo(cli).index.lookup(bad)
    assert loc is not None
    return sid, bad, loc.pack_id, f"snapshot {sid[:8]}: {says}"


@pytest.mark.parametrize("volume", [False, True], ids=["file", "volume"])
def test_a_subset_parses_the_patches_of_the_packs_it_reads(cli: Cli, volume: bool) -> None:
    """A patch that does not parse passed ``--read-data-subset 1/1`` (which reads every
    pack, as ``--read-data`` does) and the slice holding it: only ``--read-data`` parsed
    patches. Now every subset parses those of the packs it reads; a slice without the
    planted pack neither reads it nor parses the patch in it."""
    _, _, pack, says = _planted_patch(cli, volume)
    covering, others = _slices(pack)
    assert cli("check").returncode == 0
    for subset in ("1/1", covering):
        r = cli("check", "--read-data-subset", subset)
        assert r.returncode == 13, (subset, r.stdout, r.stderr)
        assert says in r.stdout and "Traceback" not in r.stdout + r.stderr, (subset, r.stdout)
    for subset in others:
        r = cli("--json", "check", "--read-data-subset", subset)
        assert r.returncode == 0, (subset, r.stdout, r.stderr)
        assert pack.hex() not in r.stdout


def test_a_subset_compares_the_blobs_it_reads_with_their_indexed_length(cli: Cli) -> None:
    """An index file saying 1 GiB for a 5-byte blob (a tree saying the same): the slice
    that reads the blob's pack names the lie, as ``--read-data`` does; the others only see
    the true file disagree with the index, as plain ``check`` does."""
    sid = _planted(cli, [Node(name=b"f", type=F, mode=0o644)])
    repo = _repo(cli)
    hello = repo.blob_id(b"hello")
    loc = repo.index.lookup(hello)
    assert loc is not None
    packs = [(pid, [msgspec.structs.replace(e, raw_length=1 << 30) if e.id == hello else e for e in entries])
             for pid, entries in repo.index.entries_by_pack().items()]
    repo.write_index_file(packs, supersedes=repo.index_names())
    _planted(cli, [Node(name=b"lie", type=F, mode=0o644, content=[Full(hello, 1 << 30)], size=1 << 30)], host="h2")
    lie = f"blob {hello.hex()[:16]} in pack {loc.pack_id.hex()[:16]}: holds 5 bytes, the index records 1073741824"
    covering, others = _slices(loc.pack_id)
    for subset in ("1/1", covering):
        r = cli("check", "--read-data-subset", subset)
        assert r.returncode == 13 and lie in r.stdout, (subset, r.stdout, r.stderr)
    for subset in others:
        r = cli("check", "--read-data-subset", subset)
        assert r.returncode == 13 and lie not in r.stdout, (subset, r.stdout, r.stderr)
        assert f"snapshot {sid[:8]}: f: restore refuses its content" in r.stdout, (subset, r.stdout)


def test_a_subset_on_s3_gets_only_the_packs_it_reads(cli: Cli, seaweed: Seaweed, s3proxy: Proxy,
                                                      bucket: str) -> None:
    """The same repository copied object by object into a bucket: the slice without the
    planted pack asks the store for no byte of it (no GET of its key at all), the slice
    with it reads it once and names the patch."""
    _, _, pack, says = _planted_patch(cli, volume=False)
    s3 = seaweed.client()
    for f in cli.repo.rglob("*"):
        if f.is_file() and f.parent.name != "locks":
            s3.put_object(Bucket=bucket, Key=f"repo/{f.relative_to(cli.repo)}", Body=f.read_bytes())
    cli.env.update(seaweed.env(), DELTAVAULT_REPOSITORY=s3proxy.url(bucket, "repo"))
    key = f"/{bucket}/repo/data/{pack.hex()[:2]}/{pack.hex()}"
    covering, others = _slices(pack)
    for subset in [covering, *others]:
        before = s3proxy.snapshot()
        r = cli("check", "--read-data-subset", subset)
        gets = s3proxy.snapshot().since(before).by_key[("GET", key)]
        if subset == covering:
            assert r.returncode == 13 and says in r.stdout, (r.stdout, r.stderr)
            assert gets >= 1
        else:
            assert r.returncode == 0, (subset, r.stdout, r.stderr)
            assert gets == 0, (subset, gets)
