"""Fault injection: kill the session's own process at its Nth step boundary, for the tests
that prove a session killed at any moment resumes (tests/test_faults.py).

A step boundary is every ledger write (Ledger._write) and every git command
(workspace.git): between two of them the session's state on disk must always be one that
`--resume` continues from. Two environment variables, both unset in normal use:

    SPEEDLOOP_FAULT_AT=N      SIGKILL this process just before its Nth boundary (1-based)
    SPEEDLOOP_FAULT_TRACE=F   append "N label" to the file F at every boundary

What this module must never do: act when neither variable is set, or kill any process
but its own.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

FAULT_AT = "SPEEDLOOP_FAULT_AT"
FAULT_TRACE = "SPEEDLOOP_FAULT_TRACE"

_lock = threading.Lock()  # the proposer's thread crosses boundaries too
_count = 0


def boundary(label: Callable[[], str]) -> None:
    """One step boundary; `label()` names it (e.g. "ledger add_candidate", "git commit"),
    called only when a variable is set."""
    at, trace = os.environ.get(FAULT_AT), os.environ.get(FAULT_TRACE)
    if not at and not trace:
        return
    global _count
    with _lock:  # held through the kill, so no other thread crosses a boundary meanwhile
        _count += 1
        if trace:
            with open(trace, "a") as f:
                f.write(f"{_count} {label()}\n")
        if at and _count == int(at):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


def caller(skip: tuple[str, ...]) -> str:
    """The name of the nearest calling function not in `skip` (a ledger write's label)."""
    frame = sys._getframe(1)
    while frame is not None and (frame.f_code.co_name in skip or
                                 frame.f_code.co_filename.endswith("contextlib.py")):
        frame = frame.f_back
    return frame.f_code.co_name if frame is not None else "?"
