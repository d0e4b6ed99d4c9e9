"""Property: random trees with metadata -> push to a real sshd -> random changes -> push
again with --delete -> the mirror equals the source each time (content, holes, modes,
owners, ns mtimes, xattrs, symlinks, hard links, FIFOs). A low --delta-min sends changed
files by remote delta, in page mode (same size) and in content-defined mode."""

from __future__ import annotations

import os
import random
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deltavault.sync.options import SyncOptions
from deltavault.sync.push import PushSyncer
from deltavault.sync.ssh import RemotePath
from tests.conftest import needs_root
from tests.integration.test_roundtrip_property import build, change, entry, mutate
from tests.sshd import Server, missing_tools, sshd
from tests.treeutil import manifest

pytestmark = [needs_root(), pytest.mark.root,
              pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")]

AGENT = f"{sys.executable} -m deltavault sync-agent"


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


def push(src: Path, dst: Path, *, checksum: bool = False) -> None:
    opts = SyncOptions(delete=True, xattrs=True, checksum=checksum, delta_min=64 * 1024)
    r = PushSyncer(src, RemotePath("dvtest", str(dst)), opts, agent=AGENT).run()
    assert not r.problems, r.problems
    assert manifest(dst) == manifest(src)


@settings(max_examples=int(os.environ.get("DELTAVAULT_PROPERTY_EXAMPLES_REMOTE", "25")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(entries=st.lists(entry, min_size=1, max_size=25), changes=st.lists(change, max_size=8),
       seed=st.integers(0, 2**32 - 1))
def test_push_change_push_roundtrip(server: Server, entries: list, changes: list, seed: int) -> None:
    rnd = random.Random(seed)
    with tempfile.TemporaryDirectory() as td:
        src, dst = Path(td) / "src", Path(td) / "mirror"
        build(src, entries, rnd)
        push(src, dst)
        mutate(src, changes, rnd)
        # A change that keeps size and mtime is found by content only, as with rsync.
        push(src, dst, checksum=any(op == "same-size-same-mtime" for op, _p, _s in changes))
