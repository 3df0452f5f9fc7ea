#!/usr/bin/env python3
"""bench/bench_results.py's pairing of zo2 with the reference, and bench/run_reference.py, on
small synthetic results files (CTest: bench_results, when a python3 is found):

  - a speed-up is the reference's step time over zo2's, from a reference line of the same file,
    model, batch and sequence length, with the method matching the policy (offload: zo2,
    resident: mezo);
  - a record whose own file holds no such line has none, even when another file does (the
    newest record of a configuration wins, and brings only its own file's reference);
  - failed reference runs (no step time) pair with nothing;
  - the side-by-side table prints the link's one-way and duplex bandwidths, and says there are
    no speed-ups when the file has no reference run;
  - slots and resident blocks beyond the minimum make a configuration of their own;
  - run_reference.py turns the harness's RESULT line into a reference line, and skips a run that
    does not fit its time budget.
"""
import json
import os
import subprocess
import sys
import tempfile
import time
import unittest

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench")
sys.path.insert(0, BENCH)
import bench_results  # noqa: E402
import run_reference  # noqa: E402

DEVICE = "NVIDIA H100 80GB HBM3"
ENV = {"kind": "env", "bench": "zo2_bench", "device": DEVICE, "gemm_tflops": 700.0, "pinned_h2d_GBps": 55.2,
       "pinned_d2h_GBps": 54.1, "pinned_bidir_h2d_GBps": 36.3, "pinned_bidir_d2h_GBps": 35.9}


def config(model, policy, codec, step, params=6658473984, seq=2048, dtype="bf16"):
    return {"kind": "config", "bench": "zo2_bench", "device": DEVICE, "model": model, "params": params,
            "policy": policy, "codec": codec, "dtype": dtype, "batch": 1, "seq": seq, "step_s_median": step,
            "tokens_per_s": 2048 / step, "gpu_zo2_peak_bytes": 2.4e9, "gpu_device_used_peak_bytes": 3.0e9,
            "compute_floor_s": 0.07, "pcie_floor_s": 0.25 if policy == "offload" else 0.0}


def reference(model, method, step, seq=2048, **extra):
    d = {"kind": "reference", "bench": "run_gpu", "device": DEVICE, "model": model, "method": method,
         "dtype": "fp16", "batch": 1, "seq": seq, "params": 6658473984, "step_s_median": step,
         "tokens_per_s": 2048 / step if step else None, "gpu_torch_peak_bytes": 2.5e9, "gpu_nvml_used_peak_bytes": 3.4e9}
    d.update(extra)
    return d


