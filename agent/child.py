"""Child processes of the engine, supervised one way: each in a process group of its own, its
output read as it comes, killed with every process it started at its timeout (or when its
caller asks), and never outliving the engine (on Linux the kernel SIGKILLs it when its
parent dies, even by kill -9).

The runner starts train.py this way (agent/runner.py); `run` starts the fixed tools the
engine runs under the device lock (the champion's profile, the checkpoint scorer) and the
proposers' commands (the quick checks, an external coding agent).

What this module must never do: leave a process of a child's group alive after it returns
(not even on Ctrl-C), or run anything in the engine's own process.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.locks import slot_locks

Feed = Callable[[str, bytes], None]  # ("stdout" or "stderr", bytes read) -> None

_cancelled = threading.Event()


class Cancelled(Exception):
    """The engine is stopping (an error or Ctrl-C in another thread): the child was ended."""


def cancel_all(cancel: bool = True) -> None:
    """End every child now being pumped, in any thread (their callers raise Cancelled),
    and any started until `cancel_all(False)`."""
    if cancel:
        _cancelled.set()
    else:
        _cancelled.clear()


_stop_signal: list[str] = []  # the signal that asked the engine to stop (agent/cli.py)


def stop(signal_name: str) -> None:
    """A signal asks the engine to stop: every child ends (`cancel_all`, from a thread of its
    own: the handler may have interrupted this thread inside the event's lock), and the
    session reads the Cancelled that follows as that signal's stop (`stopped_by`), even
    where the KeyboardInterrupt the handler raises was swallowed (Python ignores an
    exception raised in an at-fork callback, say)."""
    _stop_signal[:] = [signal_name]
    threading.Thread(target=cancel_all, name="stop", daemon=True).start()


def stopped_by() -> str | None:
    """The signal that asked the engine to stop, if one did."""
    return _stop_signal[0] if _stop_signal else None


def cancelled() -> bool:
    """Whether the engine is stopping (`cancel_all`): a wait on a run elsewhere (a Ray slot's)
    ends then too."""
    return _cancelled.is_set()


def start(argv: list[str], cwd, env: dict | None = None, popen=None,
          stdin: bool = False, merge: bool = False, cores: Sequence[int] = ()
          ) -> subprocess.Popen:
    """Start `argv` in a new process group with its output on pipes (stderr into stdout
    with `merge`), pinned to `cores` when given (its children inherit that);
    `popen(argv, **streams)` starts it another way (in a sandbox, say)."""
    streams = dict(stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge else subprocess.PIPE,
                   start_new_session=True)  # its own group, so that one killpg ends it all
    if popen is not None:
        return popen(argv, **streams)
    def before_exec() -> None:
        _die_with_parent()
        if cores:
            os.sched_setaffinity(0, cores)

    return subprocess.Popen(argv, cwd=cwd, env=env, preexec_fn=before_exec, **streams)


def pump(proc: subprocess.Popen, feed: Feed, deadline: float,
         stop: Callable[[], bool] = lambda: False) -> str | None:
    """Hand the child's output to `feed` until it exits (None), or say why it must be
    killed: "timeout" past `deadline` (time.monotonic), "stop" when `stop()` says so.
    Raises Cancelled when the engine stops (`cancel_all`): the caller's `end` kills it."""
    sel = _selector(proc)
    try:
        while not _has_exited(proc.pid):
            if _cancelled.is_set():
                raise Cancelled(f"pid {proc.pid} ended: the session is stopping")
            if stop():
                return "stop"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            if not sel.get_map():  # every pipe closed, the child still running
                time.sleep(min(0.05, remaining))
            for key, _ in sel.select(timeout=min(0.05, remaining)):
                _read(sel, key, feed)
        return "stop" if stop() else None
    finally:
        sel.close()


def end(proc: subprocess.Popen, feed: Feed, grace_s: float = 5.0) -> None:
    """Terminate the child's process group, SIGKILL whatever is left, reap it, and hand
    what is still in its pipes to `feed`."""
    try:
        if not _has_exited(proc.pid):
            _signal_group(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while not _has_exited(proc.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
    finally:  # even when a second Ctrl-C cuts the grace period short
        # Stragglers (compile workers, children the candidate spawned) may hold the GPU even
        # after the leader has exited; the leader is not reaped yet, so the group id is ours.
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
    sel = _selector(proc)
    drained = time.monotonic() + 2.0  # every writer is dead: EOF comes at once
    while sel.get_map() and time.monotonic() < drained:
        for key, _ in sel.select(timeout=0.1):
            _read(sel, key, feed)
    sel.close()
    for pipe in (proc.stdout, proc.stderr):  # stdin is its writer's to close
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


@dataclass
class Exited:
    code: int | None  # None: killed at its timeout
    out: str  # stdout (with stderr in it, when merged)
    err: str

    def last_lines(self, lines: int = 3) -> str:
        """The last lines of its output, joined with ' | ', for a one-line error."""
        return " | ".join((self.out + self.err).strip().splitlines()[-lines:])


def run_tool(argv: list[str], cwd, timeout_s: float, *, env: dict | None = None,
        stdin: str | None = None, merge: bool = False, device: str | None = None,
        gpus: Sequence[int] = (), cores: Sequence[int] = (), popen=None) -> Exited:
    """Run a fixed command to its end or its timeout, under the locks of `device` (its
    `gpus`, or its `cores`, to which it is pinned: a slot's) when given, and return its
    exit code and output."""
    chunks: dict[str, list[bytes]] = {"stdout": [], "stderr": []}
    lock = slot_locks(device, gpus, cores) if device else contextlib.nullcontext()
    if device == "cuda" and gpus:
        env = {**(os.environ if env is None else env),
               "CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))}
    with lock:
        proc = start(argv, cwd, env, popen, stdin=stdin is not None, merge=merge, cores=cores)
        if stdin is not None:  # in a thread: a child that writes before it reads must not block
            threading.Thread(target=_write, args=(proc, stdin.encode()), daemon=True).start()
        killed = None
        try:
            killed = pump(proc, lambda name, data: chunks[name].append(data),
                          time.monotonic() + timeout_s)
        finally:
            end(proc, lambda name, data: chunks[name].append(data))
    out, err = (b"".join(chunks[n]).decode(errors="replace") for n in ("stdout", "stderr"))
    return Exited(None if killed else proc.returncode, out, err)


def _write(proc: subprocess.Popen, data: bytes) -> None:
    with contextlib.suppress(OSError, ValueError):  # it may exit, or be ended, unread
        proc.stdin.write(data)
        proc.stdin.close()


def _selector(proc: subprocess.Popen) -> selectors.BaseSelector:
    """A selector on the child's output pipes, each keyed by its name."""
    sel = selectors.DefaultSelector()
    for name in ("stdout", "stderr"):
        if getattr(proc, name) is not None:
            sel.register(getattr(proc, name), selectors.EVENT_READ, name)
    return sel


def _read(sel: selectors.BaseSelector, key: selectors.SelectorKey, feed: Feed) -> None:
    data = os.read(key.fd, 65536)
    if data:
        feed(key.data, data)
    else:
        sel.unregister(key.fileobj)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGKILL it when the engine dies, even by
    kill -9, so an orphaned benchmark never keeps the device busy under the next run."""
    if sys.platform == "linux":
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _has_exited(pid: int) -> bool:
    # WNOWAIT leaves the child a zombie: its pid, and so its process group id, cannot be
    # reused by another process before `end` has signalled the group.
    info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    return info is not None


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)
