"""deltavault key: list, add and remove passwords; change the current one."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from deltavault.backends.s3errors import ObjectRetained
from deltavault.cli.common import Context, read_password, read_secret, require_password
from deltavault.errors import TargetError, UsageError
from deltavault.fs.paths import one_line, shown
from deltavault.repository import keyring


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("key", help="manage passwords: list, add, remove, passwd; export and import the master key")
    p.add_argument("action", choices=["list", "add", "remove", "passwd", "export", "import"],
                   help="list keys; add a password; remove a key by id; change the password in use; export "
                        "the master key (wrapped by a password) for safe keeping; import such an export")
    p.add_argument("id", nargs="?", help="with remove: the key id (or a unique prefix); with import: the file")
    p.add_argument("-o", "--output", metavar="FILE", help="with export: write to FILE (default stdout)")
    p.add_argument("--new-password-file", metavar="FILE",
                   help="file holding the new password (env DELTAVAULT_NEW_PASSWORD_FILE; "
                        "on a terminal it is asked for); with export: a password for the export alone")
    p.set_defaults(func=run)


def _new_password(a: argparse.Namespace) -> bytes:
    return read_secret(None, a.new_password_file or os.environ.get("DELTAVAULT_NEW_PASSWORD_FILE"),
                       what="new password", prompt="new password: ", confirm=True,
                       hint="use --new-password-file or DELTAVAULT_NEW_PASSWORD_FILE")


def run(ctx: Context) -> int:
    a = ctx.args
    if a.action not in ("remove", "import") and a.id:
        raise UsageError(f"key {a.action} takes no key id")
    if a.action == "remove" and not a.id:
        raise UsageError("key remove needs the id of the key to remove (see key list)")
    if a.action == "import":
        return _import(ctx)
    new_pw = _new_password(a) if a.action in ("add", "passwd") else b""
    if a.action == "export":
        return _export(ctx)
    repo = ctx.open_repo(use_cache=False)
    if a.action == "list":
        keys = keyring.list_keys(repo)
        for k in keys:
            ctx.result({"type": "key", "id": k.name.removeprefix("keys/"), "current": k.current,
                      "created": k.created, "hostname": k.hostname, "problem": k.problem},
                     f"{'*' if k.current else ' '} {k.short}  {shown(k.created) or '?':20}  {shown(k.hostname) or '?'}"
                     + (f"  DAMAGED: {one_line(k.problem)}" if k.problem else ""))  # a key file's strings: anyone's
        ctx.result(None, f"{len(keys)} key(s); * marks the one that opened the repository")
    elif a.action == "add":
        name = keyring.add_key(repo, new_pw)
        ctx.emit({"type": "key_added", "id": name.removeprefix("keys/")},
                 f"added key {keyring.KeyInfo(name).short}: the new password opens the repository too")
    elif a.action == "remove":
        name = keyring.remove_key(repo, a.id)
        ctx.emit({"type": "key_removed", "id": name.removeprefix("keys/")},
                 f"removed key {keyring.KeyInfo(name).short}")
    else:
        try:
            new, old = keyring.change_password(repo, new_pw)
        except ObjectRetained as exc:
            # The new key is stored; the old one stays until its retention ends.
            ctx.warn(f"the old key file is under Object Lock retention until {exc.until[:16].replace('T', ' ')} "
                     "UTC: the old password still opens the repository until then; remove it with "
                     "'deltavault key remove' after that")
            ctx.emit({"type": "password_changed", "removed": "", "old_key_retained_until": exc.until},
                     "password changed: a key for the new password was added; the old one is kept")
            return 0
        ctx.emit({"type": "password_changed", "id": new.removeprefix("keys/"), "removed": old.removeprefix("keys/")},
                 f"password changed: key {keyring.KeyInfo(new).short} replaces {keyring.KeyInfo(old).short}")
    return 0


def _export(ctx: Context) -> int:
    a = ctx.args
    pw = None
    if a.new_password_file or os.environ.get("DELTAVAULT_NEW_PASSWORD_FILE"):
        pw = require_password(_new_password(a), a, "export's password")
    repo = ctx.open_repo(use_cache=False)
    data = keyring.export_key(repo, repo.config.id, pw)
    if a.output:
        if not write_private(a.output, data + b"\n"):
            raise TargetError(f"cannot write {a.output} (it must not exist yet)")
        ctx.emit({"type": "key_exported", "file": a.output, "repository": repo.config.id},
                 f"exported the master key of repository {repo.config.id[:8]} to {a.output}, wrapped by "
                 + ("the export's password" if pw is not None else "the password in use")
                 + ": keep both safe, apart")
    else:
        out = ctx.binary_stdout()
        out.write(data + b"\n")
        out.flush()
    return 0


def _import(ctx: Context) -> int:
    a = ctx.args
    if not a.id:
        raise UsageError("key import needs the file an export wrote: deltavault key import FILE")
    try:
        data = Path(a.id).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {a.id}: {exc.strerror or exc}") from exc
    name = keyring.import_key(ctx.backend(), data, read_password(a))
    ctx.emit({"type": "key_imported", "id": name.removeprefix("keys/")},
             f"imported key {keyring.KeyInfo(name).short}: its password opens the repository")
    return 0


def write_private(path: str, data: bytes) -> bool:
    """Write a new file only its owner can read; False if it exists or cannot be made."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True
