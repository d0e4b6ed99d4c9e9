"""deltavault sync-agent: the receiving end of a push sync, started by ssh on the
destination host. It speaks the protocol of sync/agent.py on stdin and stdout."""

from __future__ import annotations

import argparse
import sys

from deltavault.cli.common import Context
from deltavault.sync.agent import Agent
from deltavault.sync.remote import Channel


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sync-agent", help="(run by sync through ssh) receive a push sync on stdin/stdout",
                       description="The far end of 'deltavault sync SRC host:DST'. Not for interactive use: "
                       "it speaks a binary protocol on stdin and stdout.")
    p.set_defaults(func=run)


def run(ctx: Context) -> int:
    if sys.stdin.isatty():
        ctx.warn("sync-agent speaks a binary protocol; it is started by 'deltavault sync SRC host:DST'")
        return 2
    Agent(Channel(sys.stdin.buffer, sys.stdout.buffer)).run()
    return 0
