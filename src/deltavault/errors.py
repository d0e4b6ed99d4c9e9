"""Typed errors. Each carries the process exit code and whether a retry may help.

Exit codes are part of the CLI contract (docs/user-guide.md lists them).
"""

from __future__ import annotations

import errno
from enum import IntEnum

# errno values that mean "the disk is full" (a quota counts): NoSpace, not a generic error.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class ExitCode(IntEnum):
    OK = 0
    FATAL = 1
    USAGE = 2
    PARTIAL = 3  # finished, but some files could not be read or written
    # 10, 11 and 12 mean what they mean in restic (docs/switching.md), so scripts ported
    # from it read them right.
    REPO_NOT_FOUND = 10
    LOCKED = 11
    WRONG_PASSWORD = 12
    CORRUPT = 13
    NO_SPACE = 14
    BACKEND = 15  # the store failing after retries, or answering what a store does not (it lies)
    SOURCE = 16  # the source (volume, snapshot, change source) is unusable
    TARGET = 17  # the restore target or sync destination cannot be created or opened
    UNAVAILABLE = 18  # this machine lacks what the command needs (FUSE, a file-system driver, qemu-nbd)
    # The store refused us, or could not be reached: bad input (the user's credentials, address
    # or clock), each with a code of its own so a script can say which to fix.
    ACCESS_REFUSED = 19  # credentials or permission refused (S3 keys, AccessDenied; SSH login)
    UNREACHABLE = 20  # no such host, connection refused or timed out (after the retries); TLS or host key not trusted
    CLOCK_SKEW = 21  # the store says this machine's clock is wrong (RequestTimeTooSkewed)
    INTERRUPTED = 130


class DeltavaultError(Exception):
    """Base of all expected failures. Anything else is a bug."""

    exit_code: ExitCode = ExitCode.FATAL
    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class UsageError(DeltavaultError):
    exit_code = ExitCode.USAGE


class RepositoryNotFound(DeltavaultError):
    exit_code = ExitCode.REPO_NOT_FOUND


class RepositoryExists(DeltavaultError):
    exit_code = ExitCode.FATAL


class WrongPassword(DeltavaultError):
    exit_code = ExitCode.WRONG_PASSWORD


class KeyFileDamaged(DeltavaultError):
    """The key file fails its own checksum: tampering or corruption, not a wrong password."""

    exit_code = ExitCode.CORRUPT


class RepositoryLocked(DeltavaultError):
    exit_code = ExitCode.LOCKED
    retryable = True


class CorruptionError(DeltavaultError):
    """Stored data fails authentication, a hash check or parsing."""

    exit_code = ExitCode.CORRUPT


class FormatError(CorruptionError):
    """A stored object could not be parsed: truncated, wrong magic, bad field."""


class Undecodable(FormatError):
    """Bytes that are not msgpack or JSON of the type asked for (framing.decode_*); callers
    name what they were decoding."""


class UnsupportedVersion(DeltavaultError):
    exit_code = ExitCode.FATAL


class BackendError(DeltavaultError):
    exit_code = ExitCode.BACKEND
    retryable = True


class AccessRefused(BackendError):
    """The store refused the credentials, the login or the operation: retrying cannot help."""

    exit_code = ExitCode.ACCESS_REFUSED
    retryable = False
    lock_record = False  # what was refused was writing a lock record: a reader may go without


class Unreachable(BackendError):
    """The store could not be reached (no such host, connection refused or timed out: retried,
    it may come back), or it could not be verified as the store (a TLS certificate or an SSH
    host key not trusted: not retried)."""

    exit_code = ExitCode.UNREACHABLE


class ClockSkew(BackendError):
    """The store refuses requests signed with this machine's time: set the clock."""

    exit_code = ExitCode.CLOCK_SKEW
    retryable = False


class ObjectNotFound(BackendError):
    retryable = False


class ObjectTooLarge(BackendError):
    """The store answered an object larger than any of its kind can be (backends/limits.py):
    refused before it is read whole, as a store that lies (exit 15), never retried."""

    retryable = False


def is_damage(exc: DeltavaultError) -> bool:
    """Whether ``exc`` says the stored data is damaged or missing (exit 13 where a command
    carries on past it), rather than that the store failed or lied (any other backend
    error, exit 15: an answer at another offset than asked is not damage, the data may be
    whole, and retries are already spent)."""
    return not isinstance(exc, BackendError) or isinstance(exc, ObjectNotFound)


class NoSpace(BackendError):
    """The target is full. Whatever was written before stays valid."""

    exit_code = ExitCode.NO_SPACE
    retryable = False


class SourceError(DeltavaultError):
    exit_code = ExitCode.SOURCE


class TargetError(DeltavaultError):
    exit_code = ExitCode.TARGET


class Unavailable(DeltavaultError):
    """A facility of this machine the command needs is missing: not the user's input, not
    the repository; the same command works on a machine that has it."""

    exit_code = ExitCode.UNAVAILABLE


class HostSecretError(DeltavaultError):
    """This host's secret (fs/hostsecret.py) cannot be kept safely: its directory is not this
    user's alone, or the file cannot be made. The user's setup to fix, as a bad option is;
    a backup carries on without it (repository/hosttag.py), reading every file."""

    exit_code = ExitCode.USAGE


class SnapshotError(SourceError):
    """A point-in-time snapshot could not be created or removed."""
