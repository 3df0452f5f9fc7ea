#!/usr/bin/env python3
"""Measures the PyTorch reference (ZO2 and MeZO) with its own timing harness, for a side-by-side
comparison with zo2_bench in one results file (bench/run_gpu.sh runs it; see docs/benchmarks.md):

    python3 bench/run_reference.py REFERENCE_DIR [--runs opt_6_7b:zo2,opt_1_3b:zo2] [--steps 10]
                                   [--budget-s 200] [--device NAME] >> results.jsonl

REFERENCE_DIR holds the reference's harness, zo2_bench.py, next to the PyTorch ZO2 it imports
(../shared/reference/ copied into the checkout, e.g. .reference/). The qwen3_* models go through
its Hugging Face path instead, timed by bench/reference_hf.py at the same protocol (it needs
transformers 4.51: bench/reference_wheels.sh puts the wheels in .whl/, to be carried). Each run is one
`python3 REFERENCE_DIR/zo2_bench.py --model M --method zo2|zo --steps N` (fp16, batch 1,
seq 2048, random tokens: the protocol of zo2_bench's reference set), in its own process, bounded
by what is left of --budget-s; a run whose estimated time does not fit is skipped. Every run
prints one JSON line on stdout:

    {"kind":"reference","model":"opt-6.7b","method":"zo2"|"mezo","step_s_median":..,
     "tokens_per_s":..,"gpu_torch_peak_bytes":..,"gpu_nvml_used_peak_bytes":..,"init_s":..,...}

(model in zo2_bench's names; method "zo2" is the offloaded ZO2, "mezo" MeZO with every weight on
the GPU), or the same keys without a step time and with "rc" and "error" when it failed, timed out
or was skipped. Progress goes to stderr.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

# The harness's config names and zo2_bench's, with the parameter counts that size the time
# estimate (initialisation on the host is most of a run: ~80 s at 6.7B on 16 cores).
MODELS = {
    "opt_125m": ("opt-125m", 0.125e9),
    "opt_350m": ("opt-350m", 0.35e9),
    "opt_1_3b": ("opt-1.3b", 1.3e9),
    "opt_2_7b": ("opt-2.7b", 2.7e9),
    "opt_6_7b": ("opt-6.7b", 6.7e9),
    "opt_13b": ("opt-13b", 13e9),
    "opt_30b": ("opt-30b", 30e9),
    "opt_66b": ("opt-66b", 66e9),
    # Its Hugging Face Qwen3 path, timed by bench/reference_hf.py (transformers 4.51 from .whl/).
    "qwen3_8b": ("qwen3-8b", 8.19e9),
    "qwen3_32b": ("qwen3-32b", 32.8e9),
}
HF_HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_hf.py")
METHODS = {"zo2": "zo2", "zo": "mezo", "mezo": "mezo"}  # harness --method -> reported method
DEFAULT_RUNS = "opt_6_7b:zo2,opt_1_3b:zo2"


def estimate_s(params, method, steps):
    """Seconds a run should take: python + torch start, init at ~12 s per 1e9 parameters, the
    move to the GPU for MeZO, and the steps (~0.06 s per 1e9 parameters for ZO2 on a fast link)."""
    init = 15 + 12 * params / 1e9
    move = 2 * params / 1e9 if method == "mezo" else 0
    return init + move + steps * (0.08 * params / 1e9 + 0.01)


def parse_runs(text):
    runs = []
    for piece in filter(None, (p.strip() for p in text.replace(" ", ",").split(","))):
        model, _, method = piece.partition(":")
        method = method or "zo2"
        if model not in MODELS:
            sys.exit(f"run_reference.py: unknown model '{model}' (known: {', '.join(MODELS)})")
        if method not in METHODS:
            sys.exit(f"run_reference.py: unknown method '{method}' in '{piece}' (zo2, zo or mezo)")
        runs.append((model, method))
    return runs


def result_line(base, stdout):
    """The harness's RESULT {json} line, as our reference line (None when there is none)."""
    found = None
    for line in stdout.splitlines():
        m = re.match(r"^RESULT (\{.*\})\s*$", line)
        if m:
            try:
                found = json.loads(m.group(1))
            except json.JSONDecodeError:
                pass
    if found is None or not isinstance(found.get("step_s_median"), (int, float)):
        return None
    d = dict(base)
    d.update(
        dtype=found.get("dtype"), batch=found.get("batch"), seq=found.get("seq"), params=found.get("params"),
        step_s_median=found["step_s_median"], tokens_per_s=found.get("tok_s"), init_s=found.get("init_s"),
        gpu_torch_peak_bytes=int(found["torch_max_alloc_MB"] * 2**20) if "torch_max_alloc_MB" in found else None,
        gpu_nvml_used_peak_bytes=int(found["nvml_used_MB"] * 2**20) if "nvml_used_MB" in found else None,
        loss=found.get("loss"), amp=found.get("amp"), rc=0)
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference_dir")
    ap.add_argument("--runs", default=os.environ.get("ZO2_REFERENCE_RUNS", DEFAULT_RUNS),
                    help=f"MODEL:METHOD list, in order (default {DEFAULT_RUNS}; env ZO2_REFERENCE_RUNS)")
    ap.add_argument("--steps", type=int, default=10, help="steps per run (the median of the last half is kept)")
    ap.add_argument("--budget-s", type=float, default=200, help="seconds for all runs together")
    ap.add_argument("--device", default="", help="the GPU's name, copied into each line")
    ap.add_argument("--python", default=sys.executable or "python3", help="the Python that has torch")
    ap.add_argument("--log-dir", default="", help="keep each run's output here")
    args = ap.parse_args()

    harness = os.path.join(args.reference_dir, "zo2_bench.py")
    t0 = time.time()
    for model, method in parse_runs(args.runs):
        name, params = MODELS[model]
        base = {"kind": "reference", "bench": "run_gpu", "harness": "zo2_bench.py", "device": args.device,
                "model": name, "reference_model": model, "method": METHODS[method], "steps": args.steps}
        left = args.budget_s - (time.time() - t0)
        need = estimate_s(params, METHODS[method], args.steps)
        if not os.path.isfile(harness):
            print(json.dumps(dict(base, rc=-1, error=f"no {harness}")), flush=True)
            continue
        if need > left:
            print(json.dumps(dict(base, rc=-1, error="budget", estimate_s=round(need), left_s=round(left))), flush=True)
            print(f"reference {model} {method}: skipped (estimate {need:.0f} s, {left:.0f} s left)", file=sys.stderr)
            continue
        cmd = [args.python, harness, "--model", model, "--method", "zo" if METHODS[method] == "mezo" else "zo2",
               "--steps", str(args.steps)]
        if model.startswith("qwen3"):
            cmd[1:2] = [HF_HARNESS, "--reference", args.reference_dir]
        print(f"reference {model} {method}: {' '.join(cmd)} (estimate {need:.0f} s, {left:.0f} s left)",
              file=sys.stderr, flush=True)
        start = time.time()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, left))
            rc, out, err = p.returncode, p.stdout, p.stderr
        except subprocess.TimeoutExpired as e:
            rc = 124
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        elapsed = time.time() - start
        if args.log_dir:
            os.makedirs(args.log_dir, exist_ok=True)
            with open(os.path.join(args.log_dir, f"reference-{model}-{method}.log"), "w") as f:
                f.write(f"$ {' '.join(cmd)}\nrc={rc} elapsed={elapsed:.1f} s\n--- stdout\n{out}\n--- stderr\n{err}")
        line = result_line(base, out) if rc == 0 else None
        if line is None:
            tail = " | ".join((err or out).strip().splitlines()[-3:])[-400:]
            line = dict(base, rc=rc if rc != 0 else -2,
                        error=("timeout" if rc == 124 else "no RESULT line" if rc == 0 else "exit") + (": " + tail if tail else ""))
        line["elapsed_s"] = round(elapsed, 1)
        print(json.dumps(line), flush=True)
        summary = (f"{line['step_s_median']} s/step, {line.get('tokens_per_s')} tokens/s, torch peak "
                   f"{(line.get('gpu_torch_peak_bytes') or 0) / 1e9:.2f} GB" if "step_s_median" in line
                   else line.get("error"))
        print(f"reference {model} {method}: {summary} ({elapsed:.0f} s)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
