"""Shared fixtures: repositories, the real CLI, and requirements (root, tools)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

from deltavault.backends.local import LocalBackend
from deltavault.repository.repository import Repository
from tests.memlimit import MemoryLimit
from tests.seaweed import Seaweed
from tests.sshd import Server, sshd
from tests.treeutil import remove_tree

# CI replays the same examples every run, so a red run is reproducible and caused by the change
# under test; `make fuzz` explores with fresh random examples (DELTAVAULT_HYPOTHESIS=explore).
# No deadline: a 2-core machine under load may pause any example past 200 ms (a red run for nothing).
settings.register_profile("ci", derandomize=True, database=None, deadline=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("DELTAVAULT_HYPOTHESIS", "ci"))

FAST_SCRYPT = (2**10, 8, 1)
PASSWORD = b"test password"


# pytest removes the directories of runs before the last two with shutil.rmtree, which
# recurses (Python 3.11) and fails on the trees thousands deep that the hostile tests make
# (each test removes its own; a killed run cannot). Its clean-up runs when the first test
# asks for a temporary directory and again at exit: both get room to recurse here, while
# the tests themselves keep the default limit (some show that our code does not recurse).
DEEP_CLEANUP_LIMIT = 60_000


def pytest_sessionstart(session: pytest.Session) -> None:
    # Started in the background by a shell (`make test &`, nohup), the suite inherits SIGINT
    # ignored, and so would every CLI it starts: the tests that interrupt a run with SIGINT
    # would see it finish instead. A program keeps an ignored SIGINT (that is right for
    # background jobs), so the suite gives its children the default back.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is None:
        return
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, DEEP_CLEANUP_LIMIT))
    try:
        factory.getbasetemp()
    finally:
        sys.setrecursionlimit(limit)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    sys.setrecursionlimit(max(sys.getrecursionlimit(), DEEP_CLEANUP_LIMIT))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> object:
    # tmp_path of a passed test is removed at its teardown (retention policy "failed");
    # shutil.rmtree recurses once per level, and some tests build trees deeper than the
    # default limit. Raised only here, so the code under test still meets the default.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, DEEP_CLEANUP_LIMIT))
    try:
        return (yield)
    finally:
        sys.setrecursionlimit(limit)



def needs_root() -> pytest.MarkDecorator:
    return pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices, mounts, chown)")


def needs_tools(*tools: str) -> pytest.MarkDecorator:
    missing = [t for t in tools if shutil.which(t) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)} "
                              "(scripts/install-system-deps.sh installs it)")


@pytest.fixture
def cache_root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def make_repo(tmp_path: Path, cache_root: Path) -> Callable[..., Repository]:
    """Create a fresh repository (fast KDF); call again with the same name to reopen it."""

    def factory(name: str = "repo", *, encrypted: bool = True, reopen: bool = False, **kw: object) -> Repository:
        backend = LocalBackend(tmp_path / name, fsync=False)
        if reopen:
            return Repository.open(backend, lambda: PASSWORD, cache_root=cache_root, unencrypted=not encrypted)
        return Repository.init(backend, PASSWORD if encrypted else None, scrypt=FAST_SCRYPT,
                               cache_root=cache_root, **kw)  # type: ignore[arg-type]

    return factory


@pytest.fixture
def repo(make_repo: Callable[..., Repository]) -> Repository:
    return make_repo()


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def json(self) -> list[dict]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]

    def last(self, type_: str) -> dict:
        items = [o for o in self.json if o.get("type") == type_]
        assert items, f"no {type_!r} line in output:\n{self.stdout}\n{self.stderr}"
        return items[-1]


@dataclass
class Cli:
    repo: Path
    cache: Path
    password_file: Path
    env: dict[str, str]
    memory: MemoryLimit | None = None  # set in modules marked memory_limit
    # Global options given before every command (``--insecure-no-encryption`` for a test's
    # unencrypted repository).
    options: tuple[str, ...] = ()

    def __call__(self, *args: str, input: str | None = None, env: dict[str, str] | None = None,
                 timeout: float = 600) -> CliResult:
        e = dict(self.env)
        if env:
            e.update(env)
        argv = [sys.executable, "-m", "deltavault", *self.options, *args]
        if self.memory is not None:
            p = self.memory.run(argv, env=e, input=input, text=True, timeout=timeout)
        else:
            p = subprocess.run(argv, env=e, input=input, capture_output=True, text=True, timeout=timeout)
        return CliResult(p.returncode, p.stdout, p.stderr)


@pytest.fixture(scope="session")
def memory_limit(pytestconfig: pytest.Config) -> Iterator[MemoryLimit]:
    """The memory limit deltavault's processes run under in the crash and corruption tests
    (tests/memlimit.py); reported at the end of the run."""
    m = MemoryLimit.for_session()
    pytestconfig.stash[MEMORY_LIMIT] = m
    try:
        yield m
    finally:
        m.close()


MEMORY_LIMIT = pytest.StashKey[MemoryLimit]()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    m = config.stash.get(MEMORY_LIMIT, None)
    if m is None:
        return
    terminalreporter.write_line(m.describe())
    for test, peak in sorted(m.peaks.items()):
        terminalreporter.write_line(f"  {test}: largest peak {peak.bytes / 2**20:.1f} MiB ({peak.command})")


@pytest.fixture(autouse=True)
def host_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test is a host of its own: its host secret (fs/hostsecret.py) under its own
    XDG_CONFIG_HOME, never the user's running the tests."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config"


@pytest.fixture
def cli(tmp_path: Path, request: pytest.FixtureRequest, host_config: Path) -> Iterator[Cli]:
    pw = tmp_path / "password"
    pw.write_text(PASSWORD.decode() + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELTAVAULT_")}
    env.update(DELTAVAULT_REPOSITORY=str(tmp_path / "clirepo"), DELTAVAULT_PASSWORD_FILE=str(pw),
               DELTAVAULT_CACHE_DIR=str(tmp_path / "clicache"), XDG_CONFIG_HOME=str(host_config))
    memory = request.getfixturevalue("memory_limit") if request.node.get_closest_marker("memory_limit") else None
    yield Cli(tmp_path / "clirepo", tmp_path / "clicache", pw, env, memory)


def init_small_packs(location: Path | str, password_file: Path | None = None) -> None:
    """Create a repository with 1 MiB packs (below what `init --pack-size` accepts), so a
    test makes many packs from a little data; the CLI then opens it as any other.
    ``location``: a directory, or a repository URL (s3:..., with its settings in the environment)."""
    from deltavault.backends import open_backend

    pw = password_file.read_bytes().rstrip(b"\r\n") if password_file is not None else PASSWORD
    backend = LocalBackend(location, fsync=False) if isinstance(location, Path) else open_backend(location)
    Repository.init(backend, pw, pack_size=1024 * 1024, scrypt=FAST_SCRYPT)


def init_and_back_up(cli: Cli, src: Path, files: dict[str, bytes], *, settle: bool = False) -> None:
    """init a repository, write ``files`` under ``src`` and back it up once. ``settle``
    waits out the racy window (files.RACY_NS), so the next run trusts the files' stat data."""
    assert cli("init").returncode == 0
    src.mkdir()
    for name, data in files.items():
        (src / name).write_bytes(data)
    if settle:
        time.sleep(2.1)
    r = cli("backup", str(src))
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seaweed]:
    """One real SeaweedFS (tests/seaweed.py) for the whole run; tests take their own bucket
    or prefix. Started on first use only."""
    from tests.seaweed import server

    with server(tmp_path_factory.mktemp("seaweed")) as sw:
        yield sw


@pytest.fixture
def s3env(seaweed: Seaweed, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The server's credentials in this process's environment (the AWS chain reads them)."""
    env = seaweed.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CA_BUNDLE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    return env


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    """A real sshd on 127.0.0.1 (tests/sshd.py), its client configuration in force."""
    with sshd(tmp_path) as srv:
        monkeypatch.setenv("DELTAVAULT_SSH_CONFIG", str(srv.ssh_config))
        yield srv


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory user nobody can reach (pytest's own tmp root is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="dv-hostile-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        remove_tree(d)


def on_a_terminal(cli: Cli, *args: str) -> tuple[int, str]:
    """Run the CLI on a pseudo-terminal; its exit code and what it showed, escapes removed."""
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "deltavault", *args], env=dict(cli.env, COLUMNS="160"),
                         stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    out = b""
    while True:
        r, _, _ = select.select([master], [], [], 60)
        if not r:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    p.wait(timeout=120)
    os.close(master)
    return p.returncode, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.decode(errors="replace"))
