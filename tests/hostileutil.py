"""Helpers for the tests of hostile trees (backup sources, restore targets, sync
destinations): the real CLI under a file limit, deep trees made fd by fd, bind mounts.
The ``shared_dir`` fixture (tests/conftest.py) gives a directory another user can reach."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from deltavault.model.nodes import Node, NodeType, Tree
from deltavault.model.snapshot import Snapshot
from deltavault.model.types import BlobType
from deltavault.repository.repository import Repository
from deltavault.testing.hostile import NOBODY
from tests.conftest import Cli

PATH_MAX = 4096


def deltavault(cli: Cli, *args: str, nofile: int | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI; ``nofile`` caps its open files (soft and hard limit)."""
    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    return subprocess.run([sys.executable, "-m", "deltavault", "--json", *args], env=env or cli.env,
                          capture_output=True, text=True, timeout=1800, preexec_fn=limit)


def stored_files(root: Path) -> dict[str, bytes]:
    """Every file under a repository's directory, with its bytes: compared before and after a
    command that must change nothing in a store."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def lines(out: str, kind: str) -> list[dict]:
    return [o for o in (json.loads(x) for x in out.splitlines() if x.startswith("{")) if o.get("type") == kind]


def make_deep(root: Path, depth: int, leaf: bytes) -> bytes:
    """``depth`` nested directories "d" under ``root`` (made fd by fd: the path is longer
    than PATH_MAX) and a file "leaf" at the bottom; returns the leaf's path below root."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir(b"d", dir_fd=fd)
        nfd = os.open(b"d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        os.close(fd)
        fd = nfd
    f = os.open(b"leaf", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
    os.write(f, leaf)
    os.close(f)
    os.close(fd)
    return b"d/" * depth + b"leaf"


@contextlib.contextmanager
def bind(what: Path, where: Path) -> Iterator[None]:
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", str(what), str(where)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def secret_tree(src: Path) -> Path:
    """``src``/private (0750) holding a 0640 file "secret": what a user must not read."""
    (src / "private").mkdir(parents=True)
    secret = src / "private" / "secret"
    secret.write_bytes(b"top secret\n")
    secret.chmod(0o640)
    (src / "private").chmod(0o750)
    src.chmod(0o755)
    return secret


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    """``cmd`` run as user nobody (setpriv)."""
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
                          capture_output=True, text=True, timeout=60)


def fork_as_nobody(child: Callable[[], None]) -> int:
    """A forked process of user nobody that runs ``child`` (exit 0; 1 if it raised; or the
    status ``child`` exits with itself); its pid."""
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            child()
            os._exit(0)
        finally:
            os._exit(1)
    return pid


def plant_acl_dir(path: Path) -> None:
    """User nobody makes the directory ``path``, with an ACL and a default ACL giving them all."""
    p = as_nobody("sh", "-c", f"mkdir '{path}' && setfacl -m u:nobody:rwx '{path}' "
                              f"&& setfacl -d -m u:nobody:rwx '{path}'")
    assert p.returncode == 0, p.stderr


def acl_names(path: Path) -> list[str]:
    return [x for x in os.listxattr(path) if x.startswith("system.posix_acl")]


def before_call(monkeypatch: pytest.MonkeyPatch, module: object, func: str, name: bytes,
                action: Callable[[], None]) -> None:
    """Run ``action`` once, right before ``module.func(dir_fd, name)`` is called for the entry
    ``name``: a change made by a racing writer at a known point (after the walk's lstat of
    that entry, before the open the wrapped function makes), with no timing."""
    real = getattr(module, func)
    pending = [action]

    def wrapped(dir_fd: int, fsname: bytes) -> int:
        if fsname == name and pending:
            pending.pop()()
        return int(real(dir_fd, fsname))

    monkeypatch.setattr(module, func, wrapped)


def one_dir_snapshot(repo: Repository, nodes: list[Node]) -> bytes:
    """A snapshot of one directory "src" (0777) holding ``nodes``; its root tree's id."""
    sub, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(Tree(sorted(nodes, key=lambda n: n.name))))
    root, _ = repo.save_blob(BlobType.TREE, msgspec.msgpack.encode(
        Tree([Node(name=b"src", type=NodeType.DIR, mode=0o777, subtree=sub)])))
    repo.flush()
    repo.save_snapshot(Snapshot(time="2026-01-01T00:00:00Z", time_ns=1, hostname="h", paths=["/src"],
                                source_id="h:/src", tree=root))
    return root
