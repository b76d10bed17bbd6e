"""The runner on small fake train.py scripts, one per outcome (crash, hang, OOM, divergence,
garbage, early stop, ...), the device lock, one real cpu-tiny run of the real harness, and
the engine's other children (agent/child.py run_tool)."""

import dataclasses
import json
import math
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from agent import integrity
from agent.config import SessionConfig
from agent.measure import EARLY_STOP_RUNS, behind_champion, early_stop_rule
from agent.runner import STATUSES, RunSpec, run, run_checked
from bench.locks import device_lock

ROOT = Path(__file__).resolve().parent.parent

# Every fake starts with this: a valid result, and `emit` to write and print it as train.py does.
PREAMBLE = """\
import json, os, signal, subprocess, sys, time
OUT = sys.argv[sys.argv.index("--out") + 1]
RESULT = {
    "schema_version": 3, "status": "ok", "sandbox": True, "preset": "cpu-tiny", "tokens": 4096,
    "tokens_per_sec": 1000.0, "train_seconds": 0.05, "val_loss": 5.5, "val_bpb": 1.9,
    "time_to_target": None, "mfu": None, "peak_memory_bytes": 123,
    "curve": [{"tokens": 4096, "seconds": 4.096, "val_loss": 5.5, "val_bpb": 1.9}],
}
def emit(result, code=0, write=True):
    if write:
        with open(OUT, "w") as f:
            f.write(json.dumps(result, indent=2) + "\\n")
    print(json.dumps(result), flush=True)
    sys.exit(code)
def spawn_sleeper():
    child = subprocess.Popen(["sleep", "1000"])
    with open("child.pid", "w") as f:
        f.write(str(child.pid))
def eval_line(step, tokens, loss, seconds):
    print(f"eval   step {step:5d} | tokens {tokens:>11,} | val loss {loss:.4f} | "
          f"train time {seconds:.1f}s", flush=True)
"""


@pytest.fixture(autouse=True)
def locks_dir(tmp_path, monkeypatch) -> Path:
    locks = tmp_path / "locks"
    monkeypatch.setenv("SPEEDLOOP_LOCKS", str(locks))
    return locks


def fake_spec(tmp_path: Path, body: str, name: str = "wt", **kw) -> RunSpec:
    worktree = tmp_path / name
    worktree.mkdir()
    (worktree / "train.py").write_text(PREAMBLE + textwrap.dedent(body))
    kw.setdefault("timeout_s", 20.0)
    return RunSpec(
        worktree=worktree,
        preset="cpu-tiny",
        seed=0,
        out_path=tmp_path / "out" / f"{name}.json",
        log_path=tmp_path / "logs" / f"{name}.log",
        **kw,
    )


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, just not reaped yet


def assert_group_gone(spec: RunSpec) -> None:
    pid = int((spec.worktree / "child.pid").read_text())
    for _ in range(50):  # the orphaned sleeper is reaped by init asynchronously
        if not alive(pid):
            return
        time.sleep(0.02)
    raise AssertionError(f"the run's child process {pid} outlived the run")


def test_ok_run_parses_the_result_and_logs_both_streams(tmp_path):
    spec = fake_spec(
        tmp_path,
        """
        print("train  step    10 | tokens      20,480 | loss 7.1234 | 9,876 tok/s | 2.1s")
        print("a warning", file=sys.stderr, flush=True)
        emit(RESULT)
        """,
    )
    outcome = run(spec)
    assert outcome.status == "ok", outcome.error
    assert outcome.result["val_loss"] == 5.5 and outcome.error is None
    assert outcome.returncode == 0 and 0 < outcome.wall_seconds < 10
    log = Path(outcome.log_path).read_text()
    assert "train  step    10" in log and "a warning" in log and "[runner] $ " in log
    assert json.loads(json.dumps(dataclasses.asdict(outcome))) == dataclasses.asdict(outcome)


