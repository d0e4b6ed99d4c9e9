"""deltavault key: list, add and remove passwords; change the current one."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from deltavault.backends.s3errors import ObjectRetained
from deltavault.cli.common import Context
from deltavault.errors import UsageError
from deltavault.repository import keyring


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("key", help="manage passwords: list, add, remove, passwd")
    p.add_argument("action", choices=["list", "add", "remove", "passwd"],
                   help="list keys; add a password; remove a key by id; change the password in use")
    p.add_argument("id", nargs="?", help="with remove: the key id (or a unique prefix)")
    p.add_argument("--new-password-file", metavar="FILE",
                   help="file holding the new password (env DELTAVAULT_NEW_PASSWORD_FILE; "
                        "on a terminal it is asked for)")
    p.set_defaults(func=run)


def _new_password(a: argparse.Namespace) -> bytes:
    path = a.new_password_file or os.environ.get("DELTAVAULT_NEW_PASSWORD_FILE")
    if path:
        try:
            return Path(path).read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise UsageError(f"cannot read the new password file {path}: {exc.strerror}") from exc
    if sys.stdin.isatty():
        pw = getpass.getpass("new password: ")
        if getpass.getpass("enter it again: ") != pw:
            raise UsageError("the passwords do not match")
        return pw.encode()
    raise UsageError("no new password: use --new-password-file or DELTAVAULT_NEW_PASSWORD_FILE, "
                     "or run on a terminal to be asked")


def run(ctx: Context) -> int:
    a = ctx.args
    if a.action != "remove" and a.id:
        raise UsageError(f"key {a.action} takes no key id")
    if a.action == "remove" and not a.id:
        raise UsageError("key remove needs the id of the key to remove (see key list)")
    new_pw = _new_password(a) if a.action in ("add", "passwd") else b""
    repo = ctx.open_repo(use_cache=False)
    if a.action == "list":
        keys = keyring.list_keys(repo)
        for k in keys:
            ctx.emit({"type": "key", "id": k.name.removeprefix("keys/"), "current": k.current,
                      "created": k.created, "hostname": k.hostname, "problem": k.problem},
                     f"{'*' if k.current else ' '} {k.short}  {k.created or '?':20}  {k.hostname or '?'}"
                     + (f"  DAMAGED: {k.problem}" if k.problem else ""))
        ctx.say(f"{len(keys)} key(s); * marks the one that opened the repository")
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
