"""A background thread reports progress while the run finishes: a restore's totals thread
or a backup's scan may still be counting when the bar is taken down. The terminal reporter
checked its bar outside its lock, so a report between that check and its use met the bar
gone and the thread died with AttributeError, printed over the user's terminal."""

from __future__ import annotations

import io
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from deltavault.cli.progress_rich import RichReporter


@pytest.fixture
def switching_often() -> Iterator[None]:
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can: the race shows at once
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _late(rep: RichReporter, meet: threading.Barrier) -> None:
    """A background thread's reports, from the moment the run finishes."""
    meet.wait()
    for _ in range(50):
        rep.set_totals(total_bytes=10, total_items=1)
        rep.advance(nbytes=1, items=1)


@pytest.mark.usefixtures("switching_often")
def test_reports_while_the_bar_is_taken_down() -> None:
    with ThreadPoolExecutor(1) as pool:
        for _ in range(500):
            rep = RichReporter(io.StringIO())
            rep.start("restore")
            meet = threading.Barrier(2)
            late = pool.submit(_late, rep, meet)
            meet.wait()
            rep.finish()
            late.result()  # its error, if it died, is raised here