def test_crash_keeps_the_traceback_tail(tmp_path):
    spec = fake_spec(
        tmp_path,
        """
        for i in range(40):
            print(f"noise {i}", file=sys.stderr)
        def step():
            raise RuntimeError("shape mismatch in attention")
        step()
        """,
    )
    outcome = run(spec)
    assert outcome.status == "crash" and outcome.returncode == 1
    assert "RuntimeError: shape mismatch in attention" in outcome.error
    assert "Traceback" in outcome.error and "noise 5" not in outcome.error
    assert outcome.result is None


def test_bad_input_is_a_crash_with_the_message(tmp_path):
    spec = fake_spec(tmp_path, 'print("error: dataset missing", file=sys.stderr); sys.exit(2)')
    outcome = run(spec)
    assert outcome.status == "crash" and outcome.returncode == 2
    assert "error: dataset missing" in outcome.error


def test_timeout_kills_the_whole_process_group(tmp_path):
    spec = fake_spec(
        tmp_path, "spawn_sleeper(); print('started', flush=True); time.sleep(1000)", timeout_s=1.0
    )
    t = time.monotonic()
    outcome = run(spec)
    assert outcome.status == "timeout" and outcome.result is None
    assert time.monotonic() - t < 5
    assert 1.0 <= outcome.wall_seconds < 3
    assert_group_gone(spec)
    log = Path(outcome.log_path).read_text()
    assert "started" in log and "[runner] killed: over the 1 s timeout" in log


def test_a_run_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    body = "signal.signal(signal.SIGTERM, signal.SIG_IGN); spawn_sleeper(); time.sleep(1000)"
    spec = fake_spec(tmp_path, body, timeout_s=1.0, kill_grace_s=0.3)
    outcome = run(spec)
    assert outcome.status == "timeout" and outcome.returncode == -9
    assert_group_gone(spec)


def test_ctrl_c_in_the_runner_still_kills_the_group(tmp_path):
    def interrupt(tokens, seconds, val_loss):
        raise KeyboardInterrupt

    body = "spawn_sleeper(); eval_line(5, 1000, 7.0, 1.0); time.sleep(1000)"
    spec = fake_spec(tmp_path, body, early_stop=interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(spec)
    assert_group_gone(spec)


def test_a_run_dies_with_its_runner_even_by_kill_9(tmp_path):
    """The session killed by SIGKILL runs no cleanup, yet its benchmark dies with it (the
    kernel's parent-death signal): no orphan keeps the device busy under the next run."""
    import os
    import signal
    import subprocess
    import sys

    spec = fake_spec(tmp_path, "open('train.pid', 'w').write(str(os.getpid())); time.sleep(1000)")
    runner = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from agent.runner import RunSpec, run; "
        f"run(RunSpec(Path({str(spec.worktree)!r}), 'cpu-tiny', 0, Path({str(spec.out_path)!r}),"
        f" Path({str(spec.log_path)!r}), 60.0))")], cwd=ROOT, env=os.environ)  # fmt: skip
    pid_file = spec.worktree / "train.pid"
    for _ in range(3000):  # a loaded machine may take a while to start python
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.02)
    child = int(pid_file.read_text())
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    for _ in range(250):
        if not alive(child):
            return
        time.sleep(0.02)
    raise AssertionError(f"train.py ({child}) outlived its runner killed by SIGKILL")


@pytest.mark.parametrize(
    "body, error",
    [
        (
            'print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",'
            " file=sys.stderr); sys.exit(1)",
            "CUDA out of memory",
        ),
        ('print("MemoryError", file=sys.stderr); sys.exit(1)', "MemoryError"),
    ],
    ids=["cuda", "python"],
)
def test_oom(tmp_path, body, error):
    outcome = run(fake_spec(tmp_path, body))
    assert outcome.status == "oom"
    assert error in outcome.error


@pytest.mark.parametrize("counts, status",
                         [((7, 7), "lost"), ((7, 8), "oom"), ((None, None), "oom")],
                         ids=["outside", "oom-killer", "unknown"])
