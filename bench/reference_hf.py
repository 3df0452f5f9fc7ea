#!/usr/bin/env python3
"""Times the PyTorch ZO2's Hugging Face Qwen3 path (the class its `zo_hf_init` puts in place of
transformers'), the reference for the LLaMA family, at the reference protocol of its own harness
(zo2_bench.py): fp16, batch 1,
sequence 2048, random tokens, lr 1e-4, weight decay 0.1, eps 1e-3, the median of the last half of
the steps, CUDA-synchronized. Prints one `RESULT {json}` line in that harness's format, so
bench/run_reference.py reads it as it reads the OPT runs (run_reference.py runs this script for
the qwen3_* models):

    python3 bench/reference_hf.py --reference .reference --model qwen3_8b --method zo2 --steps 6

The shapes are zo2's presets of the same names (include/zo2/models/llama/config.hpp), random
weights. The reference's HF path needs transformers 4.51, and the GPU machine has 5.x: with
--wheels DIR (default: .whl/ beside bench/, when it holds a transformers wheel), the wheels there
(transformers 4.51.3, tokenizers 0.21, huggingface_hub 0.30, requests and its dependencies;
`bash bench/reference_wheels.sh` downloads them, 14 MB, git-ignored) are unpacked into a private
folder that goes first on sys.path; the machine's torch stays.

--device cpu --layers 2 --seq 64 runs MeZO (--method zo) on the CPU: a check of this script's
plumbing where no GPU is.
"""
import argparse
import glob
import json
import os
import sys
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))

# zo2's presets (LlamaConfig::preset): Qwen/Qwen3-8B and Qwen/Qwen3-32B.
SHAPES = {
    "qwen3_8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                     use_sliding_window=False, sliding_window=None, max_window_layers=36),
    "qwen3_32b": dict(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64, num_attention_heads=64,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                      rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
                      use_sliding_window=False, sliding_window=None, max_window_layers=64),
}


def install_wheels(wheels, target):
    """Unpacks every wheel in `wheels` into `target` (once) and puts it first on sys.path. A wheel
    is a zip of the files an install puts in site-packages; unpacking it needs no pip, which the
    GPU machine's Python environment lacks."""
    files = sorted(glob.glob(os.path.join(wheels, "*.whl")))
    if not any(os.path.basename(f).startswith("transformers-") for f in files):
        sys.exit(f"reference_hf.py: no transformers wheel in {wheels} (bash bench/reference_wheels.sh)")
    stamp = os.path.join(target, ".installed")
    if not os.path.exists(stamp):
        os.makedirs(target, exist_ok=True)
        for f in files:
            with zipfile.ZipFile(f) as z:
                if any(n.split("/")[0].endswith(".data") for n in z.namelist()):
                    sys.exit(f"reference_hf.py: {f} has a .data folder; only plain wheels unpack")
                z.extractall(target)
        open(stamp, "w").close()
    sys.path.insert(0, target)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default=os.path.join(HERE, "..", ".reference"),
                    help="the folder holding the PyTorch ZO2 (zo2/) (default .reference)")
    ap.add_argument("--model", default="qwen3_8b", choices=sorted(SHAPES))
    ap.add_argument("--method", default="zo2", choices=["zo2", "zo"], help="zo2: offloaded; zo: MeZO on the device")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=0, help="override the layer count (0: the preset's)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--wheels", default=os.path.join(HERE, "..", ".whl"))
    ap.add_argument("--wheels-target", default="/tmp/zo2-reference-wheels")
    a = ap.parse_args()
    if a.steps < 2:
        sys.exit("reference_hf.py: --steps must be at least 2")

    if glob.glob(os.path.join(a.wheels, "transformers-*.whl")):
        install_wheels(a.wheels, a.wheels_target)
    sys.path.insert(0, os.path.join(os.path.abspath(a.reference), "zo2"))
    import torch
    import transformers
    from zo2.config.mezo_sgd import MeZOSGDConfig
    from zo2.model.huggingface.qwen3 import get_qwen3_for_causalLM

    if not hasattr(transformers, "Qwen3Config"):
        sys.exit(f"reference_hf.py: transformers {transformers.__version__} has no Qwen3")
    cuda = a.device == "cuda"
    device = "cuda:0" if cuda else "cpu"
    torch.manual_seed(0)
    shape = dict(SHAPES[a.model])
    if a.layers:
        shape["num_hidden_layers"] = a.layers
    config = transformers.Qwen3Config(**shape, torch_dtype="float16")
    zc = MeZOSGDConfig(lr=1e-4, weight_decay=0.1, eps=1e-3, working_device=device, offloading_device="cpu")
    zc.zo2 = a.method == "zo2"

    t0 = time.time()
    torch.set_num_threads(os.cpu_count() or 1)

    def fast_normal(t, mean=0.0, std=1.0, generator=None):  # as the reference's harness draws
        with torch.no_grad():
            return t.copy_(torch.randn(t.shape, dtype=torch.float32).mul_(std).add_(mean))

    torch.nn.init.normal_ = fast_normal
    torch.set_default_dtype(torch.float16 if cuda else torch.float32)
    # The class zo_hf_init(zc) would put in place of transformers.Qwen3ForCausalLM.
    model = get_qwen3_for_causalLM(zc)(config)
    if a.method == "zo":
        model = model.to(device)
    model.zo_init(zc)
    torch.set_default_dtype(torch.float32)
    init_s = time.time() - t0
    n = sum(p.numel() for p in model.parameters())

    seq = a.seq
    data = torch.randint(0, config.vocab_size, (1, seq), device=device)
    labels = data.clone()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    nvml = None
    if cuda:
        import pynvml
        pynvml.nvmlInit()
        nvml = pynvml.nvmlDeviceGetHandleByIndex(0)
    times, nv_peak, loss = [], 0, None
    for _ in range(a.steps):
        model.zo_train()
        sync()
        t = time.time()
        loss = model(input_ids=data, labels=labels)
        sync()
        times.append(time.time() - t)
        if nvml is not None:
            nv_peak = max(nv_peak, pynvml.nvmlDeviceGetMemoryInfo(nvml).used)
    half = sorted(times[len(times) // 2:])
    med = half[len(half) // 2]
    if hasattr(loss, "loss"):
        loss = loss.loss
    r = dict(model=a.model, method=a.method, dtype="fp16" if cuda else "fp32", amp=False, batch=1, seq=seq,
             params=n, init_s=round(init_s, 1), step_s_median=round(med, 4), tok_s=round(seq / med, 1),
             torch_max_alloc_MB=round(torch.cuda.max_memory_allocated() / 2**20) if cuda else 0,
             nvml_used_MB=round(nv_peak / 2**20), loss=float(loss) if torch.is_tensor(loss) else loss,
             transformers=transformers.__version__)
    print("RESULT", json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
