"""deltavault entry point: parse arguments, dispatch, map errors to exit codes."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import io
import json
import pkgutil
import signal
import sys
import traceback
from collections.abc import Sequence
from types import FrameType
from typing import Any

from deltavault import __version__
from deltavault.cli.common import Context, rate
from deltavault.errors import DeltavaultError, ExitCode
from deltavault.fs.paths import terminal
from deltavault.platform import tune_allocator

# Each cli/cmd_NAME.py has register(subparsers); commands are found by module name, so a
# new command is a new module. ORDER only sorts the help listing.
ORDER = ["init", "backup", "snapshots", "restore", "ls", "find", "dump", "diff", "copy", "check", "stats", "report",
         "tag", "rewrite", "forget", "prune", "repair", "unlock", "cache", "sync", "key", "cat"]


def _commands() -> list[str]:
    import deltavault.cli as pkg

    names = [m.name[4:] for m in pkgutil.iter_modules(pkg.__path__) if m.name.startswith("cmd_")]
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def _global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    # On subcommands the defaults are suppressed so a value given before the command survives.
    d: dict[str, Any] = {} if top else {"default": argparse.SUPPRESS}
    p.add_argument("-r", "--repo", help="repository location (env DELTAVAULT_REPOSITORY)", **d)
    p.add_argument("--password-file", help="file holding the password (env DELTAVAULT_PASSWORD_FILE)", **d)
    p.add_argument("--json", action="store_true", help="machine-readable output: JSON lines", **d)
    p.add_argument("-q", "--quiet", action="store_true", help="print only errors", **d)
    p.add_argument("--cache-dir", help="local cache (default ~/.cache/deltavault; env DELTAVAULT_CACHE_DIR)", **d)
    p.add_argument("--no-cache", action="store_true", help="use no local cache (incrementals read trees)", **d)
    p.add_argument("--no-lock", action="store_true",
                   help="restore and check take no lock (a repository you may only read)", **d)
    p.add_argument("--insecure-no-password", action="store_true",
                   help="the repository's password is empty: ask for none (init: create it so)", **d)
    p.add_argument("--insecure-no-encryption", action="store_true",
                   help="the repository is not encrypted: open it all the same (init: create it so); "
                        "without it one is refused, so that a store replaced by an unencrypted one is "
                        "never written to in plain text", **d)
    p.add_argument("--s3-ca-bundle", metavar="PEM",
                   help="S3: trust the CAs in this file (env DELTAVAULT_S3_CA_BUNDLE or AWS_CA_BUNDLE)", **d)
    p.add_argument("--s3-addressing", choices=["auto", "path", "virtual"],
                   help="S3: path-style (host/bucket) or virtual-hosted (bucket.host) requests; default: "
                        "path for an endpoint, virtual on AWS (env DELTAVAULT_S3_ADDRESSING)", **d)
    p.add_argument("--s3-timeout", type=float, metavar="SECONDS",
                   help="S3: give up on a request stalled this long, then retry (default 60; "
                        "env DELTAVAULT_S3_TIMEOUT)", **d)
    p.add_argument("--limit-upload", type=rate, metavar="RATE",
                   help="send at most RATE to the repository or a sync's other host: KiB/s, or with a "
                        "unit (5M = 5 MiB/s)", **d)
    p.add_argument("--limit-download", type=rate, metavar="RATE",
                   help="receive at most RATE from the repository or a sync's other host", **d)
    p.add_argument("--lock-wait", type=float, metavar="SECONDS",
                   help="wait this long for a locked repository", **({"default": 0.0} if top else d))


def _unavailable(sub: argparse._SubParsersAction, name: str, exc: ImportError) -> None:
    p = sub.add_parser(name, help=f"(unavailable: {exc})")
    p.add_argument("rest", nargs=argparse.REMAINDER)

    def run(ctx: Context) -> int:
        raise DeltavaultError(f"the {name} command is unavailable in this installation: {exc}")

    p.set_defaults(func=run)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; given ``argv``, only the commands named in it are imported, the
    others get a placeholder (importing all 25 command modules took 0.1-0.2 s of CPU, serial,
    at the start of every run: an S3 restore of 1 GB takes 3 s)."""
    p = argparse.ArgumentParser(prog="deltavault", description="Backup and sync that moves only what changed.")
    p.add_argument("--version", action="version", version=f"deltavault {__version__}")
    _global_options(p, top=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, top=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    names = _commands()
    named = set(argv or ()) & set(names)
    for name in names:
        if named and name not in named:
            # A module whose command has another name (cmd_agent: sync-agent) is one of
            # these: chosen, or a parse error, main() parses again with every command.
            stub = sub.add_parser(name, add_help=False)
            stub.add_argument("rest", nargs=argparse.REMAINDER)
            stub.set_defaults(func=None)
            continue
        try:
            module = importlib.import_module(f"deltavault.cli.cmd_{name}")
        except ImportError as exc:
            # One broken optional command must not take backup and restore down with it.
            _unavailable(sub, name, exc)
            continue
        module.register(sub)
    for sp in sub.choices.values():
        for action in common._actions:
            sp._add_action(action)
    return p


def _parse(given: list[str]) -> argparse.Namespace:
    """``given`` parsed importing only the commands named in it, or, when that picks a
    placeholder or fails, with every command (whose parser reports the error)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            args = build_parser(given).parse_args(given)
        if getattr(args, "func", None) is not None:
            return args
    except SystemExit as exc:
        if exc.code == 0:  # --help or --version, printed
            raise
    return build_parser().parse_args(given)


def main(argv: Sequence[str] | None = None) -> int:
    tune_allocator()
    args = _parse(list(sys.argv[1:] if argv is None else argv))
    ctx = Context(args, json=args.json, quiet=args.quiet)
    # SIGTERM (systemd, timeout, kill) unwinds like Ctrl-C: temp files, snapshots and locks
    # are cleaned up on the way out.
    old_term = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            rc = int(args.func(ctx))
            ctx.save_index_copies()  # any exit code: a backup that warned still wrote its index
        finally:
            ctx.warn_repository_notes()
    except DeltavaultError as exc:
        rc = int(exc.exit_code)
        if ctx.json:
            print(json.dumps({"type": "error", "error": type(exc).__name__, "message": exc.message,
                              "exit_code": rc, "retryable": exc.retryable}))
        else:
            print(f"deltavault: {terminal(exc.message)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("deltavault: interrupted; what was stored so far stays valid", file=sys.stderr)
        rc = int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        rc = int(ExitCode.OK)
    except Exception:
        traceback.print_exc()
        print("deltavault: internal error (a bug); the repository is unchanged or still valid", file=sys.stderr)
        rc = int(ExitCode.FATAL)
    finally:
        signal.signal(signal.SIGTERM, old_term)
    return rc


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def entry() -> None:
    rc = main()
    # What is alive now dies with the process: the collection the interpreter runs while it
    # tears its modules down cost 0.07-0.3 s after every restore (the run itself is 2-3 s),
    # and frozen objects are not scanned. Files, atexit handlers and threads end as before.
    gc.freeze()
    sys.exit(rc)


if __name__ == "__main__":
    entry()