def test_a_sigkill_we_did_not_send_is_the_oom_killer_only_when_it_killed(
        tmp_path, monkeypatch, counts, status):
    """SIGKILL from outside: "oom" when the kernel's count of OOM kills moved during the run
    (or cannot be read), else "lost" (a person, a daemon: not the candidate's failure). The
    count is the kernel's, faked here: no test can make the OOM killer fire."""
    from agent import runner

    told = iter(counts)
    monkeypatch.setattr(runner, "oom_kills", lambda: next(told))
    outcome = run(fake_spec(tmp_path, "os.kill(os.getpid(), signal.SIGKILL)"))
    assert outcome.status == status and outcome.returncode == -9
    assert ("not by the kernel's OOM killer" in outcome.error) == (status == "lost")
    assert "[runner] killed by SIGKILL from outside" in Path(outcome.log_path).read_text()


def test_the_kernels_count_of_oom_kills_is_read_here():
    from agent.runner import oom_kills

    assert isinstance(oom_kills(), int)  # Linux >= 4.13, as on every machine this runs on


def test_diverged(tmp_path):
    body = 'print("diverged at step 20: train loss nan"); emit(dict(RESULT, status="diverged"), 3)'
    outcome = run(fake_spec(tmp_path, body))
    assert outcome.status == "diverged" and outcome.returncode == 3
    assert outcome.result["status"] == "diverged"


def test_exit_3_without_a_diverged_result_is_invalid(tmp_path):
    outcome = run(fake_spec(tmp_path, 'print("bye"); sys.exit(3)'))
    assert outcome.status == "invalid-result" and "not JSON" in outcome.error


def test_integrity_violation(tmp_path):
    found = [{"check": "twins", "detail": "a twin row's log-probabilities moved by 3"},
             {"check": "restore", "detail": "warm-up progress was kept"}]
    result = f'dict(RESULT, status="integrity-violation", integrity={{"violations": {found}}})'
    outcome = run(fake_spec(tmp_path, f"emit({result}, 4)"))
    assert outcome.status == "integrity-violation" and outcome.returncode == 4
    assert outcome.error == ("twins: a twin row's log-probabilities moved by 3; "
                             "restore: warm-up progress was kept")


def test_the_harness_is_told_the_runner_holds_the_lock(tmp_path):
    """train.py takes the device lock itself when run by hand; under the runner, which
    holds it, it must not wait for it."""
    body = 'print(os.environ.get("SPEEDLOOP_LOCK_HELD")); emit(RESULT)'
    outcome = run(fake_spec(tmp_path, body))
    assert outcome.status == "ok"
    assert "cpu\n" in Path(outcome.log_path).read_text()


@pytest.mark.parametrize(
    "body, error",
    [
        ('print("all done, no JSON here")', "not JSON"),
        ('print("[1, 2]")', "not an object"),
        ('r = dict(RESULT); del r["tokens_per_sec"]; emit(r)', "no 'tokens_per_sec'"),
        ('emit(dict(RESULT, val_loss=float("nan")))', "result.val_loss = nan"),
        (
            'emit(dict(RESULT, curve=[dict(RESULT["curve"][0], val_bpb=float("inf"))]))',
            "result.curve[0].val_bpb = inf",
        ),
        ('emit(dict(RESULT, curve=[{"tokens": 1, "seconds": 1.0}]))', "curve row 0"),
        ("emit(dict(RESULT, curve=[]))", "curve is empty"),
        ('emit(dict(RESULT, tokens_per_sec="fast"))', "not of type int or float"),
        ("emit(dict(RESULT, val_loss=True))", "not of type int or float"),
        ('emit(dict(RESULT, sandbox="yes"))', "not of type bool"),
        ("emit(dict(RESULT, schema_version=1))", "schema_version 1"),
        ('emit(dict(RESULT, status="diverged"))', "status is 'diverged'"),
        ("emit(RESULT, write=False)", "wrote none"),
        (
            'open(OUT, "w").write(json.dumps(dict(RESULT, val_loss=1.0)))\n'
            "emit(RESULT, write=False)",
            "differs",
        ),
    ],
    ids=(
        "garbage not-object missing-field nan inf-in-curve bad-curve-row empty-curve wrong-type "
        "bool not-bool schema status no-out-file out-differs"
    ).split(),
)
def test_invalid_result(tmp_path, body, error):
    outcome = run(fake_spec(tmp_path, body))
    assert outcome.status == "invalid-result" and outcome.returncode == 0
    assert error in outcome.error


