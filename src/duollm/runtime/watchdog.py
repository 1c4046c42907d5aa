"""A long step that makes no progress says so: ``watchdog(log, what)`` prints a line whenever a whole
interval passes in which this process and its finished children used (almost) no CPU.

A study once sat twelve minutes at zero CPU inside pyarrow's thread pools with nothing on the screen
(issue 28, item 5). Progress bars stop moving in such a hang, but a stage without one (the report, a
router's evaluation) showed nothing at all. CPU time is the signal because every stage computes: a stage
that waits on a file, a lock or another process for a whole interval is worth a line.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable


def cpu_seconds() -> float:
    """CPU time of this process (every thread) and of its children that have finished."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@contextlib.contextmanager
def watchdog(log: Callable[[str], None], what: str, every: float = 120.0, idle_share: float = 0.01):
    """Around a step: a line each time ``every`` seconds pass with less than ``idle_share`` of a core used."""
    stop = threading.Event()

    def watch():
        last, idle = cpu_seconds(), 0.0
        while not stop.wait(every):
            now = cpu_seconds()
            if now - last < idle_share * every:
                idle += every
                log(f"  {what}: no progress for {round(idle, 1):g} s (no CPU used: waiting on a file, a lock or another "
                    f"process?)")
            else:
                idle = 0.0
            last = now

    thread = threading.Thread(target=watch, name="duollm-watchdog", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
