"""deltavault mount with real FUSE on a repository on S3 (the test SeaweedFS): the snapshot
listed, a small file and one spanning several packs read byte for byte (whole and by ranges
across pack boundaries), then a clean unmount that leaves no mount and no lock behind."""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest

from tests.conftest import Cli, init_small_packs, needs_root, needs_tools
from tests.integration.mount.conftest import leave_by_signal, leftovers, mount_daemon
from tests.s3proxy import Proxy, proxy
from tests.seaweed import Seaweed
from tests.treeutil import manifest

pytestmark = [needs_root(), needs_tools("fusermount3"), pytest.mark.root]
MiB = 1 << 20


def test_mount_on_s3_reads_every_byte_and_unmounts_cleanly(cli: Cli, seaweed: Seaweed, s3env: dict[str, str],
                                                           tmp_path: Path) -> None:
    bucket = seaweed.new_bucket()
    with proxy(seaweed.s3_port) as s3proxy:  # counts what the mount reads from the store
        _mount_and_read(cli, seaweed, s3proxy, bucket, s3proxy.url(bucket, "repo"), tmp_path)


def _mount_and_read(cli: Cli, seaweed: Seaweed, s3proxy: Proxy, bucket: str, url: str, tmp_path: Path) -> None:
    cli.env.update(seaweed.env(), DELTAVAULT_REPOSITORY=url)
    init_small_packs(url, cli.password_file)  # 1 MiB packs: the big file spans several
    rnd = random.Random(17)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    small, big = b"a small file\n", rnd.randbytes(5 * MiB + 4321)  # incompressible
    (src / "small.txt").write_bytes(small)
    (src / "sub" / "big.bin").write_bytes(big)
    b = cli("--json", "backup", str(src))
    assert b.returncode == 0, b.stderr
    sid = b.last("summary")["snapshot"]
    packs = [o["Key"] for o in seaweed.client().list_objects_v2(Bucket=bucket, Prefix="repo/data/")["Contents"]]
    assert len(packs) >= 5, packs
    mnt = tmp_path / "mnt"
    before = s3proxy.snapshot()
    with mount_daemon(cli, mnt) as d:
        names = os.listdir(mnt / "snapshots")
        snaps = [n for n in names if n != "latest"]
        assert len(snaps) == 1 and sid.startswith(snaps[0].rpartition("_")[2]), (names, sid)
        root = mnt / "snapshots" / snaps[0] / "src"
        assert sorted(os.listdir(root)) == ["small.txt", "sub"]
        assert (root / "small.txt").read_bytes() == small
        assert (root / "sub" / "big.bin").read_bytes() == big
        fd = os.open(root / "sub" / "big.bin", os.O_RDONLY)
        try:  # ranges across the 1 MiB pack boundaries, in random order
            for _ in range(200):
                off = rnd.randrange(0, len(big))
                n = rnd.choice((1, 4096, 100_000, MiB + 17, 3 * MiB))
                assert os.pread(fd, n, off) == big[off:off + n], (off, n)
        finally:
            os.close(fd)
        assert manifest(mnt / "snapshots" / "latest" / "src") == manifest(src)
        assert s3proxy.snapshot().since(before).received > len(big)  # the data came from S3
        leave_by_signal(d, mnt, signal.SIGINT)
    assert leftovers() == []
    # The mount's lock went with it: an exclusive command runs; the repository checks clean.
    r = cli("--json", "prune")
    assert r.returncode == 0, r.stdout + r.stderr
    c = cli("check", "--read-data")
    assert c.returncode == 0, c.stdout + c.stderr