def test_a_stale_out_file_is_never_read(tmp_path):
    spec = fake_spec(tmp_path, "emit(RESULT, write=False)")
    spec.out_path.parent.mkdir(parents=True)
    spec.out_path.write_text(json.dumps({"status": "ok"}))  # left over from an earlier run
    assert run(spec).status == "invalid-result"


CHAMPION = [{"seconds": float(s), "tokens": 1000 * s, "val_loss": 7.0 - 0.3 * s}
            for s in range(1, 11)]


def test_behind_champion_waits_then_compares_at_equal_time():
    stop = behind_champion(CHAMPION, margin=0.1)
    assert not stop(100, 2.9, 9.9)  # before 30% of the champion's 10 s: too noisy to judge
    assert stop(100, 3.0, 6.2)  # champion 6.1 at 3 s
    assert not stop(100, 3.0, 6.19)
    assert not stop(100, 3.5, 6.04)  # interpolated: champion 5.95 at 3.5 s
    assert stop(100, 3.5, 6.06)
    assert stop(100, 20.0, 4.2) and not stop(100, 20.0, 4.0)  # past its end: its final 4.0
    assert stop(100, 5.0, math.nan)
    with pytest.raises(ValueError):
        behind_champion([], 0.1)


def test_behind_champion_on_tokens_compares_at_equal_tokens():
    """Under the throughput objective the loss test is at equal tokens: a model that is
    behind at equal time but not at equal tokens (slower per token, or a smaller model
    that is faster per token and learns less per second early) is not a clear loser."""
    by_tokens = behind_champion(CHAMPION, margin=0.1, axis="tokens")
    by_seconds = behind_champion(CHAMPION, margin=0.1)
    # Half the champion's speed: at 6 s it has seen 3000 tokens, with the champion's loss there.
    assert not by_tokens(3000, 6.0, 6.1) and by_seconds(3000, 6.0, 6.1)
    assert by_tokens(3000, 6.0, 6.25)  # past the margin at equal tokens
    assert not by_tokens(2900, 1.0, 9.9)  # before 30% of the champion's 10,000 tokens
    with pytest.raises(ValueError, match="axis"):
        behind_champion(CHAMPION, 0.1, axis="steps")


def test_a_run_falling_behind_is_stopped_early(tmp_path):
    body = """
        spawn_sleeper()
        for i in range(1, 11):
            eval_line(5 * i, 1024 * i, 7.0, float(i))  # flat while the champion improves
            time.sleep(0.05)
        time.sleep(1000)
        """
    spec = fake_spec(tmp_path, body, early_stop=behind_champion(CHAMPION, margin=0.1))
    outcome = run(spec)
    assert outcome.status == "early-stopped", outcome.error
    assert outcome.result == {
        "curve": [{"tokens": 1024 * i, "seconds": float(i), "val_loss": 7.0} for i in (1, 2, 3)]
    }
    assert "behind the champion" in outcome.error
    assert_group_gone(spec)


def test_cuda_runs_see_only_their_gpu_and_take_its_lock(tmp_path, locks_dir):
    body = 'emit(dict(RESULT, cvd=os.environ.get("CUDA_VISIBLE_DEVICES"), x=os.environ["X"]))'
    spec = fake_spec(tmp_path, body, device="cuda", gpus=(1,), env={"X": "y"})
    outcome = run(spec)
    assert outcome.status == "ok", outcome.error
    assert outcome.result["cvd"] == "1" and outcome.result["x"] == "y"
    assert (locks_dir / socket.gethostname() / "gpu1.lock").exists()


