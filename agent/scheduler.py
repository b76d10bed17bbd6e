"""The work a session has in flight: experiments and champion re-measurements, at most one
per slot at a time.

With one slot each piece of work runs in the loop's own thread as it is submitted: the
session is the sequential loop it always was (Ctrl-C lands where it runs). With several,
each runs in a thread of its own and takes a free slot for each of its benchmark runs
(agent/measure.py), while the loop drafts the next candidate; `wait` hands back what
finished. When the loop stops on an error or Ctrl-C, every run still going is ended (its
processes killed, the ledger's run left 'running', which --resume discards and re-runs)
before the error goes on.

What this module must never do: run more pieces of work than there are slots, or let a
thread's error pass unseen.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from agent import child


class InFlight:
    def __init__(self, width: int):
        self.width = width
        self._pool = ThreadPoolExecutor(width, "slot") if width > 1 else None
        self._work: dict[Hashable, Future] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._work

    def __len__(self) -> int:
        return len(self._work)

    def keys(self) -> list[Hashable]:
        return list(self._work)

    def full(self) -> bool:
        return len(self._work) >= self.width

    def submit(self, key: Hashable, fn: Callable, *args) -> None:
        """Start `fn(*args)` as the work named `key` (inline with one slot: it has finished
        when this returns, its error raised here)."""
        if self._pool is None:
            done: Future = Future()
            done.set_result(fn(*args))
        else:
            done = self._pool.submit(fn, *args)
        self._work[key] = done

    def finished(self) -> list[tuple[Hashable, object]]:
        """(key, result) of each piece of work that has finished, removed from the flight;
        the first error of one is raised."""
        out = []
        for key, done in list(self._work.items()):
            if done.done():
                del self._work[key]
                out.append((key, done.result()))
        return out

    def wait(self) -> None:
        """Until at least one piece of work has finished."""
        if self._work:
            wait(self._work.values(), return_when=FIRST_COMPLETED)

    def __enter__(self) -> InFlight:
        return self

    def __exit__(self, kind, error, tb) -> None:
        if self._pool is None:
            return
        if error is not None:
            child.cancel_all()  # every run's processes end; their threads raise
        try:
            self._pool.shutdown(wait=True)
        finally:
            child.cancel_all(False)
