"""Reads bench/results/*.jsonl into one list of step records (used by plot.py and make_table.py),
and prints zo2 beside the PyTorch reference measured in the same run:

    python3 bench/bench_results.py FILE.jsonl     # the side-by-side table of one results file

Three step-line formats are understood:
  zo2_bench            {"kind":"config","bench":"zo2_bench",...}       (bench/zo2_bench.cu)
  opt_resident_step    {"kind":"step","config":"opt-1.3b",...}           (the older resident bench)
  offload_step         {"bench":"offload_step","model":...,"step_s":...} (the older offload bench)
and the reference's lines, {"kind":"reference","model":"opt-6.7b","method":"zo2"|"mezo",
"step_s_median":...} (bench/run_reference.py, run by bench/run_gpu.sh beside zo2_bench).
Everything else (timeline, perturb bandwidth, tests, errors, skips) is ignored, apart from the
device name, GEMM rate and pinned bandwidths that env lines give.

Where several records describe the same (device, model, policy, codec, dtype, batch, seq), the
newest wins: zo2_bench lines over the older formats, then the file committed last (git), then the
shorter file name (h100-x.jsonl over h100-x-v1-fullsquare.jsonl).

Speed-ups are computed only from pairs in one file: a zo2 record's reference_s is the step time
of a reference line of the same file, model, batch and sequence length, with the method that
matches its policy (offload: the reference's offloaded ZO2; resident: its MeZO on the GPU). A
record from a file without such a line has reference_s and speedup None: a number measured on
another machine or day is never the denominator (the link alone changes a step by 1.5x).
"""
import glob
import json
import os
import subprocess

# The reference's method that a zo2 policy is compared with.
METHOD_FOR_POLICY = {"offload": "zo2", "resident": "mezo"}

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
    # Offloaded runs with more than the minimum two device slots, or with blocks kept on the
    # device (a GPU budget above the minimum), are different configurations.
    slots = r.get("slots") or 0
    resident = r.get("resident_blocks") or 0
    extras = []
    if r["policy"] == "offload" and slots > 2:
        extras.append(f"{slots} slots")
    if r["policy"] == "offload" and resident > 0:
        extras.append(f"{resident} blocks resident")
    return r["codec"] + (f" ({', '.join(extras)})" if extras else "")


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


def _from_reference(r):
    """A reference line with a step time, as a record (None for a failed or skipped run)."""
    step = _num(r.get("step_s_median"))
    if step is None or not r.get("model") or r.get("method") not in ("zo2", "mezo"):
        return None
    return dict(device=r.get("device"), model=r["model"], method=r["method"], params=_num(r.get("params")),
                dtype=r.get("dtype") or "fp16", batch=r.get("batch") or 1, seq=r.get("seq") or 2048, step_s=step,
                tokens_per_s=_num(r.get("tokens_per_s")), gpu_torch_bytes=_num(r.get("gpu_torch_peak_bytes")),
                gpu_nvml_bytes=_num(r.get("gpu_nvml_used_peak_bytes")), init_s=_num(r.get("init_s")))


def references(path):
    """The reference records of one file, by (model, method, batch, seq); the last line wins."""
    out = {}
    for r in _lines(path):
        if r.get("kind") == "reference":
            rec = _from_reference(r)
            if rec:
                out[(rec["model"], rec["method"], rec["batch"], rec["seq"])] = rec
    return out


def link(path):
    """The link's pinned bandwidths in GB/s from a file's zo2_bench env line (the last one):
    h2d and d2h each alone, bidir_h2d and bidir_d2h with both directions running; None if absent."""
    found = None
    for r in _lines(path):
        if r.get("kind") == "env" and r.get("bench") == "zo2_bench" and _num(r.get("pinned_h2d_GBps")):
            found = dict(device=r.get("device"), h2d=_num(r.get("pinned_h2d_GBps")), d2h=_num(r.get("pinned_d2h_GBps")),
                         bidir_h2d=_num(r.get("pinned_bidir_h2d_GBps")), bidir_d2h=_num(r.get("pinned_bidir_d2h_GBps")))
    return found


def pair(rec, refs):
    """The reference record of `refs` (references() of rec's own file) that rec compares with."""
    method = METHOD_FOR_POLICY.get(rec["policy"])
    return refs.get((rec["model"], method, rec["batch"], rec["seq"])) if method else None