def test_two_runs_on_one_device_do_not_overlap(tmp_path):
    body = """
        start = time.time(); time.sleep(1.0)
        emit(dict(RESULT, start=start, end=time.time()))
        """
    specs = [fake_spec(tmp_path, body, name=f"wt{i}") for i in range(2)]
    outcomes = [None, None]

    def go(i):
        outcomes[i] = run(specs[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first, second = sorted((o.result for o in outcomes), key=lambda r: r["start"])
    assert first["end"] <= second["start"]
    logs = [Path(o.log_path).read_text() for o in outcomes]
    assert sum("[runner] waited" in log and "cpu.lock" in log for log in logs) == 1


def test_device_lock_names_and_reports_no_wait_when_free(locks_dir):
    with device_lock("cpu") as lock:
        assert lock.path == locks_dir / socket.gethostname() / "cpu.lock"
        assert lock.waited_s == 0.0
    with device_lock("cuda", None) as lock:
        assert lock.path.name == "gpu0.lock"
    with pytest.raises(ValueError, match="unknown device"):
        with device_lock("tpu"):
            pass


def test_statuses_are_the_documented_ones():
    assert set(STATUSES) == {
        "ok", "crash", "timeout", "oom", "diverged", "invalid-result", "integrity-violation",
        "early-stopped", "lost",
    }  # fmt: skip


@pytest.mark.slow
def test_real_cpu_tiny_run(data_cache, tmp_path):
    seen = []

    def watch(tokens, seconds, val_loss):
        seen.append((tokens, val_loss))
        return False

    spec = RunSpec(
        worktree=ROOT,
        preset="cpu-tiny",
        seed=1,
        out_path=tmp_path / "result.json",
        log_path=tmp_path / "run.log",
        timeout_s=300.0,
        extra_args=["--budget-tokens", "4096"],
        env={"SPEEDLOOP_DATA": str(data_cache)},
        early_stop=watch,
    )
    outcome = run(spec)
    assert outcome.status == "ok", outcome.error
    result = outcome.result
    assert result["status"] == "ok" and result["tokens"] >= 4096 and result["seed"] == 1
    assert math.isfinite(result["val_loss"]) and result["curve"]
    # The runner's eval-line parser agrees with the curve train.py reports.
    assert [t for t, _ in seen] == [row["tokens"] for row in result["curve"]]
    assert [round(v, 4) for _, v in seen] == [round(r["val_loss"], 4) for r in result["curve"]]


def test_a_multi_gpu_run_asks_the_harness_for_k_processes_on_its_gpus(tmp_path, locks_dir):
    """nproc > 1: `python train.py ... --nproc K` (the harness runs torchrun inside the
    trainer's sandbox), its K GPUs visible, each of their locks held. A
    stand-in for the interpreter records how it was called, then runs train.py with the
    real one."""
    import stat
    import sys

    python = tmp_path / "python"
    python.write_text(
        f'#!/bin/sh\necho "$@" > launched.txt\n'
        f'while [ "$1" != train.py ]; do shift; done\nexec {sys.executable} "$@"\n'
    )
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    body = """
        launched = open("launched.txt").read().split()
        emit(dict(RESULT, cvd=os.environ.get("CUDA_VISIBLE_DEVICES"), launched=launched))
        """
    extra = ["--budget-tokens", "4096"]
    spec = fake_spec(
        tmp_path, body, device="cuda", gpus=(2, 3), nproc=2, python=str(python), extra_args=extra
    )
    outcome = run(spec)
    assert outcome.status == "ok", outcome.error
    assert outcome.result["launched"] == [
        "train.py", "--preset", "cpu-tiny", "--seed", "0", "--out", str(spec.out_path.resolve()),
        "--nproc", "2", "--budget-tokens", "4096",
    ]  # fmt: skip
    assert outcome.result["cvd"] == "2,3"
    assert {p.name for p in (locks_dir / socket.gethostname()).iterdir()} == \
        {"gpu2.lock", "gpu3.lock"}
    with pytest.raises(ValueError, match="nproc=0"):
        run(dataclasses.replace(spec, nproc=0))


def test_a_single_process_run_is_train_py_itself(tmp_path):
    outcome = run(fake_spec(tmp_path, "emit(dict(RESULT, argv=sys.argv[1:]))"))
    assert outcome.status == "ok"
    assert outcome.result["argv"][:4] == ["--preset", "cpu-tiny", "--seed", "0"]


# -- the engine's other children: child.run_tool --------------------------------------------


def test_a_tool_gets_its_stdin_and_its_output_comes_back(tmp_path):
    from agent.child import run_tool

    done = run_tool(["sh", "-c", "cat; echo err >&2; exit 3"], tmp_path, 20.0, stdin="hello\n")
    assert (done.code, done.out, done.err) == (3, "hello\n", "err\n")
    merged = run_tool(["sh", "-c", "echo out; echo err >&2"], tmp_path, 20.0, merge=True)
    assert merged.code == 0 and merged.out.split() == ["out", "err"] and merged.err == ""
    assert merged.last_lines(1) == "err"


def test_a_tool_past_its_timeout_is_killed_with_its_children(tmp_path):
    from agent.child import run_tool

    script = ("import subprocess, time; p = subprocess.Popen(['sleep', '1000']); "
              "open('child.pid', 'w').write(str(p.pid)); print('started', flush=True); "
              "time.sleep(1000)")
    done = run_tool([sys.executable, "-c", script], tmp_path, 1.0, device="cpu")
    assert done.code is None and "started" in done.out
    pid = int((tmp_path / "child.pid").read_text())
    for _ in range(50):  # the orphaned sleeper is reaped by init asynchronously
        if not alive(pid):
            break
        time.sleep(0.02)
    assert not alive(pid), f"the tool's child process {pid} outlived it"


def test_a_file_missing_on_the_engines_side_is_its_error_not_a_candidates_crash(tmp_path):
    spec = fake_spec(tmp_path, "emit(RESULT)")
    subprocess.run(["git", "init", "-q", str(spec.worktree)], check=True)
    expected = integrity.fixed_hashes(spec.worktree)
    with pytest.raises(FileNotFoundError):
        run_checked(dataclasses.replace(spec, python=str(tmp_path / "no-python")), expected)
    assert run_checked(spec, expected).status == "ok"


def test_the_early_stop_follows_the_champions_latest_runs_not_its_slowest_ever():
    # One champion run met a neighbour's burst (every step took twice as long); the runs
    # since are normal. A screen that falls behind those is stopped, as it was before the
    # burst; against the slow one it would run on.
    def run(slowdown):
        curve = [{"tokens": 1000 * s, "seconds": slowdown * s, "val_loss": 6.0 - 0.1 * s}
                 for s in range(1, 11)]
        return {"status": "ok", "curve": curve}

    config = SessionConfig(objective="time-to-loss")
    loser = (8000, 8.0, 6.0 - 0.07 * 8)  # 0.24 nats behind a normal run at 8 s
    latest = [run(1.0)] * EARLY_STOP_RUNS
    assert early_stop_rule([run(2.0), *latest], config, 0.01)(*loser)
    assert not early_stop_rule([*latest[1:], run(2.0)], config, 0.01)(*loser)


@pytest.mark.parametrize("body", ["os.kill(os.getpid(), signal.SIGTERM)", "sys.exit(143)"],
                         ids=["signal", "train.py's exit"])
def test_a_sigterm_we_did_not_send_is_a_lost_run_not_a_crash(tmp_path, body):
    """A SIGTERM to the whole process group (a scheduler stopping the session) ends train.py
    with 143 (or the signal): the run is lost, made again, never the candidate's crash."""
    outcome = run(fake_spec(tmp_path, body))
    assert outcome.status == "lost" and "SIGTERM from outside" in outcome.error
