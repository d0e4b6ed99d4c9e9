"""What every command shares: options, password, opening the repository, output."""

from __future__ import annotations

import argparse
import contextlib
import errno
import getpass
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import msgspec

from deltavault.backends import open_backend
from deltavault.backends.base import Backend
from deltavault.backends.throttle import limited
from deltavault.cli.units import human
from deltavault.errors import AccessRefused, BackendError, UsageError
from deltavault.fs.paths import one_line, shown, terminal
from deltavault.model.snapshot import Snapshot
from deltavault.platform import release_free_memory
from deltavault.progress import Reporter
from deltavault.repository.packcheck import PackCheck
from deltavault.repository.repository import Repository
from deltavault.repository.snapshots import short_id

__all__ = ["Context", "human", "parse_size", "problem_lines", "rate", "read_password", "read_secret",
           "require_password", "when"]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.I)


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 64K, 4MiB, 1G)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


def rate(text: str) -> int:
    """A bandwidth limit in bytes a second: a bare number is KiB/s (as restic reads it),
    else a size per second (``5M`` is 5 MiB/s)."""
    try:
        value = parse_size(text) if not text.strip().isdigit() else int(text) * 1024
    except argparse.ArgumentTypeError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (KiB/s, or e.g. 5M for 5 MiB/s)")
    return value


@dataclass
class Context:
    args: argparse.Namespace
    json: bool
    quiet: bool
    stdout: Any = field(default_factory=lambda: sys.stdout)
    stderr: Any = field(default_factory=lambda: sys.stderr)
    opened: list[Repository] = field(default_factory=list)  # repositories this command opened

    # ------------------------------------------------------------- output
    def emit(self, obj: dict[str, Any], text: str | None = None) -> None:
        """A result: one JSON line in --json mode, else ``text`` (if any)."""
        if self.json:
            self.stdout.write(json.dumps(obj, default=_json_default) + "\n")
            self.stdout.flush()
        elif text is not None and not self.quiet:
            self._text(self.stdout, text)

    def result(self, obj: dict[str, Any] | None, text: str | None = None) -> None:
        """What a command that shows something (snapshots, ls, find, stats...) is run for:
        printed even with -q, which drops only progress and reports of what was done.
        ``obj`` None: nothing in --json mode (a heading or a footer of the text)."""
        if self.json:
            if obj is not None:
                self.emit(obj)
        elif text is not None:
            self._text(self.stdout, text)

    @staticmethod
    def _text(stream: Any, text: str) -> None:
        """Every line of text a command prints goes through here (or ``terminal``): names are
        escaped where they are formatted, and this catches any stored string that was not."""
        stream.write(terminal(text) + ("\n" if not text.endswith("\n") else ""))

    def binary_stdout(self) -> BinaryIO:
        """Standard output for bytes (dump, cat blob)."""
        out: BinaryIO = getattr(self.stdout, "buffer", self.stdout)
        return out

    def say(self, text: str) -> None:
        if not self.json and not self.quiet:
            self._text(self.stdout, text)

    def warn(self, text: str) -> None:
        if self.json:
            self.stdout.write(json.dumps({"type": "warning", "message": text}) + "\n")
        else:
            self._text(self.stderr, f"warning: {one_line(text)}")  # one warning, one line

    def progress_line(self, text: str) -> None:
        """A line of a long command's progress (prune, repair), on stderr; none with --json."""
        if not self.json:
            self._text(self.stderr, one_line(text))  # it may name an object in the storage

    def reporter(self) -> Reporter:
        from deltavault.cli.progress import JsonReporter, QuietReporter

        if self.json:
            return JsonReporter(self.stdout)
        if not self.quiet and self.stderr.isatty():
            from deltavault.cli.progress_rich import RichReporter

            return RichReporter(self.stderr)
        return QuietReporter(self.stderr)

    # ------------------------------------------------------------- repository
    def repo_location(self) -> str:
        loc = self.args.repo or os.environ.get("DELTAVAULT_REPOSITORY")
        if not loc:
            raise UsageError("no repository given: use -r/--repo or set DELTAVAULT_REPOSITORY")
        return str(loc)

    @contextlib.contextmanager
    def read_lock(self, repo: Repository, command: str) -> Iterator[None]:
        """The shared lock of a command that only reads the repository. ``--no-lock``, or a
        repository on a read-only file system, runs it without one: a prune elsewhere could
        then make it fail (blobs are verified as read), never return wrong data."""
        if self.args.no_lock:
            yield
            return
        try:
            lk = repo.lock(command=command, wait=self.args.lock_wait)
        except AccessRefused as exc:
            if not exc.lock_record:
                raise
            # Read-only access (no write permission, read-only S3 keys): only the lock record
            # could not be written, and a reader may go without one.
            raise AccessRefused(f"{exc}; a command that only reads can run with --no-lock") from exc
        except BackendError as exc:
            cause = exc.__cause__
            if not (isinstance(cause, OSError) and cause.errno == errno.EROFS):
                raise
            self.warn("the repository is on a read-only file system: reading without a lock")
            yield
            return
        with lk:
            yield

    def password_source(self, *, confirm: bool = False) -> Callable[[], bytes]:
        return lambda: read_password(self.args, confirm=confirm)

    def backend(self, location: str | None = None) -> Backend:
        """The backend of -r/--repo (or ``location``), held to --limit-upload and
        --limit-download: the one place a command opens a repository's store."""
        loc = location or self.repo_location()
        a = self.args
        if loc.startswith("s3:"):
            from deltavault.backends.s3location import S3Options

            opened = open_backend(loc, s3=S3Options.from_env(ca_bundle=getattr(a, "s3_ca_bundle", None),
                                                             addressing=getattr(a, "s3_addressing", None),
                                                             timeout=getattr(a, "s3_timeout", None)))
        else:
            opened = open_backend(loc)
        return limited(opened, getattr(a, "limit_upload", None), getattr(a, "limit_download", None))

    def cache_root(self) -> Path | None:
        """--cache-dir (or DELTAVAULT_CACHE_DIR), or None for the default place."""
        return Path(self.args.cache_dir) if self.args.cache_dir else None

    def open_repo(self, *, use_cache: bool = True, tolerant: bool = False, location: str | None = None,
                  password: Callable[[], bytes] | None = None, unencrypted: bool | None = None) -> Repository:
        """The repository of -r/--repo, or the one at ``location`` opened with ``password``
        (copy's --from-repo). ``unencrypted``: whether an unencrypted one is meant
        (default: --insecure-no-encryption); otherwise one is refused."""
        backend = self.backend(location)
        if unencrypted is None:
            unencrypted = bool(getattr(self.args, "insecure_no_encryption", False))
        repo = Repository.open(backend, password or self.password_source(), cache_root=self.cache_root(),
                               use_cache=use_cache and not self.args.no_cache, tolerant=tolerant,
                               unencrypted=unencrypted)
        release_free_memory()  # the key derivation's memory (scrypt), freed but still held
        self.opened.append(repo)
        return repo

    @staticmethod
    def snapshot_of_kind(repo: Repository, ref: str, kind: str, hint: str) -> tuple[str, Snapshot]:
        """The snapshot ``ref`` names ('latest' of this ``kind``); a snapshot of the other kind
        is refused with ``hint`` (what to run instead)."""
        sid, snap = repo.resolve_snapshot(ref, kind=kind)
        if (snap.tree if kind == "files" else snap.volume) is None:
            raise UsageError(f"snapshot {short_id(sid)} is a {shown(snap.kind)} snapshot: {hint}")
        return sid, snap

    def save_index_copies(self) -> None:
        """At the end of a command that succeeded: the local index copy of each repository
        it wrote index files to, so the next command's open need not decode them."""
        for repo in self.opened:
            repo.save_index_copy()

    def warn_repository_notes(self) -> None:
        """What any command on a repository must say once, at the end: a local cache it did
        not use (another user could write there) and snapshots it passed over because they
        cannot be read (a damaged old snapshot does not stop the others)."""
        for repo in self.opened:
            if repo.cache_note is not None:
                self.warn(repo.cache_note[1])
            for sid, why in sorted(repo.damaged_snapshots.items()):
                self.warn(f"snapshot {short_id(sid)} cannot be read and was left out ({why}); "
                          "run 'deltavault check' and 'deltavault repair'")


