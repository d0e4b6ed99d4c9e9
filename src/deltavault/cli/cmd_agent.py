"""deltavault sync-agent and sync-source: the far ends of a sync with another host, started
by ssh. They speak the protocol of sync/wire.py on stdin and stdout; only errors are
printed (to stderr), and the exit code says what failed."""

from __future__ import annotations

import argparse
import sys

from deltavault.cli.common import Context
from deltavault.sync.pull import send_source
from deltavault.sync.receiver.agent import Agent
from deltavault.sync.wire import Channel


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sync-agent", help="(run by sync through ssh) receive a push sync on stdin/stdout",
                       description="The far end of 'deltavault sync SRC host:DST'. Not for interactive use: "
                       "it speaks a binary protocol on stdin and stdout.")
    p.set_defaults(func=run_agent)
    p = sub.add_parser("sync-source", help="(run by sync through ssh) send a pull sync on stdin/stdout",
                       description="The far end of 'deltavault sync host:SRC DST'. Not for interactive use: "
                       "it speaks a binary protocol on stdin and stdout.")
    p.set_defaults(func=run_source)


def _interactive(ctx: Context, name: str) -> bool:
    if sys.stdin.isatty():
        ctx.warn(f"{name} speaks a binary protocol; it is started by 'deltavault sync' through ssh")
        return True
    return False


def run_agent(ctx: Context) -> int:
    if _interactive(ctx, "sync-agent"):
        return 2
    Agent(Channel(sys.stdin.buffer, sys.stdout.buffer)).run()
    return 0


def run_source(ctx: Context) -> int:
    if _interactive(ctx, "sync-source"):
        return 2
    send_source(Channel(sys.stdin.buffer, sys.stdout.buffer))
    return 0
