"""The runner: executes one benchmark run of `train.py` in a child process and classifies it.

`run(spec)` starts `python train.py --preset P --seed S --out OUT ...` in the candidate's
worktree, as a supervised child (agent/child.py: its own process group, killed with all
its processes at the timeout), holding a per-device lock so that no two benchmarks on one
machine share a CPU or a GPU and corrupt each other's timings. Stdout and stderr stream into
a log file line by line; eval lines are parsed as they arrive so that a candidate falling
clearly behind the champion can be stopped early, and every stdout line goes to
`spec.on_line` as it comes (the live W&B run). The outcome is one of `STATUSES` (the
one list of run outcomes; the ledger stores them), with the parsed result JSON when there
is one.

A run killed by a SIGKILL the runner did not send is the kernel's OOM killer's doing
("oom", the candidate's failure) when the kernel's count of OOM kills (/proc/vmstat
`oom_kill`: every kill of the OOM killer, global or in a cgroup, counts there) moved while
it ran, or where that count cannot be read; when it did not move, something outside killed
it (a person, a userspace OOM daemon, a job manager) and the run is "lost": infrastructure,
not the candidate's failure (agent/measure.py runs it again). Candidate code cannot send
that signal from inside its sandbox (its own PID namespace), so it cannot lose its own runs.

What the runner must never do: run candidate code in its own process, leave any process of
a run alive after `run` returns (not even on Ctrl-C), judge a candidate (that is the judge's
job; early stopping only saves time on clear losers), or accept a result it has not
validated against the harness's contract.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from agent import acceptance, child, integrity
from bench import protocol
from bench.locks import LOCK_HELD_ENV, DeviceLock, slot_locks

Status = Literal[
    "ok",
    "crash",
    "timeout",
    "oom",
    "diverged",
    "invalid-result",
    "integrity-violation",
    "early-stopped",
    "lost",
]
STATUSES: tuple[Status, ...] = get_args(Status)

# (tokens, training seconds, val loss) -> True to stop the run now
EarlyStop = Callable[[int, float, float], bool]

# Substrings of stderr that mean the run ran out of memory (torch on CUDA, Python on CPU).
OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory", "CUDA error: out of memory", "MemoryError")
STDERR_TAIL_LINES = 20
MAX_LINE_BYTES = 1 << 20  # a longer run of bytes without a newline is logged as its own line


@dataclass
class RunSpec:
    worktree: Path  # the checkout whose train.py, model/ and kernels/ run
    preset: str
    seed: int
    out_path: Path  # where train.py writes the result JSON (--out)
    log_path: Path  # stdout and stderr of the run, plus the runner's own "[runner]" lines
    timeout_s: float  # hard limit on the child's wall time: a multiple of the expected time
    extra_args: list[str] = field(default_factory=list)  # e.g. ["--budget-tokens", "4096"]
    device: Literal["cpu", "cuda"] = "cpu"  # which lock to hold
    gpus: tuple[int, ...] = ()  # its physical GPUs, CUDA_VISIBLE_DEVICES (): 0 to nproc - 1
    cores: tuple[int, ...] = ()  # the CPU cores it is pinned to (a slot's); (): unpinned
    nproc: int = 1  # processes of one run (torchrun), one per GPU on cuda
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)  # overrides of the inherited environment
    early_stop: EarlyStop | None = None  # called at every eval line (measure.behind_champion)
    checkpoint: Path | None = None  # train.py saves the final weights here when the run is ok
    sandbox: bool = True  # False: train.py --no-sandbox (the result is marked untrusted)
    kill_grace_s: float = 5.0  # between SIGTERM and SIGKILL, for the run to release its GPU
    on_lock: Callable[[DeviceLock], None] | None = None  # called once the lock is held
    on_line: Callable[[str], None] | None = None  # each stdout line as it comes (live W&B)


@dataclass
class RunOutcome:
    status: Status
    result: dict | None  # the result JSON; for early-stopped only {"curve": [...]} so far
    error: str | None  # short and human: why it is not "ok"
    wall_seconds: float  # the child's wall time, start to exit (or to our kill)
    log_path: str  # str, not Path, so that dataclasses.asdict gives plain JSON
    returncode: int | None  # negative: killed by that signal


def run(spec: RunSpec) -> RunOutcome:
    """Run train.py once as `spec` says and classify the outcome; never raises for the run's
    own failures (only for the runner's, such as a missing worktree)."""
    worktree = Path(spec.worktree).resolve()
    if not (worktree / "train.py").is_file():
        raise FileNotFoundError(f"no train.py in the worktree {worktree}: is it a checkout?")
    out_path = Path(spec.out_path).resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.unlink(missing_ok=True)  # a stale result must never pass for this run's
    log_path = Path(spec.log_path).resolve()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(spec, out_path)

    gpus = _gpus(spec) if spec.device == "cuda" else []
    with open(log_path, "wb") as log, slot_locks(spec.device, gpus, spec.cores) as lock:
        if spec.on_lock is not None:
            spec.on_lock(lock)
        _log_note(log, f"$ {' '.join(cmd)}  (in {worktree})")
        if lock.waited_s > 0:
            _log_note(log, f"waited {lock.waited_s:.1f} s for {lock.path} ({lock.holder})")
        watch = _Watch(log, spec.early_stop, spec.on_line)
        oom_kills_before = oom_kills()
        started = time.monotonic()
        proc = child.start(cmd, worktree, _child_env(spec), cores=spec.cores)
        try:
            killed = child.pump(proc, watch.feed, started + spec.timeout_s,
                                stop=lambda: watch.stop_requested)
            killed_for = {"stop": "early-stop"}.get(killed, killed)
            wall_seconds = time.monotonic() - started
        finally:
            # Also on exceptions and Ctrl-C: no process of the run may outlive it.
            watch.early_stop = None  # the run is over; lines still in the pipes are only logged
            child.end(proc, watch.feed, spec.kill_grace_s)
            watch.flush()
        if killed_for == "timeout":
            _log_note(log, f"killed: over the {spec.timeout_s:g} s timeout")
        elif killed_for == "early-stop":
            _log_note(log, f"stopped early at {watch.curve[-1]}")
        after = oom_kills()
        ooms = None if None in (oom_kills_before, after) else after - oom_kills_before
        if proc.returncode == -signal.SIGKILL and killed_for is None:
            _log_note(log, f"killed by SIGKILL from outside; the kernel's OOM kills meanwhile: "
                      f"{'unknown' if ooms is None else ooms}")
    return _classify(proc.returncode, killed_for, watch, out_path, spec, wall_seconds, log_path,
                     ooms)


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed since boot (/proc/vmstat
    `oom_kill`, Linux 4.13 and later); None where it does not say."""
    try:
        with open("/proc/vmstat") as f:
            for line in f:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def run_checked(spec: RunSpec, expected: Mapping[str, str]) -> RunOutcome:
    """The one way a benchmark run is made, on this machine or on a Ray slot's node: the
    fixed files of `spec.worktree` checked against `expected` (`fixed-hash`: a changed
    harness never runs, the run is an integrity violation), then train.py through the
    runner."""
    changed = integrity.changed_fixed(spec.worktree, expected)
    if changed:
        detail = f"fixed files differ from the session start: {', '.join(changed[:10])}"
        found = [protocol.violation(acceptance.FIXED_HASH, detail)]
        return RunOutcome(
            "integrity-violation", {"integrity": {"ok": False, "violations": found,
                                                  "changed": changed}},
            f"{acceptance.FIXED_HASH}: {detail}", 0.0, str(spec.log_path), None)  # fmt: skip
    # A removed harness is a changed fixed file, caught above; a file missing here (the
    # interpreter, the worktree) is the engine's and stops the session with its error rather
    # than reading as every candidate's crash.
    return run(spec)


def command(spec: RunSpec, out_path: Path) -> list[str]:
    """The child's command line: the trusted harness, train.py, which starts the sandboxed
    workers itself (`--nproc K`: torchrun inside the trainer's sandbox)."""
    if spec.nproc < 1:
        raise ValueError(f"nproc={spec.nproc}: a run needs at least one process")
    args = ["--preset", spec.preset, "--seed", str(spec.seed), "--out", str(out_path)]
    if spec.nproc > 1:
        args += ["--nproc", str(spec.nproc)]
    if spec.checkpoint is not None:
        args += ["--checkpoint", str(Path(spec.checkpoint).resolve())]
    if not spec.sandbox:
        args += ["--no-sandbox"]
    return [spec.python, "train.py", *args, *spec.extra_args]


def _gpus(spec: RunSpec) -> list[int]:
    """The physical GPUs of a cuda run: its slot's, or the first nproc."""
    if spec.gpus and len(spec.gpus) != spec.nproc:
        raise ValueError(f"a run of {spec.nproc} processes on GPUs {spec.gpus}: one per GPU")
    return list(spec.gpus) or list(range(spec.nproc))


class _Watch:
    """Splits the child's output into lines, logs them, and keeps what classification needs."""

    def __init__(self, log, early_stop: EarlyStop | None,
                 on_line: Callable[[str], None] | None = None):
        self.log = log
        self.early_stop = early_stop
        self.on_line = on_line
        self.partial = {"stdout": b"", "stderr": b""}
        self.last_stdout_line = ""
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self.oom_line: str | None = None
        self.curve: list[dict] = []  # parsed from eval lines, for early stopping
        self.stop_requested = False

    def feed(self, stream: str, data: bytes) -> None:
        buf = self.partial[stream] + data
        *lines, rest = buf.split(b"\n")
        if len(rest) > MAX_LINE_BYTES:
            lines, rest = [*lines, rest], b""
        self.partial[stream] = rest
        for line in lines:
            self._line(stream, line)

    def flush(self) -> None:
        """Hand on the unterminated last line of each stream (a run killed mid-line)."""
        for stream, rest in self.partial.items():
            if rest:
                self.partial[stream] = b""
                self._line(stream, rest)

    def _line(self, stream: str, raw: bytes) -> None:
        self.log.write(raw + b"\n")
        self.log.flush()  # so the log is complete up to here even if we are killed next
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        if stream == "stderr":
            self.stderr_tail.append(line)
            if self.oom_line is None and any(m in line for m in OOM_MARKERS):
                self.oom_line = line.strip()
            return
        if line.strip():
            self.last_stdout_line = line
        if self.on_line is not None:
            try:
                self.on_line(line)
            except Exception as err:  # a watcher's failure must not touch the run
                self.on_line = None
                _log_note(self.log, f"stopped passing lines on: {type(err).__name__}: {err}")
        point = protocol.parse_eval_line(line)
        if point is not None:
            self.curve.append(point)
            if self.early_stop is not None and not self.stop_requested:
                stop = self.early_stop(point["tokens"], point["seconds"], point["val_loss"])
                self.stop_requested = bool(stop)


def _child_env(spec: RunSpec) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"  # progress lines must arrive as they happen
    env[LOCK_HELD_ENV] = spec.device  # the harness must not wait for the lock we hold
    if spec.device == "cuda":
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in _gpus(spec))
    env.update(spec.env)
    return env


def _log_note(log, text: str) -> None:
    log.write(f"[runner] {text}\n".encode())
    log.flush()


def _classify(
    returncode: int,
    killed_for: str | None,
    watch: _Watch,
    out_path: Path,
    spec: RunSpec,
    wall_seconds: float,
    log_path: Path,
    oom_kills_meanwhile: int | None,
) -> RunOutcome:
    def outcome(status: Status, result: dict | None, error: str | None) -> RunOutcome:
        return RunOutcome(status, result, error, wall_seconds, str(log_path), returncode)

    if killed_for == "early-stop":
        last = watch.curve[-1]
        error = (
            f"stopped early: val loss {last['val_loss']:.4f} at {last['seconds']:.1f} s "
            "of training is behind the champion"
        )
        return outcome("early-stopped", {"curve": watch.curve}, error)
    if killed_for == "timeout":
        return outcome("timeout", None, f"no result within the {spec.timeout_s:g} s timeout")

    result, problem = _read_result(watch.last_stdout_line, out_path)
    if returncode == protocol.EXIT_OK:
        if problem is None:
            problem = protocol.contract_problem(result)
        if problem is not None:
            return outcome("invalid-result", result, problem)
        return outcome("ok", result, None)
    if returncode == protocol.EXIT_DIVERGED:
        if result is not None and result.get("status") == "diverged":
            error = f"diverged after {result.get('steps')} steps, {result.get('tokens')} tokens"
            return outcome("diverged", result, error)
        return outcome(
            "invalid-result", result, f"exit 3 (diverged) without a diverged result: {problem}"
        )
    if returncode == protocol.EXIT_INTEGRITY:
        # The harness names each check that failed: {"check", "detail"} records.
        violations = ((result or {}).get("integrity") or {}).get("violations")
        why = (
            "; ".join(f"{v.get('check')}: {v.get('detail')}" for v in violations
                      if isinstance(v, dict))
            if violations
            else f"harness: exit 4 without violations ({problem})"
        )
        return outcome("integrity-violation", result, why)
    if watch.oom_line is not None:
        return outcome("oom", None, watch.oom_line[:300])
    if returncode in (128 + signal.SIGTERM, -signal.SIGTERM):
        # train.py ends so on a SIGTERM; we sent none (no timeout, no early stop), and the
        # candidate's workers cannot reach it (their own pid namespace): a stop from outside,
        # a scheduler's or a whole process group's.
        return outcome("lost", None, "ended by SIGTERM from outside: infrastructure")
    if returncode == -signal.SIGKILL:  # we did not send it (no timeout, no early stop)
        if oom_kills_meanwhile == 0:
            return outcome("lost", None, "killed by SIGKILL from outside, not by the kernel's "
                           "OOM killer (its count of kills did not move): infrastructure")
        return outcome("oom", None, "killed by SIGKILL from outside while the kernel's OOM "
                       f"killer killed {oom_kills_meanwhile or 'an unknown number of'} "
                       "process(es)")
    return outcome("crash", None, _crash_message(returncode, watch))


def _read_result(last_line: str, out_path: Path) -> tuple[dict | None, str | None]:
    """The result JSON from the last stdout line, checked against the --out file."""
    try:
        result = json.loads(last_line)
    except ValueError:
        return None, f"the last line of stdout is not JSON: {last_line[:200]!r}"
    if not isinstance(result, dict):
        return None, f"the last line of stdout is JSON but not an object: {last_line[:200]!r}"
    try:
        written = json.loads(out_path.read_text())
    except FileNotFoundError:
        return result, f"train.py printed a result but wrote none to {out_path}"
    except ValueError as e:
        return result, f"{out_path} is not valid JSON: {e}"
    if written != result:
        return result, f"{out_path} differs from the result printed on stdout"
    return result, None


def _crash_message(returncode: int, watch: _Watch) -> str:
    if returncode < 0:
        try:
            head = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            head = f"killed by signal {-returncode}"
    else:
        head = f"exit code {returncode}"
    tail = "\n".join(watch.stderr_tail).strip()
    return f"{head}\n{tail}" if tail else f"{head}, nothing on stderr"
