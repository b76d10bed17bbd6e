"""Whether a session is alive, stopped or killed, and what its runs wait for: what `status`
shows and what `clean` spares.

A running session holds `session.lock` in its run directory (`session_lock`: an flock,
which the kernel drops when the process dies, even by kill -9) and writes its pid there;
its ledger's events say when it started and why it stopped. A run that waits for its
device lock has no `lock_at` in the ledger yet; the lock file names the holder.

What this module must never do: hold a session's lock longer than a probe, except for the
holder itself (`session_lock`), or write anything but the lock's note of its holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.rundir import RunDir

STARTED = "session started"  # the event that opens each process's run of the session
STOPPED = "session stopped: "  # the event that ends it, with the reason


class SessionBusy(RuntimeError):
    """Another process holds the run directory (a running session, or a review)."""


@contextlib.contextmanager
def session_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock: the loop while it runs, a review while it decides;
    SessionBusy when another process holds it. An flock, so the kernel releases it when its
    holder dies (even by kill -9). The file says who holds it (`status` reads it); a lock
    held for an instant (`status` probing it) is waited for, briefly."""
    path = RunDir(run_dir).lock
    with open(path, "a+") as f:
        for _ in range(10):
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.05)
        else:
            raise SessionBusy(
                f"another process works in {run_dir} (it holds {path}): a "
                "running session? Stop it (Ctrl-C) or wait for it to end"
            ) from None
        try:
            f.truncate(0)
            f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def holder(run_dir: str | Path) -> str | None:
    """"pid P since T" of the process that holds the session's lock now, else None."""
    path = RunDir(run_dir).lock
    if not path.exists():
        return None
    with open(path) as f:
        try:  # shared and for an instant: a session starting now retries (session_lock)
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "a process"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


@dataclass(frozen=True)
class Liveness:
    state: str  # alive, stopped, killed (no process, no stop recorded), not started
    text: str  # one line for `status`
    end: float | None  # when it stopped, or its last sign of life; None while alive


def liveness(run_dir: str | Path, started: dict | None, stopped: dict | None,
             last_seen: float) -> Liveness:
    """The session's state from its lock and its last start and stop events (the ledger's
    `last_event(STARTED)` and `last_event(STOPPED)`); `last_seen`: its latest write."""
    held = holder(run_dir)
    if held is not None:
        return Liveness("alive", f"alive: the session runs ({held})", None)
    if stopped is not None and (started is None or stopped["id"] > started["id"]):
        why = stopped["text"].removeprefix(STOPPED)
        return Liveness("stopped", f"stopped {when(stopped['time'])}: {why}", stopped["time"])
    resume = f"resume it with `python -m agent run --resume {run_dir}`"
    if started is None:
        return Liveness("not started", f"not running: its loop never started; {resume}",
                        last_seen)
    return Liveness("killed", f"not running: its process ended without stopping (killed or "
                    f"crashed) after {when(last_seen)}; {resume}", last_seen)


def lock_holder(path: str | Path) -> str:
    """What a device lock's file says of its holder ("held by pid P since T")."""
    try:
        return Path(path).read_text().strip() or "holder unknown"
    except OSError:
        return "holder unknown"


def when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
