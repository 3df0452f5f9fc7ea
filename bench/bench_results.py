"""Reads bench/results/*.jsonl into one list of step records (used by plot.py and make_table.py).

Three line formats are understood:
  zo2_bench            {"kind":"config","bench":"zo2_bench",...}       (bench/zo2_bench.cu)
  opt_resident_step    {"kind":"step","config":"opt-1.3b",...}           (the older resident bench)
  offload_step         {"bench":"offload_step","model":...,"step_s":...} (the older offload bench)
Everything else (env, timeline, perturb bandwidth, tests, errors, skips) is ignored, apart from
the device name and GEMM rate that older files give on lines of their own.

Where several records describe the same (device, model, policy, codec, dtype, batch, seq), the
newest wins: zo2_bench lines over the older formats, then the file committed last (git), then the
shorter file name (h100-x.jsonl over h100-x-v1-fullsquare.jsonl).
"""
import glob
import json
import os
import subprocess

# The reference implementation (ZO2, PyTorch; H100 80GB; fp16, batch 1, seq 2048), from the
# design notes (ARCHITECTURE.md, "The numbers to beat"): params, MeZO on GPU s/step, ZO2
# offloaded s/step, ZO2 GPU memory (torch-allocated; "GB" read as 1e9 bytes).
REFERENCE = {
    "opt-125m": {"params": 125239296, "mezo_gpu_s": 0.040, "zo2_offload_s": 0.041, "zo2_gpu_bytes": 0.8e9},
    "opt-1.3b": {"params": 1315758080, "mezo_gpu_s": 0.077, "zo2_offload_s": 0.118, "zo2_gpu_bytes": 1.5e9},
    "opt-6.7b": {"params": 6658473984, "mezo_gpu_s": 0.323, "zo2_offload_s": 0.450, "zo2_gpu_bytes": 2.5e9},
}

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_GLOB = os.path.join(HERE, "results", "*.jsonl")


def _commit_time(path):
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%ct", "--", os.path.basename(path)],
                             cwd=os.path.dirname(os.path.abspath(path)), capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return int(out.stdout.strip())
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return int(os.path.getmtime(path))


def _lines(path):
    with open(path) as f:
        for raw in f:
            raw = raw.strip()
            if not raw.startswith("{"):
                continue
            try:
                yield json.loads(raw)
            except json.JSONDecodeError:
                continue


def _num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _codec_label(r):
    # Offloaded runs with more than the minimum two device slots are a different configuration.
    slots = r.get("slots") or 0
    return r["codec"] + (f" ({slots} slots)" if r["policy"] == "offload" and slots > 2 else "")


def _from_zo2_bench(r):
    return dict(
        device=r.get("device"), model=r["model"], params=r["params"], policy=r["policy"], codec=_codec_label(r),
        dtype=r["dtype"], batch=r.get("batch", 1), seq=r.get("seq", 2048),
        step_s=r["step_s_median"], step_p10=_num(r.get("step_s_p10")), step_p90=_num(r.get("step_s_p90")),
        tokens_per_s=r.get("tokens_per_s"), timed_steps=r.get("timed_steps"),
        gpu_zo2_bytes=_num(r.get("gpu_zo2_peak_bytes")), gpu_zo2_kind="zo2 allocations (peak)",
        gpu_device_bytes=_num(r.get("gpu_device_used_peak_bytes")), gpu_device_kind="cudaMemGetInfo used (peak)",
        gpu_nvml_bytes=_num(r.get("gpu_nvml_used_peak_bytes")),
        host_peak_rss_bytes=_num(r.get("host_peak_rss_bytes")),
        compute_floor_s=_num(r.get("compute_floor_s")), pcie_floor_s=_num(r.get("pcie_floor_s")),
        gemm_tflops=_num(r.get("gemm_tflops")), pinned_h2d_GBps=_num(r.get("pinned_h2d_GBps")),
        format="zo2_bench")


def _from_resident_step(r, device, tflops):
    return dict(
        device=device, model=r["config"], params=r["params"], policy="resident", codec=r["dtype"], dtype=r["dtype"],
        batch=r.get("batch", 1), seq=r.get("seq", 2048), step_s=r["step_s_median"], step_p10=None, step_p90=None,
        step_min=_num(r.get("step_s_min")), step_max=_num(r.get("step_s_max")),
        tokens_per_s=r.get("tokens_per_s"), timed_steps=r.get("timed_steps"),
        gpu_zo2_bytes=_num(r.get("policy_device_bytes")), gpu_zo2_kind="policy only (masters + scratch)",
        gpu_device_bytes=_num(r.get("peak_gpu_used_bytes")), gpu_device_kind="cudaMemGetInfo used (peak)",
        gpu_nvml_bytes=None, host_peak_rss_bytes=_num(r.get("host_peak_rss_bytes")),
        compute_floor_s=_num(r.get("floor_s")), pcie_floor_s=0.0,
        gemm_tflops=_num(r.get("gemm_tflops_measured")) or tflops, pinned_h2d_GBps=None,
        format="opt_resident_step")


