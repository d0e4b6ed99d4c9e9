"""Property: random trees with metadata -> push to (or pull from) a real sshd -> random
changes -> the same again with --delete -> the mirror equals the source each time (content, holes, modes,
owners, ns mtimes, xattrs, symlinks, hard links, FIFOs). A low --delta-min sends changed
files by remote delta, in page mode (same size) and in content-defined mode."""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltavault.sync.options import SyncOptions
from deltavault.sync.pull import PullSyncer
from deltavault.sync.push import PushSyncer
from deltavault.sync.ssh import RemotePath
from tests.conftest import needs_root
from tests.integration.sync.conftest import REMOTE
from tests.integration.test_roundtrip_property import build, change, entry, mutate
from tests.sshd import Server, missing_tools, sshd
from tests.treeutil import manifest

pytestmark = [needs_root(), pytest.mark.root,
              pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")]



@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with sshd(tmp_path_factory.mktemp("remote-property")) as srv:
        old = os.environ.get("DELTAVAULT_SSH_CONFIG")
        os.environ["DELTAVAULT_SSH_CONFIG"] = str(srv.ssh_config)
        try:
            yield srv
        finally:
            if old is None:
                del os.environ["DELTAVAULT_SSH_CONFIG"]
            else:
                os.environ["DELTAVAULT_SSH_CONFIG"] = old


def mirror(src: Path, dst: Path, direction: str, *, checksum: bool = False) -> None:
    opts = SyncOptions(delete=True, xattrs=True, checksum=checksum, delta_min=64 * 1024)
    if direction == "push":
        r = PushSyncer(src, RemotePath("dvtest", str(dst)), opts, remote=REMOTE).run()
    else:
        r = PullSyncer(RemotePath("dvtest", str(src)), dst, opts, remote=REMOTE).run()
    assert not r.problems, r.problems
    assert manifest(dst) == manifest(src)


@settings(max_examples=int(os.environ.get("DELTAVAULT_PROPERTY_EXAMPLES_REMOTE", "25")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(entries=st.lists(entry, min_size=1, max_size=25), changes=st.lists(change, max_size=8),
       seed=st.integers(0, 2**32 - 1), direction=st.sampled_from(["push", "pull"]))
def test_sync_change_sync_roundtrip(server: Server, entries: list, changes: list, seed: int, direction: str) -> None:
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as td:
        src, dst = Path(td) / "src", Path(td) / "mirror"
        build(src, entries, rnd)
        mirror(src, dst, direction)
        mutate(src, changes, rnd)
        # A change that keeps size and mtime is found by content only, as with rsync.
        mirror(src, dst, direction, checksum=any(op == "same-size-same-mtime" for op, _p, _s in changes))
