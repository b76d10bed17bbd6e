"""GPU telemetry (bench/telemetry.py) on the CPU: decoding NVML's clock-event reason masks,
the rule that flags a throttled run, the no-op paths, the contract's check of the field,
and the flag reaching the ledger, the report and status."""

import types

import pytest

from agent.ledger import Ledger
from agent.report import write_report
from agent.rundir import LEDGER_FILE
from agent.status import status_text
from bench import protocol, telemetry
from bench.telemetry import Telemetry, decode_reasons, flagged, throttled


def test_decode_reasons_names_each_bit_and_the_unknown_ones():
    assert decode_reasons(0) == []
    assert decode_reasons(0x1) == ["gpu_idle"]
    assert decode_reasons(0x4 | 0x40) == ["sw_power_cap", "hw_thermal"]
    assert decode_reasons(0x1FF) == list(telemetry.REASON_BITS.values())
    assert decode_reasons(0x200 | 0x8) == ["hw_slowdown", "unknown_0x200"]
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="non-negative int"):
            decode_reasons(bad)


def reading(t: float, mask: int = 0, power: float = 10.0, thermal: float = 0.0) -> dict:
    return {"time": t, "reasons": decode_reasons(mask),
            "violation_s": {"power": power, "thermal": thermal}}


def test_idle_and_boost_reasons_are_not_throttling():
    start, end = [reading(0.0, 0x1 | 0x10)], [reading(60.0, 0x2 | 0x100)]
    assert throttled(start, end) == []


def test_a_thermal_or_power_reason_in_either_sample_flags_the_run():
    assert throttled([reading(0.0, 0x40)], [reading(60.0)]) == ["hw_thermal"]
    assert throttled([reading(0.0)], [reading(60.0, 0x4 | 0x1)]) == ["sw_power_cap"]
    # Two GPUs: the second one throttled.
    assert throttled([reading(0.0), reading(0.0)],
                     [reading(60.0), reading(60.0, 0x80 | 0x20)]) == ["hw_power_brake",
                                                                       "sw_thermal"]


def test_violation_counters_flag_a_run_only_past_their_share_of_the_interval():
    # 60 s between the samples: 0.6 s of power violation is the 1% allowed, 0.7 s is not.
    assert throttled([reading(0.0, power=10.0)], [reading(60.0, power=10.6)]) == []
    assert throttled([reading(0.0, power=10.0)], [reading(60.0, power=10.7)]) == [
        "power_violation"]
    assert throttled([reading(0.0, thermal=1.0)], [reading(60.0, thermal=5.0)]) == [
        "thermal_violation"]
    missing = {"time": 60.0, "reasons": None, "violation_s": {"power": None, "thermal": None}}
    assert throttled([reading(0.0)], [missing]) == []
    with pytest.raises(ValueError, match="1 start samples but 2 end samples"):
        throttled([reading(0.0)], [reading(1.0), reading(1.0)])


def test_telemetry_is_a_no_op_with_a_reason_on_cpu_and_without_nvml(monkeypatch):
    cpu = Telemetry.open("cpu")
    cpu.start()
    cpu.end()
    assert cpu.as_result() == {"source": "nvml", "unavailable": "a cpu run: no GPU to read",
                               "start": [], "end": [], "throttled": []}
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # import pynvml fails
    missing = Telemetry.open("cuda", ["0"]).as_result()
    assert missing["unavailable"] == "NVML is not installed (pip install nvidia-ml-py)"

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")

    broken = Telemetry.open("cuda", ["0"], nvml=types.SimpleNamespace(nvmlInit=no_driver))
    assert broken.as_result()["unavailable"] == "NVML did not start: NVML Shared Library Not Found"


class NotSupported(Exception):
    pass


