"""Check greend's GPU energy against the device's own NVML counter, on a machine with an NVIDIA GPU.

Runs a PyTorch matrix-product loop on one GPU under `greend measure` and compares the job's GPU
energy with the device's total-energy counter read by the load itself, from the moment its CUDA
context exists (the job holds the GPU) to the end of the load. Also reports the counter read around
the whole `greend measure` run (which includes time when no process held the GPU: greend leaves that
unattributed by design) and the per-call latency of the NVML calls greend makes on every tick.

    python bench/gpu_check.py --out gpu_check.json [--seconds 45] [--gpu 0]

PASS: the job's GPU energy is within 2 % of the device counter over the job's hold. Without an
NVIDIA driver, a GPU or PyTorch it says "skipped" and exits 0. Finishes in under 3 minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOLERANCE = 0.02
LATENCY_CALLS = 300

# The load: create the CUDA context, note the device counter, multiply matrices for N seconds,
# note the counter again. Arguments: UUID, seconds, path of the JSON it writes.
LOAD = r"""
import json, sys, time
import pynvml, torch
uuid, seconds, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByUUID(uuid)
dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
torch.cuda.synchronize()
e0, t0 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h), time.time()
n = 0
while time.time() - t0 < seconds:
    for _ in range(20):
        c = a @ b
    torch.cuda.synchronize()
    n += 20
e1, t1 = pynvml.nvmlDeviceGetTotalEnergyConsumption(h), time.time()
json.dump({"e_start_mj": e0, "e_end_mj": e1, "t_start": t0, "t_end": t1, "matmuls": n,
           "dtype": str(dtype), "torch": torch.__version__}, open(out, "w"))
