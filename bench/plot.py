#!/usr/bin/env python3
"""Plots zo2's MeZO step against model size from bench results:

    python3 bench/plot.py [FILES...] [--device H100] [--out-dir bench/results]

  step_time.png   step time vs parameters: zo2 resident and offloaded (per codec), the compute
                  floor (4*params*tokens / measured bf16 GEMM rate), the PCIe floor of the bf16
                  offload (bytes crossing per step / measured pinned bandwidth), and the PyTorch
                  reference (MeZO on GPU, ZO2 offloaded; fp16, batch 1, seq 2048) where it was
                  measured in the same file as the zo2 point it sits beside
  gpu_memory.png  peak GPU memory vs parameters: zo2's allocations and the device's view, for
                  resident and offloaded bf16, and the reference's offloaded (torch-allocated),
                  again only from the same files

FILES default to bench/results/*.jsonl; bench/bench_results.py reads every format committed
there. Needs matplotlib (pip install matplotlib).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_results  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

RESIDENT = "#1f77b4"
OFFLOAD = "#d62728"
CODEC_STYLE = {"bf16": "-", "fp16": (0, (1, 1.5)), "int8": "-.", "fp32": (0, (5, 2))}
CODEC_MARKER = {"bf16": "o", "fp16": "s", "int8": "^", "fp32": "D"}


def params_label(p, _pos=None):
    return f"{p / 1e9:.2f}B" if p >= 1e9 else f"{p / 1e6:.0f}M"


def series(records, **match):
    rows = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    return sorted(rows, key=lambda r: r["params"])


def reference_points(records, method, key):
    """(zo2 params, the paired reference's `key`) for each model whose zo2 record has a reference
    of `method` from its own file (bench_results pairs them); the model's zo2 parameter count
    places it on the axis."""
    points = {}
    for r in records:
        ref = r.get("reference")
        if ref and ref["method"] == method and ref.get(key) is not None:
            points[r["params"]] = ref[key]
    return sorted(points.items())


def setup_axes(ax, records, ylabel):
    ax.set_xscale("log")
    ax.set_yscale("log")
    names = {r["params"]: r["model"] for r in records}
    ticks = sorted(names)
    ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(FuncFormatter(
        lambda p, _pos: names[p].upper().replace("OPT-", "OPT-") + f"\n{params_label(p)}" if p in names else ""))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda *_: ""))
    ax.set_xlabel("model (parameters), log scale")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)


def plot_step_time(records, device, path):
    fig, ax = plt.subplots(figsize=(9, 6.2))
    for policy, color, label in (("resident", RESIDENT, "zo2 resident"), ("offload", OFFLOAD, "zo2 offloaded")):
        for codec in ("bf16", "fp16", "int8", "fp32"):
            rows = series(records, policy=policy, codec=codec)
            if not rows:
                continue
            x = [r["params"] for r in rows]
            y = [r["step_s"] for r in rows]
            lo = [r["step_s"] - (r.get("step_p10") or r["step_s"]) for r in rows]
            hi = [(r.get("step_p90") or r["step_s"]) - r["step_s"] for r in rows]
            name = f"{label}, {codec}" if policy == "offload" else f"{label}, {codec} weights"
            ax.errorbar(x, y, yerr=[lo, hi], color=color, linestyle=CODEC_STYLE[codec], marker=CODEC_MARKER[codec],
                        markersize=5, linewidth=1.6, capsize=2, label=name)
    # Floors: compute (any policy: 4*params*tokens at the measured rate), PCIe for the bf16 offload.
    compute = {}
    for r in records:
        if r["compute_floor_s"]:
            compute[r["params"]] = r["compute_floor_s"]
    if compute:
        xs = sorted(compute)
        ax.plot(xs, [compute[x] for x in xs], color="0.35", linestyle="--", linewidth=1.2,
                label="compute floor (4·params·tokens / bf16 GEMM rate)")
    pcie = series([r for r in records if r["pcie_floor_s"]], policy="offload", codec="bf16")
    if pcie:
        ax.plot([r["params"] for r in pcie], [r["pcie_floor_s"] for r in pcie], color="0.35", linestyle=":",
                linewidth=1.6, label="PCIe floor, bf16 offload (bytes each way / pinned GB/s)")
    for method, marker, style, label in (("mezo", "o", "-", "MeZO on GPU"), ("zo2", "s", "--", "ZO2 offloaded")):
        ref = reference_points(records, method, "step_s")
        if ref:
            ax.plot(*zip(*ref), color="black", marker=marker, markerfacecolor="white", linestyle=style, linewidth=1.0,
                    label=f"reference (PyTorch) {label}, fp16, same run")
    setup_axes(ax, records, "seconds per MeZO step (batch 1 × 2048 tokens; median, p10–p90)")
    ax.set_title(f"MeZO-SGD step time vs model size — {device}", fontsize=11)
    ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_gpu_memory(records, device, path):
    fig, ax = plt.subplots(figsize=(9, 6.2))
    for policy, color in (("resident", RESIDENT), ("offload", OFFLOAD)):
        for codec in ("bf16", "int8"):
            rows = series(records, policy=policy, codec=codec)
            if policy == "resident" and codec != "bf16":
                continue
            if not rows:
                continue
            x = [r["params"] for r in rows]
            zo2 = [(r["params"], r["gpu_zo2_bytes"] / 1e9) for r in rows if r["gpu_zo2_bytes"]]
            dev = [(r["params"], r["gpu_device_bytes"] / 1e9) for r in rows if r["gpu_device_bytes"]]
            old = any(r["format"] != "zo2_bench" for r in rows)
            what = "allocations"
            tag = f"zo2 {'resident' if policy == 'resident' else 'offloaded'}, {codec}"
            if zo2:
                ax.plot(*zip(*zo2), color=color, linestyle=CODEC_STYLE[codec], marker=CODEC_MARKER[codec],
                        markersize=5, linewidth=1.6, label=f"{tag}: {what}{' (policy only: older format)' if old else ''}")
            if dev:
                ax.plot(*zip(*dev), color=color, linestyle=CODEC_STYLE[codec], marker=CODEC_MARKER[codec],
                        markerfacecolor="white", markersize=6, linewidth=0.9, alpha=0.8,
                        label=f"{tag}: device-seen{' (drop in free)' if old and policy == 'offload' else ''}")
            del x
    ref = [(p, b / 1e9) for p, b in reference_points(records, "zo2", "gpu_torch_bytes")]
    if ref:
        ax.plot(*zip(*ref), color="black", marker="s", markerfacecolor="white", linestyle="--", linewidth=1.0,
                label="reference (PyTorch) ZO2 offloaded, fp16: torch-allocated, same run")
    weights = sorted({r["params"] for r in records})
    ax.plot(weights, [2 * p / 1e9 for p in weights], color="0.5", linestyle=":", linewidth=1.2,
            label="one 16-bit copy of the weights")
    setup_axes(ax, records, "peak GPU memory, GB (1e9 bytes)")
    ax.set_title(f"GPU memory vs model size — {device}", fontsize=11)
    ax.legend(fontsize=8, loc="upper left", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="results files (default: bench/results/*.jsonl)")
    ap.add_argument("--device", default=None, help="substring of the device name (default: the most common)")
    ap.add_argument("--out-dir", default=os.path.join(bench_results.HERE, "results"))
    args = ap.parse_args()
    records = bench_results.load(args.files)
    if not records:
        sys.exit("plot.py: no step records found")
    device = args.device or bench_results.main_device(records)
    records = [r for r in records if device.lower() in (r["device"] or "").lower()]
    os.makedirs(args.out_dir, exist_ok=True)
    step_png = os.path.join(args.out_dir, "step_time.png")
    mem_png = os.path.join(args.out_dir, "gpu_memory.png")
    plot_step_time(records, device, step_png)
    plot_gpu_memory(records, device, mem_png)
    print(f"{step_png}\n{mem_png}\n({len(records)} records, {device}, from "
          f"{', '.join(sorted({r['file'] for r in records}))})")


if __name__ == "__main__":
    main()