def read_password(args: argparse.Namespace, *, confirm: bool = False) -> bytes:
    if getattr(args, "insecure_no_password", False):
        return b""
    return read_secret("DELTAVAULT_PASSWORD", getattr(args, "password_file", None) or
                       os.environ.get("DELTAVAULT_PASSWORD_FILE"), what="password", prompt="repository password: ",
                       confirm=confirm, hint="set DELTAVAULT_PASSWORD_FILE (or --password-file, or "
                                             "DELTAVAULT_PASSWORD)")


def read_secret(env: str | None, path: str | None, *, what: str, prompt: str, hint: str,
                confirm: bool = False) -> bytes:
    """A password: from the variable ``env``, else the file ``path`` (one line; a trailing
    newline is ignored), else asked on a terminal; else a usage error that gives ``hint``."""
    value = os.environ.get(env) if env else None
    if value is not None:
        return value.encode()
    if path:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise UsageError(f"cannot read the {what} file {path}: {exc.strerror}") from exc
        return data.rstrip(b"\r\n")
    if sys.stdin.isatty():
        pw = getpass.getpass(prompt)
        if confirm and getpass.getpass("enter it again: ") != pw:
            raise UsageError("the passwords do not match")
        return pw.encode()
    raise UsageError(f"no {what}: {hint}, or run on a terminal to be asked")


def require_password(pw: bytes, args: argparse.Namespace, what: str) -> bytes:
    """A new password must not be empty, unless --insecure-no-password says so: an empty
    password file (a mistake in a script) would otherwise leave the key open to anyone."""
    if not pw and not getattr(args, "insecure_no_password", False):
        raise UsageError(f"the {what} is empty; refusing it (use --insecure-no-password to encrypt with "
                         "an empty password on purpose)")
    return pw


def when(snap: Snapshot) -> str:
    """A snapshot's time as listings show it; the stored string, so escaped as names are."""
    return shown(snap.time[:19].replace("T", " "))


class _Problem(Protocol):
    kind: str
    path: str
    message: str


def problem_lines(problems: Iterable[_Problem]) -> list[str]:
    """A run's problems, one line each: a message (an OS error's words, a remote host's) with
    a newline in it cannot add a line that looks like another problem."""
    return [f"  {p.kind}: {one_line(p.path)}: {one_line(p.message)}" for p in problems]


def pack_summary(pc: PackCheck) -> dict[str, int]:
    """A run's account, in its JSON summary, of the packs it found missing or cut short at
    its start and the index entries it dropped for them (repository/packcheck.py)."""
    return {"packs_missing": len(pc.missing), "packs_truncated": len(pc.truncated),
            "index_entries_dropped": pc.dropped}


def _json_default(o: object) -> object:
    if isinstance(o, bytes):
        return o.hex()
    if isinstance(o, msgspec.Struct):  # nested in a stored object (a summary's rejections)
        return msgspec.structs.asdict(o)
    if isinstance(o, set):
        return sorted(o)
    if hasattr(o, "__dict__"):
        return o.__dict__
    return str(o)
