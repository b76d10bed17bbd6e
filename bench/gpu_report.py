"""The one table `make gpu-check` prints at its end, from what bench/gpu_check.py collected:
each step's outcome and time, the gpu-small runs (speed, loss, the untimed breakdown, the
GPU's telemetry), and the kernel benchmarks (pytest-benchmark's JSON) as one row per op
and pass: the triton kernel's time and rate, and its speedup over torch eager and over
torch.compile of the reference.

Plain functions of JSON-like values, so the table is tested on the CPU with results made
there. Never imports torch, the surface or the engine.
"""

from __future__ import annotations

from collections import defaultdict


def kernel_rows(bench_json: dict) -> list[dict]:
    """One row per (op, shape, pass) of a pytest-benchmark JSON of tests/bench_kernels.py:
    the median seconds of each implementation and the triton kernel's extra_info."""
    groups: dict[tuple, dict] = defaultdict(dict)
    for b in bench_json.get("benchmarks", []):
        info = b.get("extra_info") or {}
        if not {"op", "shape", "pass", "impl"} <= info.keys():
            raise ValueError(f"benchmark {b.get('name')!r} has no op/shape/pass/impl in its "
                             "extra_info: not a run of tests/bench_kernels.py")
        row = groups[(info["op"], info["shape"], info["pass"])]
        row.setdefault("op", info["op"])
        row.setdefault("shape", info["shape"])
        row.setdefault("pass", info["pass"])
        row[info["impl"]] = b["stats"]["median"]
        row[f"{info['impl']}_info"] = info
    return list(groups.values())


def _rate(info: dict) -> str:
    if info.get("gb_per_s") is not None:
        return f"{info['gb_per_s']:,.0f} GB/s"
    if info.get("tflop_per_s") is not None:
        return f"{info['tflop_per_s']:,.1f} TFLOP/s"
    return "rate n/a"


def kernel_text(row: dict) -> str:
    """`triton 0.123 ms (1,234 GB/s); 1.80x eager, 1.10x compile (compiled in 4.2 s)`."""
    if "triton" not in row:
        return "no triton timing"
    t = row["triton"]
    parts = [f"triton {t * 1e3:.3f} ms ({_rate(row['triton_info'])})"]
    for impl in ("eager", "compile"):
        if impl in row:
            parts.append(f"{row[impl] / t:.2f}x {impl}")
    text = parts[0] + ("; " + ", ".join(parts[1:]) if parts[1:] else "")
    compiled = (row.get("compile_info") or {}).get("first_call_s")
    return text + (f" (compiled in {compiled:.1f} s)" if compiled is not None else "")


def _gpu(samples: list[dict]) -> str:
    if not samples:
        return "n/a"
    s = samples[0]
    clock, temp, power = s.get("sm_clock_mhz"), s.get("temperature_c"), s.get("power_w")
    return (f"{clock if clock is not None else '?'} MHz {temp if temp is not None else '?'} C "
            f"{f'{power:.0f}' if power is not None else '?'} W")


def run_text(result: dict) -> str:
    """A gpu-small result in one cell: speed, loss, memory, the untimed seconds, the GPU's
    state at the clock's start and end, and whether it throttled."""
    mfu = f"{result['mfu']:.1%}" if result.get("mfu") is not None else "n/a"
    peak = (result.get("peak_memory_bytes") or 0) / 2**30
    untimed = result.get("untimed") or {}
    twins = all(t.get("ok") for t in result.get("twins") or [])
    tel = result.get("telemetry") or {}
    if tel.get("unavailable"):
        gpu = f"telemetry n/a ({tel['unavailable']})"
    else:
        throttled = ", ".join(tel.get("throttled") or []) or "no"
        gpu = (f"GPU {_gpu(tel.get('start') or [])} -> {_gpu(tel.get('end') or [])}, "
               f"throttled {throttled}")
    return (f"{result['tokens_per_sec']:,.0f} tok/s, MFU {mfu}, val loss "
            f"{result['val_loss']:.3f}, {result.get('steps')} steps, peak {peak:.1f} GiB; "
            f"untimed s: startup (build, compile, warm-up) {untimed.get('startup', 0):.1f}, "
            f"eval {untimed.get('evaluation', 0):.1f}, other {untimed.get('other', 0):.1f}; "
            f"logits via {result.get('logits_via')}, twins ok {twins}; {gpu}")


def table(check: dict) -> str:
    """The markdown table of a gpu-check: {"machine": {...}, "steps": [{"name", "status",
    "seconds", "detail"}], "runs": {kernels: result}, "kernels": pytest-benchmark JSON}."""
    m = check.get("machine") or {}
    lines = [f"gpu-check: {m.get('gpu')} | torch {m.get('torch')} | triton {m.get('triton')} "
             f"| sandbox {m.get('sandbox')} | data {m.get('data')}", "",
             "| check | result | s |", "| --- | --- | ---: |"]
    runs = check.get("runs") or {}
    for step in check.get("steps") or []:
        detail = step.get("detail") or ""
        if step["status"] == "ok" and step["name"].startswith("gpu-small "):
            detail = run_text(runs[step["name"].split()[-1]])
        status = "" if step["status"] == "ok" else f"{step['status'].upper()}: "
        lines.append(f"| {step['name']} | {status}{detail} | {step['seconds']:.0f} |")
    if "triton" in runs and "torch" in runs:
        ratio = runs["triton"]["tokens_per_sec"] / runs["torch"]["tokens_per_sec"]
        lines.append(f"| triton / torch tokens/s | {ratio:.3f}x | |")
    for row in kernel_rows(check.get("kernels") or {}):
        lines.append(f"| {row['op']} {row['pass']} [{row['shape']}] | {kernel_text(row)} | |")
    total = sum(step["seconds"] for step in check.get("steps") or [])
    lines.append(f"| total | | {total:.0f} |")
    return "\n".join(lines)
