"""Small pure pieces of the file restore: the order a directory's entries are handed out in,
how many directories may stay open, and temp names."""

from __future__ import annotations

import re
import threading

from deltavault.model.nodes import Node, NodeType
from deltavault.restore.files import MAX_HELD_DIRS, MAX_OPEN_DIRS, dir_budget, large_first
from deltavault.restore.regular import INLINE_BELOW
from deltavault.restore.target import TEMP_PREFIX, temp_name


def _node(name: str, kind: NodeType, size: int = 0) -> Node:
    return Node(name=name.encode(), type=kind, size=size)


def test_large_files_come_first_each_group_in_its_order() -> None:
    nodes = [_node("a", NodeType.DIR), _node("b", NodeType.FILE, 10), _node("big1", NodeType.FILE, INLINE_BELOW),
             _node("c", NodeType.SYMLINK), _node("big2", NodeType.FILE, 5 * INLINE_BELOW), _node("d", NodeType.FILE, 1)]
    assert [n.name for n in large_first(nodes)] == [b"big1", b"big2", b"a", b"b", b"c", b"d"]
    small = nodes[:2]
    assert large_first(small) is small


def test_the_directory_budget_follows_the_open_file_limit() -> None:
    assert dir_budget(256) == 2 * MAX_OPEN_DIRS  # a small limit keeps the old bound
    assert dir_budget(2048) == 512
    assert dir_budget(1 << 20) == MAX_HELD_DIRS


def test_temp_names_stay_random_and_distinct_across_refills_and_threads() -> None:
    names: list[bytes] = []
    lock = threading.Lock()

    def make() -> None:
        mine = [temp_name(b"file.txt") for _ in range(700)]  # more than one pool of randomness
        with lock:
            names.extend(mine)

    threads = [threading.Thread(target=make) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == len(names) == 2100
    assert all(re.fullmatch(re.escape(TEMP_PREFIX) + rb"[0-9a-f]{12}-file\.txt", n) for n in names)


def test_a_forked_child_makes_other_temp_names_than_its_parent() -> None:
    import os

    temp_name(b"x")  # the parent has randomness drawn ahead
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next name, to the parent
        os.write(w, temp_name(b"x"))
        os._exit(0)
    os.close(w)
    child = os.read(r, 1000)
    os.close(r)
    os.waitpid(pid, 0)
    assert child != temp_name(b"x")


def test_a_restore_runs_with_a_short_switch_interval_and_puts_it_back(repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import sys

    from deltavault.model.content import Full
    from deltavault.model.types import BlobType
    from deltavault.objects.trees import encode_tree
    from deltavault.restore.files import SWITCH_INTERVAL, FileRestorer
    from deltavault.restore.options import RestoreOptions

    data, _ = repo.save_blob(BlobType.DATA, b"hello")
    seen: list[float] = []
    real = repo.load_blobs

    def load_blobs(ids):  # type: ignore[no-untyped-def]
        seen.append(sys.getswitchinterval())
        return real(ids)

    repo.load_blobs = load_blobs
    root, _ = repo.save_blob(BlobType.TREE, encode_tree([Node(name=b"f", type=NodeType.FILE, mode=0o644, size=5,
                                                               content=[Full(data, 5)])]))
    repo.flush()
    before = sys.getswitchinterval()
    (tmp_path / "out").mkdir()
    FileRestorer(repo, str(tmp_path / "out"), RestoreOptions()).run(root)
    assert (tmp_path / "out" / "f").read_bytes() == b"hello"
    assert seen and all(s == SWITCH_INTERVAL for s in seen)
    assert sys.getswitchinterval() == before
