"""Peak memory of a LoRA training step on smollm2-135m: fp32 base vs QLoRA (NF4, int8) bases, in one run.

    python bench/bench_qlora_memory.py [--batch 4] [--tokens 256]

Each configuration runs in a fresh subprocess: load the model (quantizing while loading for QLoRA), apply
LoRA r=8 on q_proj,v_proj, two forward/backward/AdamW steps on a causal-LM batch with every token labelled.
The peak of the steps is measured from their start (Linux's VmHWM, reset after loading), so a small batch
is not masked by loading's own peak, which is printed beside it. Each runs under the three allocator policies of
quant/allocator.py: glibc's default, keep_freed_memory() (what train.py uses) and
map_large_allocations() (what train.py --quant uses). Prints peak RSS, the saving as a ratio of the
weight bytes saved (target >= 0.8) and the time of the second step.
"""
import argparse
import json
import subprocess
import sys

from common import ROOT, model_dir

CHILD = r"""
import json, sys, time, torch
sys.path.insert(0, {root!r})
sys.path.insert(0, {root!r} + "/bench")
from common import peak_rss, reset_peak_rss
from quant import allocator
if {policy!r} != "default":
    assert getattr(allocator, {policy!r})()
from models import load_model
from lora import LoraConfig, apply_lora
from quant import model_bytes
from evaluation import next_token_nll
quant = {quant!r}
model, _ = load_model({folder!r}, task="causal-lm", quant=quant)
weights = model_bytes(model)["total"]
apply_lora(model, LoraConfig(r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(100, 40000, ({batch}, {tokens}), generator=torch.Generator().manual_seed(0))
batch = {{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}}
load_peak = peak_rss()  # loading's own peak (the mapped file, a layer's full-precision weight while quantizing)
reset_peak_rss()
model.train()
for _ in range(2):
    start = time.perf_counter()
    nll, n = next_token_nll(model, batch)
    (nll / n).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print(json.dumps({{"peak_rss": peak_rss(), "load_peak": load_peak, "weights": weights,
                  "step": time.perf_counter() - start}}))
"""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per sequence")
    args = parser.parse_args()
    folder = model_dir("smollm2-135m")
    if not folder.is_dir():
        sys.exit(f"smollm2-135m not found in {folder.parent}; run python ../shared/tools/fetch_models.py")
    print(f"smollm2-135m, LoRA r=8 q_proj,v_proj, batch {args.batch} x {args.tokens} tokens")
    print("| allocator | base | model bytes (MB) | peak RSS of the steps (GB) | RSS saved vs fp32 (GB) "
          "| saved / weight bytes saved | step (s) | peak RSS loading (GB) |")
    print("|---|---|---|---|---|---|---|---|")
    for policy in ("default", "keep_freed_memory", "map_large_allocations"):
        results = {}
        for quant in (None, "nf4", "nf4-dq", "int8"):
            code = CHILD.format(root=str(ROOT), folder=str(folder), quant=quant, batch=args.batch, tokens=args.tokens,
                                policy=policy)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            results[quant or "fp32"] = json.loads(out.stdout.strip().splitlines()[-1])
        base = results["fp32"]
        for name, r in results.items():
            saved_rss, saved_w = base["peak_rss"] - r["peak_rss"], base["weights"] - r["weights"]
            ratio = f"{saved_rss / saved_w:.2f}" if saved_w else "-"
            print(f"| {policy} | {name} | {r['weights'] / 1e6:.0f} "
                  f"| {r['peak_rss'] / 1e9:.2f} | {saved_rss / 1e9:.2f} | {ratio} | {r['step']:.2f} "
                  f"| {r['load_peak'] / 1e9:.2f} |")


if __name__ == "__main__":
    main()
