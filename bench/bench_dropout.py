"""Dropout's forward + backward, ours (models/fused.py) against torch's F.dropout, in one run.

    python bench/bench_dropout.py [--repeats 50]

The two tensors a MiniLM LoRA step drops most (bench_lora.py's batch, 32 x 64 tokens): an attention
probability mask (32 x 12 x 64 x 64) and a hidden state (32 x 64 x 384), p = 0.1. Each variant runs
y = dropout(x) and y.backward(g), the variants alternating:
  torch             F.dropout (torch's Bernoulli sampler), the reference
  ours              models/dropout.c on torch's threads (what training runs)
  ours, 1 thread    the same with torch.set_num_threads(1), which is also the C loops' team size
  ours, PyTorch     the fallback without the C library (16-bit lanes of torch's generator)
Prints median milliseconds and ours / torch. The process keeps freed memory for reuse
(quant.allocator.keep_freed_memory, as train.py does), so no variant pays for fresh pages.
"""
import argparse

import torch
import torch.nn.functional as F

from common import interleaved  # also puts the root on sys.path
from models import fused
from quant.allocator import keep_freed_memory

SHAPES = {"attention mask 32x12x64x64": (32, 12, 64, 64), "hidden state 32x64x384": (32, 64, 384)}
P = 0.1


def forward_backward(dropout, x, g):
    def run():
        x.grad = None
        dropout(x).backward(g)
    return run


def one_thread(fn):
    def run():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            fn()
        finally:
            torch.set_num_threads(threads)
    return run


def without_library(fn):
    def run():
        library, fused._DROPOUT = fused._DROPOUT, None
        try:
            fn()
        finally:
            fused._DROPOUT = library
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per variant (median reported)")
    args = parser.parse_args()
    keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, C library "
          f"{'built' if fused._DROPOUT is not None else 'not built (ours = the PyTorch fallback)'}")
    print("| tensor | variant | forward + backward (ms) | / torch |")
    print("|---|---|---|---|")
    for name, shape in SHAPES.items():
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)
        ours = forward_backward(lambda t: fused.dropout(t, P), x, g)
        t = interleaved({
            "torch": forward_backward(lambda t: F.dropout(t, P), x, g),
            "ours": ours,
            "ours, 1 thread": one_thread(ours),
            "ours, PyTorch": without_library(ours),
        }, repeats=args.repeats, warmup=3)
        for variant, seconds in t.items():
            print(f"| {name} | {variant} | {seconds * 1e3:.2f} | {seconds / t['torch']:.2f} |")


if __name__ == "__main__":
    main()