"""


def emit(result: dict, out: str | None) -> None:
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")


def skipped(reason: str, out: str | None) -> int:
    print(f"gpu_check: skipped: {reason}")
    emit({"status": "skipped", "reason": reason}, out)
    return 0


def latency(fn, *args) -> dict:
    import pynvml

    times = []
    for _ in range(LATENCY_CALLS):
        t0 = time.perf_counter_ns()
        try:
            fn(*args)
        except pynvml.NVMLError_NotFound:
            pass  # no samples since the timestamp: the call still cost what it cost
        times.append((time.perf_counter_ns() - t0) / 1000)
    times.sort()
    return {"calls": len(times), "mean_us": statistics.fmean(times),
            "p99_us": times[int(0.99 * (len(times) - 1))], "max_us": times[-1]}


def greend_command() -> list[str]:
    exe = shutil.which("greend")
    if exe:
        return [exe]
    return [sys.executable, "-m", "greend.cli"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results as JSON to this file")
    ap.add_argument("--seconds", type=float, default=45.0, help="length of the GPU load (30-60)")
    ap.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to load")
    args = ap.parse_args()
    args.seconds = min(max(args.seconds, 5.0), 90.0)

    try:
        import pynvml
    except ImportError:
        return skipped("nvidia-ml-py (pynvml) is not installed", args.out)
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return skipped(f"no NVIDIA driver ({e})", args.out)
    try:
        count = pynvml.nvmlDeviceGetCount()
        if count == 0:
            return skipped("NVML sees no GPU", args.out)
        if importlib.util.find_spec("torch") is None:
            return skipped("PyTorch is not importable here, so there is no GPU load to measure; "
                           "install torch with CUDA support to run the check", args.out)
        if not 0 <= args.gpu < count:
            print(f"gpu_check: FAIL: --gpu {args.gpu}: NVML sees GPUs 0..{count - 1}")
            return 1
        return check(args, pynvml)
    finally:
        pynvml.nvmlShutdown()


def check(args, pynvml) -> int:
    h = pynvml.nvmlDeviceGetHandleByIndex(args.gpu)
    uuid, model = str(pynvml.nvmlDeviceGetUUID(h)), str(pynvml.nvmlDeviceGetName(h))
    result: dict = {
        "gpu": {"index": args.gpu, "uuid": uuid, "model": model,
                "driver": str(pynvml.nvmlSystemGetDriverVersion())},
        "seconds": args.seconds,
    }
    try:
        pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    except pynvml.NVMLError_NotSupported:
        print(f"gpu_check: FAIL: {model} has no NVML energy counter (pre-Volta): there is nothing to "
              "compare greend's integrated power with on this machine")
        result.update(status="FAIL", reason="no energy counter on this GPU")
        emit(result, args.out)
        return 1

    tmp = Path(tempfile.mkdtemp(prefix="greend-gpu-check-"))
    report, marks = tmp / "measure.json", tmp / "load.json"
    cmd = [*greend_command(), "measure", "--json", "--no-ledger", "-o", str(report), "--",
           sys.executable, "-c", LOAD, uuid, str(args.seconds), str(marks)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=uuid, CUDA_DEVICE_ORDER="PCI_BUS_ID")
    e_before = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    t_begin = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # Per-call latency of what greend calls each tick, measured while the load runs.
    time.sleep(min(10.0, args.seconds / 3))
    ts = int(time.time() * 1e6) - 1_000_000
    result["nvml_latency"] = {
        "nvmlDeviceGetTotalEnergyConsumption": latency(pynvml.nvmlDeviceGetTotalEnergyConsumption, h),
        "nvmlDeviceGetPowerUsage": latency(pynvml.nvmlDeviceGetPowerUsage, h),
        "nvmlDeviceGetProcessUtilization": latency(pynvml.nvmlDeviceGetProcessUtilization, h, ts),
    }
    try:
        output, _ = proc.communicate(timeout=args.seconds + 110)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        output += "\n(killed: greend measure ran too long)"
    e_after = pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
    result["wall_s"] = time.monotonic() - t_begin
    result["greend_exit"] = proc.returncode
    if output.strip():
        result["greend_output_tail"] = output[-2000:]

    try:
        measured = json.loads(report.read_text())
        load = json.loads(marks.read_text())
    except (OSError, ValueError) as e:
        print(f"gpu_check: FAIL: no result from greend measure or from the load ({e})")
        print(output[-2000:])
        result.update(status="FAIL", reason=f"no result: {e}")
        emit(result, args.out)
        return 1

    job_j = measured["energy_j"]["gpu"]
    hold_j = (load["e_end_mj"] - load["e_start_mj"]) / 1000
    around_j = (e_after - e_before) / 1000
    rel = (job_j - hold_j) / hold_j if hold_j > 0 else float("inf")
    prov = measured.get("provenance", {}).get("gpu", "")
    ok = abs(rel) <= TOLERANCE and prov.startswith("measured: NVML")
    result.update({
        "status": "PASS" if ok else "FAIL",
        "job_gpu_energy_j": job_j,
        "device_energy_during_hold_j": hold_j,
        "device_energy_around_measure_j": around_j,
        "relative_difference": rel,
        "tolerance": TOLERANCE,
        "gpu_provenance": prov,
        "load": load,
        "greend_elapsed_s": measured.get("elapsed_s"),
    })
    emit(result, args.out)
    shutil.rmtree(tmp, ignore_errors=True)

    hold_s = load["t_end"] - load["t_start"]
    print(f"GPU {args.gpu}: {model} ({uuid}), driver {result['gpu']['driver']}")
    print(f"load: {load['matmuls']} matrix products ({load['dtype']}) in {hold_s:.1f} s, "
          f"mean {hold_j / hold_s:.0f} W")
    print(f"device counter while the job held the GPU: {hold_j:10.1f} J")
    print(f"greend: the job's GPU energy:               {job_j:10.1f} J  ({rel * 100:+.2f} %)")
    print(f"device counter around greend measure:      {around_j:10.1f} J  "
          f"(includes start-up with no process on the GPU, left unattributed)")
    print(f"provenance: {prov}")
    for name, lat in result["nvml_latency"].items():
        print(f"latency {name}: mean {lat['mean_us']:.1f} us, p99 {lat['p99_us']:.1f} us "
              f"({lat['calls']} calls)")
    print(f"gpu_check: {result['status']} (job within {TOLERANCE:.0%} of the device counter: "
          f"{'yes' if abs(rel) <= TOLERANCE else 'no'}; measured provenance: "
          f"{'yes' if prov.startswith('measured: NVML') else 'no'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
