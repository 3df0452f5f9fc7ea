#!/usr/bin/env python3
"""Data-parallel zo2 scaling model: tokens/s for N = 1..64 GPUs from a measured single-GPU step.

In data-parallel ZO (issue 18) every rank runs the whole step on its shard and only the step's
scalars cross (2q + 2 doubles, ~32-272 bytes): the weights never do. So the per-step cost of N
GPUs over one is

    t(N) = max(t_step, host-bound(N)) * (1 + straggle(N)) + t_allreduce(N) + t_check / K + t_host

  t_step          the measured single-GPU step at the per-GPU batch (weak scaling: each GPU keeps
                  its batch, the global batch grows with N; --step-time, or --model from the
                  README's H200 table)
  straggle(N)     every step waits for the slowest rank: with step times of relative spread
                  sigma (--jitter), E[max of N] ~ 1 + sigma * sqrt(2 ln N)
  t_allreduce(N)  one small all-reduce, latency-bound (bandwidth is irrelevant at this size,
                  counted anyway): a tree over the GPUs of a node (NVLink) and, past one node, a
                  tree over the nodes (2 log2(nodes) network hops each way)
                    intra-node: t_nv(g) = --allreduce-us (measured at 2 GPUs) * (1 + 0.5 log2(g / 2))
                    inter-node: + 2 * ceil(log2(nodes)) * (--hop-us + bytes / link bandwidth)
  t_check / K     the replica check (a parameter hash, one more tiny all-reduce) every K steps
  host-bound      offloaded runs only: the node's GPUs share ONE pinned host master, so each step
                  reads g * --host-bytes-per-step bytes (g GPUs of the node each upload every block)
                  and writes them back once (the update is the same on every GPU) through the
                  host's memory bandwidth (--host-bandwidth-gbs); the step is the slower of the GPU
                  step and that
  t_host          the reduction's host-side cost per step (copies of the scalars, polling; --host-us)

Assumptions (defaults; pass measured values instead): NCCL's small all-reduce on NVLink 10 us at
2 GPUs (--allreduce-us), 3 us per network hop (--hop-us: NIC + switch + software, the same for
100 and 400 Gb/s: at this size the link rate does not matter), step-time jitter 1%, replica check
every 1000 steps costing one parameter download at 25 GB/s (--check-s), 8 GPUs per node, host
memory bandwidth for the uploads 200 GB/s (--host-bandwidth-gbs). None of these is measured on
this machine (no GPU here): docs/benchmarks.md says which come from where.

    python3 bench/scaling_model.py --model opt-1.3b-resident
    python3 bench/scaling_model.py --step-time 0.0247 --tokens-per-step 2048 --allreduce-us 12 --json
"""
import argparse
import json
import math

# Single-GPU steps measured by bench/run_gpu.sh (README, H200, batch 1 x 2048 tokens, bf16).
MEASURED = {
    "opt-125m-resident": (0.00432, 2048, None, 0.125e9),
    "opt-1.3b-resident": (0.0247, 2048, None, 1.3e9),
    "opt-6.7b-resident": (0.113, 2048, None, 6.7e9),
    "opt-13b-resident": (0.222, 2048, None, 13e9),
    # Offloaded: bytes each GPU reads from the host master per step (bf16 weights, one pass).
    "opt-6.7b-offload-bf16": (0.280, 2048, 6.7e9 * 2, 6.7e9),
    "opt-13b-offload-bf16": (0.605, 2048, 13e9 * 2, 13e9),
    "opt-30b-offload-bf16": (1.22, 2048, 30e9 * 2, 30e9),
}

FABRICS = {
    # name: (inter-node link in Gb/s or None for NVLink-only)
    "nvlink": None,
    "100g": 100.0,
    "400g": 400.0,
}


def allreduce_us(n, gpus_per_node, base_us, hop_us, link_gbps, payload_bytes):
    g = min(n, gpus_per_node)
    t = 0.0 if n == 1 else base_us * (1.0 + 0.5 * math.log2(max(g, 2) / 2.0))
    nodes = math.ceil(n / gpus_per_node)
    if nodes > 1:
        per_hop = hop_us + (payload_bytes * 8.0 / (link_gbps * 1e9)) * 1e6
        t += 2 * math.ceil(math.log2(nodes)) * per_hop
    return t


