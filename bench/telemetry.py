"""GPU telemetry of a run through NVML: SM clock, power, temperature and the clock-event
(throttle) reasons at the start and the end of the timed region, and whether the GPU was
throttled by heat or power while it ran.

train.py samples every GPU of a CUDA run just before its clock starts and just after it
stops, and writes `telemetry` into the result (bench/protocol.py). A run that throttled
is flagged there (`throttled`: the reasons, empty when none); the engine records the flag
in the ledger and the report shows it, because a throttled GPU times a candidate slower
than the GPU is. On the CPU, or without NVML (the `nvidia-ml-py` package, `pynvml`), or
when NVML cannot start, telemetry is a no-op that says why.

What this module must never do: fail a run. A reading NVML refuses is recorded as None.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

# NVML's clock-event reason bits (nvmlClocksEventReason*; "throttle reasons" in older NVML).
REASON_BITS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clocks",
}
# The reasons that slow a busy GPU down by heat or power. Idle, application clocks, sync
# boost and display clocks are not throttling: an idle GPU between runs reports gpu_idle.
THROTTLING = ("sw_power_cap", "hw_slowdown", "sw_thermal", "hw_thermal", "hw_power_brake")
# A violation counter (time spent held below the requested clocks by power or heat) that
# grows by more than this share of the time between the samples flags the run: a short
# power-cap touch at the start of a heavy kernel is normal on an H100.
VIOLATION_SHARE = 0.01
VIOLATIONS = ("power", "thermal")  # NVML_PERF_POLICY_POWER, NVML_PERF_POLICY_THERMAL


def decode_reasons(mask: int) -> list[str]:
    """The names of the bits set in an NVML clock-event reason mask, lowest bit first; a bit
    this table does not know is named by its value (`unknown_0x200`)."""
    if isinstance(mask, bool) or not isinstance(mask, int) or mask < 0:
        raise ValueError(f"a clock-event reason mask is a non-negative int, not {mask!r}")
    names, bit = [], 1
    while bit <= mask:
        if mask & bit:
            names.append(REASON_BITS.get(bit, f"unknown_{bit:#x}"))
        bit <<= 1
    return names


def throttled(start: Sequence[dict], end: Sequence[dict]) -> list[str]:
    """The flagging rule: why a run with these samples (one per GPU, in the same order) was
    throttled, or [] when it was not. A thermal or power reason in either sample flags it,
    and so does a power or thermal violation counter that grew by more than VIOLATION_SHARE
    of the time between the samples (`power_violation`, `thermal_violation`)."""
    if len(start) != len(end):
        raise ValueError(f"{len(start)} start samples but {len(end)} end samples")
    found: set[str] = set()
    for before, after in zip(start, end):
        for s in (before, after):
            found.update(r for r in s.get("reasons") or () if r in THROTTLING)
        elapsed = (after.get("time") or 0.0) - (before.get("time") or 0.0)
        for kind in VIOLATIONS:
            was = (before.get("violation_s") or {}).get(kind)
            now = (after.get("violation_s") or {}).get(kind)
            if was is not None and now is not None and elapsed > 0 and \
                    now - was > VIOLATION_SHARE * elapsed:
                found.add(f"{kind}_violation")
    return sorted(found)


def flagged(result: dict | None) -> list[str]:
    """A result's throttle flag: the reasons its run was throttled, [] when it was not or
    when the result has no telemetry (a CPU run, NVML missing, an older harness)."""
    telemetry = (result or {}).get("telemetry")
    if not isinstance(telemetry, dict):
        return []
    reasons = telemetry.get("throttled") or []
    return [str(r) for r in reasons] if isinstance(reasons, list) else []


def _read(call, *args):
    """One NVML reading, or None where this GPU or driver does not give it."""
    try:
        return call(*args)
    except Exception:  # noqa: BLE001 - pynvml.NVMLError_NotSupported and friends
        return None


def sample(nvml, handle) -> dict:
    """One GPU's readings now: SM clock (MHz), power and its limit (W), temperature (C), the
    clock-event reasons (mask and names) and the power and thermal violation time (s)."""
    reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        nvml.nvmlDeviceGetCurrentClocksThrottleReasons  # its name before NVML 12.2
    mask = _read(reasons, handle)
    power = _read(nvml.nvmlDeviceGetPowerUsage, handle)  # mW
    limit = _read(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)  # mW
    policies = {"power": nvml.NVML_PERF_POLICY_POWER, "thermal": nvml.NVML_PERF_POLICY_THERMAL}
    violation = {}
    for kind, policy in policies.items():
        v = _read(nvml.nvmlDeviceGetViolationStatus, handle, policy)
        violation[kind] = None if v is None else v.violationTime / 1e9  # ns
    return {
        "time": time.time(),
        "sm_clock_mhz": _read(nvml.nvmlDeviceGetClockInfo, handle, nvml.NVML_CLOCK_SM),
        "max_sm_clock_mhz": _read(nvml.nvmlDeviceGetMaxClockInfo, handle, nvml.NVML_CLOCK_SM),
        "power_w": None if power is None else power / 1000,
        "power_limit_w": None if limit is None else limit / 1000,
        "temperature_c": _read(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
        "reasons_mask": mask,
        "reasons": None if mask is None else decode_reasons(mask),
        "violation_s": violation,
    }


def visible_gpus(n: int) -> list[str]:
    """How NVML finds the run's first n CUDA devices: their UUIDs (torch's numbering follows
    CUDA_VISIBLE_DEVICES, NVML's does not), else the entries of CUDA_VISIBLE_DEVICES, else
    the indices 0..n-1."""
    import torch

    ids = []
    for i in range(n):
        uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
        if uuid is None:
            break
        text = str(uuid)
        ids.append(text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}")
    if len(ids) == n:
        return ids
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
    return visible[:n] if len(visible) >= n else [str(i) for i in range(n)]


class Telemetry:
    """The start and end samples of one run's GPUs, or the reason there are none.

    `Telemetry.open(device_type, gpu_ids)` starts NVML (gpu_ids: from `visible_gpus`);
    `start()` and `end()` sample; `as_result()` is the result's `telemetry` field."""

    def __init__(self, nvml, handles: list, unavailable: str | None):
        self.nvml, self.handles, self.unavailable = nvml, handles, unavailable
        self.start_samples: list[dict] = []
        self.end_samples: list[dict] = []

    @classmethod
    def open(cls, device_type: str, gpu_ids: Sequence[str] = (), nvml=None) -> Telemetry:
        if device_type != "cuda":
            return cls(None, [], f"a {device_type} run: no GPU to read")
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                return cls(None, [], "NVML is not installed (pip install nvidia-ml-py)")
        try:
            nvml.nvmlInit()
            handles = [nvml.nvmlDeviceGetHandleByUUID(g) if not g.isdigit()
                       else nvml.nvmlDeviceGetHandleByIndex(int(g)) for g in gpu_ids]
        except Exception as e:  # noqa: BLE001 - no driver, no permission, an unknown GPU
            return cls(None, [], f"NVML did not start: {e}")
        return cls(nvml, handles, None)

    def start(self) -> None:
        self.start_samples = [sample(self.nvml, h) for h in self.handles]

    def end(self) -> None:
        self.end_samples = [sample(self.nvml, h) for h in self.handles]

    def as_result(self) -> dict:
        """{"source", "unavailable", "start", "end", "throttled"}: the samples per GPU."""
        done = bool(self.start_samples) and len(self.end_samples) == len(self.start_samples)
        return {
            "source": "nvml",
            "unavailable": self.unavailable,
            "start": self.start_samples,
            "end": self.end_samples,
            "throttled": throttled(self.start_samples, self.end_samples) if done else [],
        }

    def close(self) -> None:
        if self.nvml is not None:
            _read(self.nvml.nvmlShutdown)
