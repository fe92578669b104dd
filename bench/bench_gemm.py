"""oneDNN's float32 linear product (models/fused.py, what our frozen layers use) against torch's
(MKL's sgemm, what F.linear and torch.mm call), in one run.

    python bench/bench_gemm.py [--repeats 10]

1. Each product of a LoRA training step at bench_lora.py's batches: the forward x Wᵀ and the
   backward's dL/dy W of every frozen linear shape of minilm-l6 (32 x 64 tokens) and smollm2-135m
   (8 x 128), the lm_head in its 256-row loss chunks, and one token's lm_head (generation).
   GFLOPS of each side and torch's time / oneDNN's.
2. Whole models with our products switched between the two (models.fused._ONEDNN), the variants
   alternating: the no-grad forward, a LoRA training step (r=8 on the default targets) and, for
   smollm2, greedy generation of 32 tokens. Both sides' logits and greedy tokens are checked.
3. Batch lengths that change every step, as train.py's batches padded to their longest row: minilm-l6
   LoRA steps at 32 x 8 ... 63 tokens, twice over, in a fresh process per variant: torch's products,
   oneDNN's with our primitive cache capacity (models.fused.PRIMITIVE_CACHE_CAPACITY) and with
   oneDNN's default of 1024. Time of those steps and the process's peak resident memory.
"""
import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from common import ROOT, fetched, inputs, interleaved, model_dir, our_loss, training_step  # also puts the root on sys.path
from lora import LoraConfig, apply_lora
from models import fused, load_model
from models.generate import generate
from quant.allocator import keep_freed_memory

PRODUCTS = [  # (label, tokens, in, out)
    ("minilm-l6 q/k/v/o", 2048, 384, 384), ("minilm-l6 up", 2048, 384, 1536), ("minilm-l6 down", 2048, 1536, 384),
    ("smollm2 q/o", 1024, 576, 576), ("smollm2 k/v", 1024, 576, 192), ("smollm2 gate/up", 1024, 576, 1536),
    ("smollm2 down", 1024, 1536, 576), ("smollm2 lm_head chunk", 256, 576, 49152),
    ("smollm2 lm_head, one token", 1, 576, 49152),
]
MODELS = [("minilm-l6", "seq-cls", ["query", "value"], 32, 64), ("smollm2-135m", "causal-lm", ["q_proj", "v_proj"], 8, 128)]


def products(repeats):
    print("| product | tokens x in -> out | torch forward | oneDNN forward | torch / oneDNN | torch backward "
          "| oneDNN backward | torch / oneDNN |\n|---|---|---|---|---|---|---|---|")
    for label, n, d_in, d_out in PRODUCTS:
        x, w, g = torch.randn(n, d_in), torch.randn(d_out, d_in), torch.randn(n, d_out)
        t = interleaved({"torch": lambda: F.linear(x, w), "onednn": lambda: fused.linear_product(x, w),
                         "torch_b": lambda: g @ w, "onednn_b": lambda: fused.linear_product(g, w.t())}, repeats=repeats)
        gflops = {k: 2 * n * d_in * d_out / v / 1e9 for k, v in t.items()}
        print(f"| {label} | {n} x {d_in} -> {d_out} | {gflops['torch']:.0f} GFLOPS | {gflops['onednn']:.0f} GFLOPS "
              f"| {t['torch'] / t['onednn']:.2f} | {gflops['torch_b']:.0f} GFLOPS | {gflops['onednn_b']:.0f} GFLOPS "
              f"| {t['torch_b'] / t['onednn_b']:.2f} |")


def switched(onednn, fn):
    def run():
        fused._ONEDNN = onednn
        return fn()
    return run


