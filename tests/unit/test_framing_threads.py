"""Two threads decoding a Struct type for the first time at once (the restore's totals thread
and its walker both read the first tree) crashed the process in msgspec's type setup. CI saw
it as a restore killed by SIGSEGV. Run in a child process, so a crash fails this test and not
the whole session."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import sys, threading, types
    import msgspec
    from deltavault.framing import decode_json, decode_msgpack

    sys.setswitchinterval(0.0005)  # as the restore sets it: threads switch often
    SRC = """
    from __future__ import annotations
    import msgspec
    class Leaf(msgspec.Struct, array_like=True):
        a: int
        b: str
        c: list[int] | None = None
        d: dict[str, bytes] | None = None
    class Node(msgspec.Struct, array_like=True):
        name: str
        kids: list[Leaf]
        more: list[Node] | None = None
    """
    for i in range(1500):
        m = types.ModuleType(f"fresh{i}")
        sys.modules[m.__name__] = m
        exec(SRC, m.__dict__)  # new types each round: each is decoded for the first time
        value = m.Node("x", [m.Leaf(1, "y")])
        packed, text = msgspec.msgpack.encode(value), msgspec.json.encode(value)
        meet = threading.Barrier(2)
        got = []

        def go() -> None:
            meet.wait()
            got.append(decode_msgpack(packed, m.Node) == value and decode_json(text, m.Node) == value)

        t = threading.Thread(target=go)
        t.start()
        go()
        t.join()
        assert got == [True, True], got
    print("ok")
''')


def test_first_decodes_of_a_type_on_two_threads_at_once() -> None:
    p = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", (p.returncode, p.stderr[-2000:])
