#!/usr/bin/env python3
"""Prints a Markdown scaling table of zo2's MeZO step from bench results (for the README and
docs/benchmarks.md):

    python3 bench/make_table.py [FILES...] [--device H100]

FILES default to bench/results/*.jsonl (zo2_bench lines and the older opt_resident_step /
offload_step formats; bench/bench_results.py says which record wins where several match).
Columns: model, policy, codec (what rests on the host and crosses PCIe; resident: the master's
precision), dtype of the forward, step time (median, and p10-p90 where recorded), tokens/s, GPU
memory (zo2's allocations / the device's view), the floor (the larger of the compute floor
4*params*tokens/GEMM rate and the PCIe floor), the ratio to it, the PyTorch reference's step time
(MeZO on GPU for resident, ZO2 offloaded for offload; fp16, batch 1, seq 2048) and the speed-up.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_results  # noqa: E402


def fmt_s(x):
    return "–" if x is None else f"{x:.3g}"


def fmt_gb(x):
    return "–" if x is None else f"{x / 1e9:.2f}"


def fmt_params(p):
    return f"{p / 1e9:.2f} B" if p >= 1e9 else f"{p / 1e6:.0f} M"


def table(records):
    rows = ["| model | params | policy | codec | dtype | step s (p10–p90) | tokens/s | GPU GB zo2 / device "
            "| floor s | ratio | reference s | speed-up |",
            "|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        spread = ""
        if r.get("step_p10") is not None and r.get("step_p90") is not None:
            spread = f" ({fmt_s(r['step_p10'])}–{fmt_s(r['step_p90'])})"
        floor = "–" if r["floor_s"] is None else f"{fmt_s(r['floor_s'])} {r['floor_kind']}"
        ratio = "–" if r["ratio"] is None else f"{r['ratio']:.2f}"
        ref = "–" if r["reference_s"] is None else fmt_s(r["reference_s"])
        speed = "–" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        tps = "–" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:,.0f}"
        mem = f"{fmt_gb(r['gpu_zo2_bytes'])} / {fmt_gb(r['gpu_device_bytes'])}"
        if r["format"] != "zo2_bench":
            mem += " *"
        rows.append(f"| {r['model']} | {fmt_params(r['params'])} | {r['policy']} | {r['codec']} | {r['dtype']} "
                    f"| {fmt_s(r['step_s'])}{spread} | {tps} | {mem} | {floor} | {ratio} | {ref} | {speed} |")
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="results files (default: bench/results/*.jsonl)")
    ap.add_argument("--device", default=None, help="substring of the device name (default: the most common)")
    args = ap.parse_args()
    records = bench_results.load(args.files)
    if not records:
        sys.exit("make_table.py: no step records in " + (" ".join(args.files) or bench_results.DEFAULT_GLOB))
    device = args.device or bench_results.main_device(records)
    records = [r for r in records if device.lower() in (r["device"] or "").lower()]
    files = sorted({r["file"] for r in records})
    print(f"Device: {device}. Sources: {', '.join(files)}.\n")
    print(table(records))
    notes = []
    if any(r["format"] != "zo2_bench" for r in records):
        notes.append("\\* older bench formats: the zo2 column counts the policy's memory only (masters, "
                     "scratch, slots; not the model's activations and workspace); for offload_step the device "
                     "column is the drop in free memory during the steps, not the absolute use.")
    if any(r["reference_s"] for r in records):
        notes.append("Reference: the PyTorch ZO2 (fp16, batch 1, seq 2048) measured in the same file "
                     "(bench/run_reference.py); its GPU memory is torch-allocated.")
    if notes:
        print()
        for n in notes:
            print(n + "\n")


if __name__ == "__main__":
    main()