def fake_nvml(mask: int, power_mw: int, thermal_ns: int) -> types.SimpleNamespace:
    """NVML as pynvml exposes it, for one GPU (NVML is hardware: the one boundary faked)."""

    def unsupported(*args):
        raise NotSupported

    handles = {"GPU-abc": "handle"}
    return types.SimpleNamespace(
        NVML_CLOCK_SM=1, NVML_TEMPERATURE_GPU=0, NVML_PERF_POLICY_POWER=0,
        NVML_PERF_POLICY_THERMAL=1,
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByUUID=lambda uuid: handles[uuid],
        nvmlDeviceGetCurrentClocksEventReasons=lambda h: mask,
        nvmlDeviceGetClockInfo=lambda h, clock: 1755,
        nvmlDeviceGetMaxClockInfo=lambda h, clock: 1980,
        nvmlDeviceGetPowerUsage=lambda h: power_mw,
        nvmlDeviceGetEnforcedPowerLimit=unsupported,
        nvmlDeviceGetTemperature=lambda h, sensor: 71,
        nvmlDeviceGetViolationStatus=lambda h, policy: types.SimpleNamespace(
            violationTime=thermal_ns if policy == 1 else 0),
    )


def test_samples_hold_the_readings_and_none_where_nvml_refuses():
    t = Telemetry.open("cuda", ["GPU-abc"], nvml=fake_nvml(0x40 | 0x1, 650_000, 0))
    t.start()
    t.nvml = fake_nvml(0x1, 700_000, 0)
    t.end()
    out = t.as_result()
    (first,), (last,) = out["start"], out["end"]
    assert first["sm_clock_mhz"] == 1755 and first["max_sm_clock_mhz"] == 1980
    assert first["power_w"] == 650.0 and last["power_w"] == 700.0
    assert first["power_limit_w"] is None  # not supported: recorded as None, no failure
    assert first["temperature_c"] == 71 and first["reasons"] == ["gpu_idle", "hw_thermal"]
    assert out["throttled"] == ["hw_thermal"] and out["unavailable"] is None
    assert protocol.contract_problem(result_with(out)) is None


def result_with(telemetry_field) -> dict:
    return {"schema_version": protocol.SCHEMA_VERSION, "status": "ok", "sandbox": True,
            "tokens_per_sec": 1.0, "train_seconds": 1.0, "val_loss": 5.0,
            "curve": [{"tokens": 1, "seconds": 1.0, "val_loss": 5.0}],
            "telemetry": telemetry_field}


def test_the_contract_takes_results_with_and_without_telemetry():
    good = result_with(Telemetry.open("cpu").as_result())
    assert protocol.contract_problem(good) is None
    del good["telemetry"]  # a result of a harness from before the field
    assert protocol.contract_problem(good) is None
    assert "'telemetry' is [], not of type dict" in protocol.contract_problem(result_with([]))
    bad = result_with({"unavailable": None, "start": [], "end": [], "throttled": "yes"})
    assert "telemetry.throttled is 'yes', not of type list" in protocol.contract_problem(bad)


def test_flagged_reads_a_result_and_tolerates_one_without_telemetry():
    assert flagged(None) == [] and flagged({"status": "crash"}) == []
    assert flagged({"telemetry": {"throttled": ["sw_thermal"]}}) == ["sw_thermal"]


def test_a_throttled_run_is_flagged_in_the_ledger_report_and_status(tmp_path):
    ledger = Ledger(tmp_path / LEDGER_FILE)
    ledger.set_session({"preset": "gpu-small", "objective": "throughput"})
    base = ledger.add_candidate("baseline", parent_id=None, commit_sha="a" * 40)
    for seed, reasons in ((1, []), (2, ["hw_thermal", "sw_power_cap"])):
        run = ledger.start_run(base, "baseline", seed, tmp_path / f"{seed}.log")
        ledger.finish_run(run, "ok", {"status": "ok", "seed": seed, "tokens_per_sec": 1000.0,
                                      "val_loss": 5.0, "train_seconds": 2.0, "curve": [],
                                      "telemetry": {"throttled": reasons}})
    assert [e["text"] for e in ledger.events()] == ["run 2 throttled: hw_thermal, sw_power_cap"]
    ledger.close()
    report = write_report(tmp_path).report.read_text()
    warning = ("**THROTTLED: the GPU slowed down for heat or power in 1 of 2 runs (run 2: "
               "hw_thermal, sw_power_cap)")
    assert warning in report
    assert "THROTTLED: the GPU slowed down" in status_text(tmp_path)