def _from_offload_step(r, device):
    return dict(
        device=r.get("device", device), model=r["model"], params=int(r["params"]), policy="offload", codec=r["codec"],
        dtype="bf16", batch=r.get("batch", 1), seq=r.get("seq", 2048), step_s=r["step_s"], step_p10=None,
        step_p90=None, step_min=_num(r.get("step_s_min")), tokens_per_s=r.get("tokens_per_s"), timed_steps=None,
        gpu_zo2_bytes=_num(r.get("policy_device_bound_bytes")), gpu_zo2_kind="policy only (plan bound)",
        gpu_device_bytes=_num(r.get("peak_gpu_bytes")), gpu_device_kind="cudaMemGetInfo drop during steps",
        gpu_nvml_bytes=None, host_peak_rss_bytes=_num(r.get("host_rss_peak_bytes")),
        compute_floor_s=None, pcie_floor_s=_num(r.get("pcie_floor_s")), gemm_tflops=None,
        pinned_h2d_GBps=_num(r.get("pinned_h2d_GBps")), format="offload_step")


def load(paths=None, device=None):
    """All step records of `paths` (default bench/results/*.jsonl), newest per configuration."""
    if not paths:
        paths = sorted(glob.glob(DEFAULT_GLOB))
    records = []
    device_tflops = {}
    for path in paths:
        device, tflops = None, None
        rows = list(_lines(path))
        for r in rows:  # device and GEMM rate lines of the older formats
            if r.get("kind") == "device":
                device = r.get("name")
            elif r.get("bench") == "offload_env":
                device = r.get("device")
            elif r.get("kind") == "gemm_rate":
                tflops = r.get("tflops")
            elif r.get("kind") == "env" and r.get("bench") == "zo2_bench":
                device, tflops = r.get("device"), r.get("gemm_tflops")
        if device and tflops:
            device_tflops.setdefault(device, tflops)
        stamp = _commit_time(path)
        for r in rows:
            rec = None
            if r.get("variant"):  # an experiment beside the defaults (e.g. a compile-time knob)
                continue
            if r.get("kind") == "config" and r.get("bench") == "zo2_bench":
                rec, rank = _from_zo2_bench(r), 2
            elif r.get("kind") == "step" and "config" in r and "step_s_median" in r:
                rec, rank = _from_resident_step(r, device, tflops), 1
            elif r.get("bench") == "offload_step" and "step_s" in r:
                rec, rank = _from_offload_step(r, device), 1
            if rec is None:
                continue
            rec["file"] = os.path.basename(path)
            rec["_key"] = (rank, stamp, -len(os.path.basename(path)))
            records.append(rec)
    # Older offload lines carry no compute floor: 4 * params * tokens at the device's GEMM rate.
    for rec in records:
        if rec["compute_floor_s"] is None:
            rate = rec.get("gemm_tflops") or device_tflops.get(rec["device"])
            if rate:
                rec["gemm_tflops"] = rate
                rec["compute_floor_s"] = 4.0 * rec["params"] * rec["batch"] * rec["seq"] / (rate * 1e12)
    best = {}
    for rec in records:
        k = (rec["device"], rec["model"], rec["policy"], rec["codec"], rec["dtype"], rec["batch"], rec["seq"])
        if k not in best or rec["_key"] > best[k]["_key"]:
            best[k] = rec
    out = list(best.values())
    if device:
        out = [r for r in out if device.lower() in (r["device"] or "").lower()]
    for rec in out:
        floors = [x for x in (rec["compute_floor_s"], rec["pcie_floor_s"]) if x]
        rec["floor_s"] = max(floors) if floors else None
        rec["floor_kind"] = None if not floors else (
            "pcie" if (rec["pcie_floor_s"] or 0) > (rec["compute_floor_s"] or 0) else "compute")
        rec["ratio"] = rec["step_s"] / rec["floor_s"] if rec["floor_s"] else None
        ref = REFERENCE.get(rec["model"]) if rec["batch"] == 1 and rec["seq"] == 2048 else None
        rec["reference_s"] = None
        if ref:
            rec["reference_s"] = ref["mezo_gpu_s"] if rec["policy"] == "resident" else ref["zo2_offload_s"]
        rec["speedup"] = rec["reference_s"] / rec["step_s"] if rec["reference_s"] else None
    out.sort(key=lambda r: (r["device"] or "", r["policy"] != "resident", r["params"], r["codec"], r["dtype"]))
    return out


def main_device(records):
    """The device with the most records (the plots and the table show one device)."""
    counts = {}
    for r in records:
        counts[r["device"]] = counts.get(r["device"], 0) + 1
    return max(counts, key=counts.get) if counts else None