def model(args, n, fabric):
    link = FABRICS[fabric]
    if fabric == "nvlink" and n > args.gpus_per_node:
        return None  # one node only
    step = args.step_time
    if args.host_bytes_per_step:
        host_s = (min(n, args.gpus_per_node) + 1) * args.host_bytes_per_step / (args.host_bandwidth_gbs * 1e9)
        step = max(step, host_s)
    straggle = args.jitter * math.sqrt(2.0 * math.log(n)) if n > 1 else 0.0
    payload = 8 * (2 * args.queries + 2)
    ar = allreduce_us(n, args.gpus_per_node, args.allreduce_us, args.hop_us, link or 400.0, payload) * 1e-6
    host = args.host_us * 1e-6 if n > 1 else 0.0
    check = (args.check_s + ar) / args.check_every if n > 1 and args.check_every else 0.0
    t = step * (1.0 + straggle) + ar + host + check
    tps = n * args.tokens_per_step / t
    ideal = n * args.tokens_per_step / args.step_time
    return {"gpus": n, "fabric": fabric, "step_s": t, "allreduce_us": ar * 1e6, "tokens_per_s": tps,
            "efficiency": tps / ideal, "overhead_pct": 100.0 * (t / args.step_time - 1.0)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MEASURED), help="take the step time from the README's H200 table")
    p.add_argument("--step-time", type=float, help="measured single-GPU step time, seconds")
    p.add_argument("--tokens-per-step", type=float, default=2048, help="tokens per GPU per step")
    p.add_argument("--queries", type=int, default=1, help="queries per step (payload 2q + 2 doubles)")
    p.add_argument("--allreduce-us", type=float, default=10.0, help="small all-reduce on 2 GPUs of a node, us")
    p.add_argument("--hop-us", type=float, default=3.0, help="latency of one network hop between nodes, us")
    p.add_argument("--host-us", type=float, default=15.0,
                   help="host-side cost of the reduction per step (copies of the scalars, polling), us")
    p.add_argument("--jitter", type=float, default=0.01, help="relative spread of a rank's step time")
    p.add_argument("--check-every", type=int, default=1000, help="replica check period, steps (0: never)")
    p.add_argument("--check-s", type=float, default=None, help="cost of one replica check, s")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--host-bytes-per-step", type=float, default=0.0,
                   help="offloaded: bytes each GPU reads from the shared host master per step")
    p.add_argument("--host-bandwidth-gbs", type=float, default=200.0,
                   help="offloaded: the node's host-memory bandwidth available to the uploads, GB/s")
    p.add_argument("--max-gpus", type=int, default=64)
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    args = p.parse_args()
    params = 1.3e9
    if args.model:
        step, tokens, host_bytes, params = MEASURED[args.model]
        args.step_time = args.step_time or step
        args.tokens_per_step = tokens
        if host_bytes and not args.host_bytes_per_step:
            args.host_bytes_per_step = host_bytes
    if not args.step_time:
        p.error("give --step-time (or --model)")
    if args.check_s is None:
        args.check_s = params * 4 / 25e9  # download fp32 parameters at 25 GB/s and hash them
    counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= args.max_gpus]
    rows = [r for f in FABRICS for n in counts if (r := model(args, n, f))]
    if args.json:
        for r in rows:
            print(json.dumps({"kind": "scaling_model", "step_time_1gpu_s": args.step_time, **r}))
        return
    print(f"single-GPU step {args.step_time * 1e3:.2f} ms, {args.tokens_per_step:.0f} tokens/GPU/step, "
          f"all-reduce {args.allreduce_us:g} us (2 GPUs), hop {args.hop_us:g} us, jitter {args.jitter:g}")
    print(f"{'fabric':>7} {'GPUs':>5} {'step ms':>9} {'allreduce us':>13} {'tokens/s':>12} {'efficiency':>11}")
    for r in rows:
        print(f"{r['fabric']:>7} {r['gpus']:>5} {r['step_s'] * 1e3:>9.3f} {r['allreduce_us']:>13.1f} "
              f"{r['tokens_per_s']:>12,.0f} {r['efficiency']:>11.3f}")


if __name__ == "__main__":
    main()