def load(paths=None, device=None):
    """All step records of `paths` (default bench/results/*.jsonl), newest per configuration,
    each with the reference of its own file (reference_s, speedup; None without one)."""
    if not paths:
        paths = sorted(glob.glob(DEFAULT_GLOB))
    records = []
    device_tflops = {}
    refs_of = {}
    for path in paths:
        refs_of[os.path.basename(path)] = references(path)
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
        ref = pair(rec, refs_of.get(rec["file"], {}))
        rec["reference"] = ref
        rec["reference_s"] = ref["step_s"] if ref else None
        rec["reference_gpu_bytes"] = ref["gpu_torch_bytes"] if ref else None
        rec["speedup"] = ref["step_s"] / rec["step_s"] if ref and rec["step_s"] else None
    out.sort(key=lambda r: (r["device"] or "", r["policy"] != "resident", r["params"], r["codec"], r["dtype"]))
    return out


def main_device(records):
    """The device with the most records (the plots and the table show one device)."""
    counts = {}
    for r in records:
        counts[r["device"]] = counts.get(r["device"], 0) + 1
    return max(counts, key=counts.get) if counts else None


# ---- the side-by-side table of one results file ----------------------------------------------------


def _gb(x):
    return "–" if x is None else f"{x / 1e9:.2f}"


def side_by_side(path):
    """Markdown: every zo2 record of `path` that has a reference in the same file, beside it, with
    the link's bandwidths; says so when the file holds no reference (and then shows no speed-up)."""
    name = os.path.basename(path)
    records = [r for r in load([path]) if r["file"] == name]
    refs = references(path)
    bw = link(path)
    device = (bw or {}).get("device") or next((r["device"] for r in records if r["device"]), None) or "?"
    out = [f"Side by side: {name} ({device}); zo2 and the reference measured in this one run."]
    if bw:
        duplex = (f"{bw['bidir_h2d']:.1f} GB/s up + {bw['bidir_d2h']:.1f} GB/s down at once"
                  if bw["bidir_h2d"] and bw["bidir_d2h"] else "not measured")
        out.append(f"Link (pinned): one way {bw['h2d']:.1f} GB/s host-to-device, "
                   f"{bw['d2h']:.1f} GB/s device-to-host; duplex {duplex}.")
    else:
        out.append("Link: no zo2_bench env line in this file (bandwidths unknown).")
    if not refs:
        out.append("No reference run in this file: no speed-ups (bench/run_gpu.sh with ZO2_REFERENCE).")
        return "\n".join(out)
    out += ["", "| model | reference | ref. step s | ref. GPU GB torch / nvml | zo2 policy | codec | dtype "
            "| zo2 step s | zo2 GPU GB own / device | speed-up |",
            "|---|---|---:|---:|---|---|---|---:|---:|---:|"]
    label = {"zo2": "ZO2 offloaded", "mezo": "MeZO on GPU"}
    paired = set()
    for r in records:
        ref = r.get("reference")
        if not ref:
            continue
        paired.add((ref["model"], ref["method"], ref["batch"], ref["seq"]))
        out.append(f"| {r['model']} | {label[ref['method']]} ({ref['dtype']}) | {ref['step_s']:.4g} "
                   f"| {_gb(ref['gpu_torch_bytes'])} / {_gb(ref['gpu_nvml_bytes'])} | {r['policy']} | {r['codec']} "
                   f"| {r['dtype']} | {r['step_s']:.4g} | {_gb(r['gpu_zo2_bytes'])} / {_gb(r['gpu_device_bytes'])} "
                   f"| {r['speedup']:.2f}x |")
    for key, ref in sorted(refs.items()):
        if key not in paired:
            out.append(f"| {ref['model']} | {label[ref['method']]} ({ref['dtype']}) | {ref['step_s']:.4g} "
                       f"| {_gb(ref['gpu_torch_bytes'])} / {_gb(ref['gpu_nvml_bytes'])} | – | – | – | – | – | – |")
    out.append("")
    out.append("Speed-up: the reference's step time over zo2's (same model, batch and sequence length). "
               "GPU memory: the reference's torch-allocated peak / NVML's device use; zo2's own allocations "
               "/ the device's use.")
    return "\n".join(out)


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="zo2 beside the reference measured in the same results file")
    ap.add_argument("files", nargs="+", help="results files (each is its own comparison)")
    args = ap.parse_args(argv)
    for i, path in enumerate(args.files):
        if i:
            print()
        print(side_by_side(path))


if __name__ == "__main__":
    main()
