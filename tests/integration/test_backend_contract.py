"""The backend contract (deltavault.testing.contract), run unchanged against every backend:
the in-memory one, the fault wrapper with no fault armed, the local directory, SFTP
against a real OpenSSH server and S3 against a real SeaweedFS, both started by the tests."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from deltavault.backends import open_backend
from deltavault.backends.base import Backend
from deltavault.testing.contract import (
    BackendContract,
    CrashContract,
    FullDiskContract,
    StreamingPutContract,
)
from deltavault.testing.faulty import FaultyBackend
from deltavault.testing.memory import MemoryBackend
from tests.conftest import needs_root
from tests.loopdev import mounted
from tests.seaweed import Seaweed
from tests.sshd import Server, missing_tools, sshd

_n = itertools.count()


class TestMemory(BackendContract):
    @pytest.fixture
    def new_backend(self) -> Callable[[], Backend]:
        return lambda: MemoryBackend(f"m{next(_n)}")


class TestFaultyWithoutFaults(BackendContract):
    @pytest.fixture
    def new_backend(self) -> Callable[[], Backend]:
        return lambda: FaultyBackend(MemoryBackend(f"f{next(_n)}"))


class TestFaultyOverLocal(StreamingPutContract):
    """The fault wrapper hands a put_file on as one (fault tests then run the inner backend's
    streaming path, not a whole-object put)."""

    @pytest.fixture
    def new_backend(self, tmp_path: Path) -> Callable[[], Backend]:
        return lambda: FaultyBackend(open_backend(str(tmp_path / f"repo{next(_n)}")))


class TestLocal(BackendContract, CrashContract, FullDiskContract, StreamingPutContract):
    @pytest.fixture
    def new_backend(self, tmp_path: Path) -> Callable[[], Backend]:
        return lambda: open_backend(str(tmp_path / f"repo{next(_n)}"))

    @pytest.fixture
    def backend_env(self) -> dict[str, str]:
        return {}

    @pytest.fixture
    def full_backend(self, tmp_path: Path) -> Iterator[Backend]:
        if os.geteuid() != 0:
            pytest.skip("needs root (mounts a small tmpfs)")
        disk = tmp_path / "disk"
        disk.mkdir()
        with mounted("tmpfs", disk, "-t", "tmpfs", "-o", "size=1m"):
            yield open_backend(str(disk / "repo"))


@pytest.mark.skipif(missing_tools() is not None, reason=missing_tools() or "")
class TestSftp(BackendContract, CrashContract, FullDiskContract, StreamingPutContract):
    @pytest.fixture
    def server(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
        with sshd(tmp_path) as srv:
            monkeypatch.setenv("DELTAVAULT_SSH_CONFIG", str(srv.ssh_config))
            yield srv

    @pytest.fixture
    def new_backend(self, server: Server, tmp_path: Path) -> Callable[[], Backend]:
        return lambda: open_backend(server.url(tmp_path / f"remote{next(_n)}"))

    @pytest.fixture
    def backend_env(self, server: Server) -> dict[str, str]:
        return {"DELTAVAULT_SSH_CONFIG": str(server.ssh_config)}

    @pytest.fixture
    def full_backend(self, server: Server, tmp_path: Path) -> Iterator[Backend]:
        if os.geteuid() != 0:
            pytest.skip("needs root (mounts a small tmpfs as the server's disk)")
        disk = tmp_path / "serverdisk"
        disk.mkdir()
        with mounted("tmpfs", disk, "-t", "tmpfs", "-o", "size=1m"):
            yield open_backend(server.url(disk / "repo"))


class TestS3(BackendContract, CrashContract, StreamingPutContract):
    """SeaweedFS, one bucket per test class run, a fresh prefix per backend. A full disk
    cannot be arranged on an object store here (no FullDiskContract)."""

    @pytest.fixture
    def new_backend(self, seaweed: Seaweed, s3env: dict[str, str]) -> Callable[[], Backend]:
        bucket = seaweed.new_bucket()
        return lambda: open_backend(seaweed.url(bucket, f"repo{next(_n)}"))

    @pytest.fixture
    def backend_env(self, s3env: dict[str, str]) -> dict[str, str]:
        return s3env


def test_every_contract_test_runs_for_every_backend() -> None:
    """A contract test added to the kit runs for each backend here (no class misses one)."""
    wanted = {n for n in dir(BackendContract) if n.startswith("test_")}
    for cls in (TestMemory, TestFaultyWithoutFaults, TestLocal, TestSftp, TestS3):
        assert wanted <= {n for n in dir(cls) if n.startswith("test_")}
    assert needs_root  # the module's root tests mount tmpfs; they run here as root
