"""SFTP calls on many threads share one SSH connection, each on a channel of its own. When
the connection dies, each thread whose call was in flight closes it so that the next call
connects again; one that did so after another thread had already connected again closed
that new connection, and the calls on it failed in turn. And a call in flight when another
thread closed the dead connection failed with paramiko's "Socket is closed", taken for the
server's own refusal: not retried, it failed the run."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from deltavault.backends.sftp import SFTPBackend
from deltavault.backends.ssh import parse_location
from deltavault.errors import BackendError
from tests.sshd import Server, missing_tools

pytestmark = pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")


def test_a_call_that_outlived_its_connection_leaves_the_new_one_open(server: Server, tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    b = SFTPBackend(parse_location(server.url(tmp_path / "r")))
    b.put("a", b"1")
    has_channel, reconnected = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def in_flight(s: Any) -> None:  # a call under way when the connection dies
        has_channel.set()
        reconnected.wait()
        s.stat(str(tmp_path / "r" / "a"))

    def worker() -> None:
        try:
            b._call("stat", in_flight)
        except BackendError as exc:
            failed.append(exc)

    t = threading.Thread(target=worker)
    t.start()
    has_channel.wait()
    server.kill_sessions()
    for _ in range(100):  # this thread connects again (its first call may meet the dead one)
        try:
            assert b.get("a") == b"1"
            break
        except BackendError:
            continue
    client = b._client
    reconnected.set()
    t.join()
    # The call in flight failed with the connection it was on, as a lost connection (one
    # a retry cures), not as the server's refusal ("Socket is closed" was taken for one).
    assert len(failed) == 1 and isinstance(failed[0], BackendError) and failed[0].retryable, failed
    assert b._client is client and client is not None  # before: closed by that failure
    assert b.get("a") == b"1"
    b.close()