class Pairing(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()

    def tearDown(self):
        self.dir.cleanup()

    def write(self, name, lines, mtime):
        path = os.path.join(self.dir.name, name)
        with open(path, "w") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")
        os.utime(path, (mtime, mtime))  # outside git, a file's age is its mtime
        return path

    def by_key(self, records):
        return {(r["model"], r["policy"], r["codec"]): r for r in records}

    def test_pairs_come_from_one_file(self):
        t = time.time() - 1000
        a = self.write("a.jsonl", [
            ENV,
            reference("opt-6.7b", "zo2", 0.4),
            reference("opt-6.7b", "mezo", 0.3),
            reference("opt-13b", "zo2", None, rc=124, error="timeout"),  # failed: no step time
            config("opt-6.7b", "offload", "bf16", 0.2),
            config("opt-6.7b", "resident", "bf16", 0.1),
            config("opt-13b", "offload", "bf16", 0.6, params=12853473280),
            config("opt-1.3b", "offload", "bf16", 0.05, seq=1024, params=1315758080),
        ], t)
        recs = self.by_key(bench_results.load([a]))
        self.assertAlmostEqual(recs[("opt-6.7b", "offload", "bf16")]["speedup"], 2.0)
        self.assertAlmostEqual(recs[("opt-6.7b", "offload", "bf16")]["reference_s"], 0.4)
        self.assertAlmostEqual(recs[("opt-6.7b", "resident", "bf16")]["speedup"], 3.0)
        self.assertIsNone(recs[("opt-13b", "offload", "bf16")]["speedup"])  # its reference failed
        self.assertIsNone(recs[("opt-1.3b", "offload", "bf16")]["speedup"])  # no reference of that model
        self.assertEqual(recs[("opt-6.7b", "offload", "bf16")]["reference_gpu_bytes"], 2.5e9)

        # A newer file without reference lines: its records win, and carry no speed-up, although
        # a.jsonl holds a reference for the same configuration.
        b = self.write("b.jsonl", [ENV, config("opt-6.7b", "offload", "bf16", 0.19)], t + 100)
        recs = self.by_key(bench_results.load([a, b]))
        newest = recs[("opt-6.7b", "offload", "bf16")]
        self.assertEqual(newest["file"], "b.jsonl")
        self.assertIsNone(newest["reference_s"])
        self.assertIsNone(newest["speedup"])
        self.assertAlmostEqual(recs[("opt-6.7b", "resident", "bf16")]["speedup"], 3.0)  # still a.jsonl's

    def test_no_reference_means_no_speedup(self):
        path = self.write("old.jsonl", [ENV, config("opt-6.7b", "offload", "bf16", 0.28),
                                        config("opt-125m", "resident", "bf16", 0.004, params=125239296)], time.time())
        for r in bench_results.load([path]):
            self.assertIsNone(r["reference_s"])
            self.assertIsNone(r["speedup"])
        text = bench_results.side_by_side(path)
        self.assertIn("No reference run in this file", text)
        self.assertNotIn("x |", text)
        self.assertIn("one way 55.2 GB/s host-to-device, 54.1 GB/s device-to-host", text)
        self.assertIn("duplex 36.3 GB/s up + 35.9 GB/s down", text)

    def test_side_by_side_table(self):
        path = self.write("run.jsonl", [
            ENV, reference("opt-6.7b", "zo2", 0.368), reference("opt-1.3b", "zo2", 0.118, params=1315758080),
            config("opt-6.7b", "offload", "bf16", 0.2944), config("opt-6.7b", "offload", "int8", 0.184)], time.time())
        text = bench_results.side_by_side(path)
        self.assertIn("duplex 36.3 GB/s up + 35.9 GB/s down", text)
        rows = [line for line in text.splitlines() if line.startswith("| opt-")]
        self.assertEqual(len(rows), 3, text)  # two pairs, and the 1.3B reference with no zo2 beside it
        self.assertTrue(any("| bf16 |" in r and "| 1.25x |" in r for r in rows), text)
        self.assertTrue(any("| int8 |" in r and "| 2.00x |" in r for r in rows), text)
        self.assertTrue(any(r.startswith("| opt-1.3b |") and r.endswith("| – |") for r in rows), text)
        # The command-line form prints the same.
        out = subprocess.run([sys.executable, os.path.join(BENCH, "bench_results.py"), path], capture_output=True,
                             text=True, check=True).stdout
        self.assertEqual(out.strip(), text.strip())

    def test_slots_and_resident_blocks_are_their_own_rows(self):
        three = dict(config("opt-6.7b", "offload", "int8", 0.15), slots=3, resident_blocks=3)
        twelve = dict(config("opt-6.7b", "offload", "int8", 0.136), slots=3, resident_blocks=12)
        path = self.write("budget.jsonl", [ENV, reference("opt-6.7b", "zo2", 0.39),
                                           config("opt-6.7b", "offload", "int8", 0.16), three, twelve], time.time())
        recs = self.by_key(bench_results.load([path]))
        self.assertAlmostEqual(recs[("opt-6.7b", "offload", "int8")]["step_s"], 0.16)
        self.assertAlmostEqual(recs[("opt-6.7b", "offload", "int8 (3 slots, 3 blocks resident)")]["step_s"], 0.15)
        self.assertAlmostEqual(recs[("opt-6.7b", "offload", "int8 (3 slots, 12 blocks resident)")]["speedup"],
                               0.39 / 0.136)


class RunReference(unittest.TestCase):
    def test_result_line(self):
        base = {"kind": "reference", "model": "opt-6.7b", "method": "zo2"}
        stdout = "loading\nRESULT " + json.dumps({
            "model": "opt_6_7b", "method": "zo2", "dtype": "fp16", "batch": 1, "seq": 2048, "params": 6658473984,
            "init_s": 81.2, "step_s_median": 0.368, "tok_s": 5565.2, "torch_max_alloc_MB": 2384,
            "nvml_used_MB": 3240, "loss": 10.9}) + "\n"
        line = run_reference.result_line(base, stdout)
        self.assertEqual(line["step_s_median"], 0.368)
        self.assertEqual(line["gpu_torch_peak_bytes"], 2384 * 2**20)
        self.assertEqual(line["seq"], 2048)
        self.assertIsNone(run_reference.result_line(base, "Traceback ...\n"))
        self.assertEqual(run_reference.parse_runs("opt_6_7b:zo2, opt_1_3b:zo"),
                         [("opt_6_7b", "zo2"), ("opt_1_3b", "zo")])

    def test_runs_the_harness_within_its_budget(self):
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "zo2_bench.py"), "w") as f:
                f.write("import json, sys\n"
                        "a = dict(zip(sys.argv[1::2], sys.argv[2::2]))\n"
                        "print('RESULT ' + json.dumps(dict(model=a['--model'], method=a['--method'], dtype='fp16', "
                        "batch=1, seq=2048, params=125239296, init_s=1.0, step_s_median=0.05, tok_s=40960.0, "
                        "torch_max_alloc_MB=800, nvml_used_MB=1200, loss=10.0)))\n")
            out = subprocess.run([sys.executable, os.path.join(BENCH, "run_reference.py"), d, "--runs",
                                  "opt_125m:zo2,opt_125m:zo,opt_66b:zo2", "--budget-s", "100", "--steps", "4",
                                  "--device", DEVICE], capture_output=True, text=True, check=True).stdout
            lines = [json.loads(x) for x in out.splitlines()]
            self.assertEqual([x["method"] for x in lines], ["zo2", "mezo", "zo2"])
            self.assertEqual(lines[0]["model"], "opt-125m")
            self.assertEqual(lines[0]["step_s_median"], 0.05)
            self.assertEqual(lines[1]["step_s_median"], 0.05)
            self.assertEqual(lines[2]["error"], "budget")  # 66B does not initialise in 100 s
            self.assertNotIn("step_s_median", lines[2])
            path = os.path.join(d, "r.jsonl")
            with open(path, "w") as f:
                f.write(json.dumps(ENV) + "\n" + out + json.dumps(config("opt-125m", "offload", "bf16", 0.025,
                                                                        params=125239296)) + "\n")
            (rec,) = bench_results.load([path])
            self.assertAlmostEqual(rec["speedup"], 2.0)


if __name__ == "__main__":
    unittest.main(verbosity=2)