def models(repeats):
    print("\n| model | batch | what | with torch's products (ms) | with oneDNN's (ms) | torch / oneDNN |\n|---|---|---|---|---|---|")
    for name, task, targets, B, T in MODELS:
        folder = fetched(name, 6)
        if folder is None:
            continue
        base, _ = load_model(folder, task=task)
        base.eval()
        lora, _ = load_model(folder, task=task)
        apply_lora(lora, LoraConfig(r=8, alpha=16, target_modules=targets))
        optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-5)
        ids, mask, labels = inputs(task, B, T)

        def forward():
            with torch.inference_mode():
                return base(ids, mask)

        def step():
            training_step(lora, optimizer, lambda m: our_loss(m, task, ids, mask, labels))

        cases = {"no-grad forward": forward, "LoRA training step": step}
        if task == "causal-lm":
            prompt = ids[:1, :32]
            cases["generate 32 tokens"] = lambda: generate(base, prompt, max_new_tokens=32)
            tokens = [switched(o, cases["generate 32 tokens"])() for o in (False, True)]
            assert torch.equal(*tokens), "greedy tokens differ"
        logits = [switched(o, forward)() for o in (False, True)]
        torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-5 * logits[0].abs().max().item())
        for what, fn in cases.items():
            t = interleaved({"torch": switched(False, fn), "onednn": switched(True, fn)}, repeats=repeats)
            print(f"| {name} | {B}x{T} | {what} | {t['torch'] * 1e3:.0f} | {t['onednn'] * 1e3:.0f} "
                  f"| {t['torch'] / t['onednn']:.2f} |")
    fused._ONEDNN = True


LENGTHS_CHILD = r"""
import json, os, sys, time
os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = {capacity!r}
sys.path.insert(0, {root!r})
sys.path.insert(0, {root!r} + "/bench")
from common import peak_rss
import torch, torch.nn.functional as F
from lora import LoraConfig, apply_lora
from models import fused, load_model
from quant.allocator import keep_freed_memory
keep_freed_memory()
fused._ONEDNN = {onednn!r}
model, _ = load_model({folder!r}, task="seq-cls")
apply_lora(model, LoraConfig(r=8, alpha=16, target_modules=["query", "value"]))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
labels = torch.randint(0, 2, (32,))

def step(T):
    ids = torch.randint(100, 1000, (32, T))
    F.cross_entropy(model(ids, torch.ones_like(ids)), labels).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)

model.train()
for _ in range(3):
    step(64)
start = time.perf_counter()
for T in list(range(8, 64)) * 2:
    step(T)
print(json.dumps({{"seconds": time.perf_counter() - start,
                  "peak": peak_rss()}}))
"""


def varying_lengths():
    folder = model_dir("minilm-l6")
    if not folder.is_dir():
        return print(f"\nvarying lengths: skipped, minilm-l6 not in {folder.parent}")
    print("\n| minilm-l6, 112 LoRA steps at 32 x 8 ... 63 tokens | time (s) | peak RSS (GB) |\n|---|---|---|")
    variants = [("torch's products", False, str(fused.PRIMITIVE_CACHE_CAPACITY)),
                (f"oneDNN's, primitive cache {fused.PRIMITIVE_CACHE_CAPACITY} (ours)", True, str(fused.PRIMITIVE_CACHE_CAPACITY)),
                ("oneDNN's, primitive cache 1024 (oneDNN's default)", True, "1024")]
    for label, onednn, capacity in variants:
        code = LENGTHS_CHILD.format(root=str(ROOT), folder=str(folder), onednn=onednn, capacity=capacity)
        out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True)
        result = json.loads(out.stdout.splitlines()[-1])
        print(f"| {label} | {result['seconds']:.1f} | {result['peak'] / 1e9:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per variant (median reported)")
    args = parser.parse_args()
    keep_freed_memory()  # as train.py: both variants reuse freed memory
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, oneDNN available: {fused._ONEDNN}")
    if not fused._ONEDNN:
        return
    products(args.repeats)
    models(args.repeats)
    varying_lengths()


if __name__ == "__main__":
    main()
