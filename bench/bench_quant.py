"""Time our NF4 / int8 kernels against bitsandbytes' CPU kernels on the same weights, in one run.

    python bench/bench_quant.py [--repeats 10] [--threads N]
Prints, per weight shape and operation: our and bitsandbytes' median times, ours / bnb on the
medians, and ours / bnb on the fastest runs (the least disturbed by other processes on a shared
machine). Both sides produce identical bytes (tests/test_quant.py), so this compares speed only.
Rows marked "caches flushed" write 64 MB of other memory before every timed call, as a model's
matrix products do between two layers' dequantizations; the other rows run with warm caches.
"""
import argparse
import statistics

import torch

import bitsandbytes.functional as bnbF
from common import round_robin_times  # also puts the repository root on sys.path
from quant import dequantize_nf4, quantize_nf4, vectorwise_quantize

SHAPES = [(4096, 4096), (576, 1536)]
FLUSH = torch.empty(64 << 20, dtype=torch.uint8)


def flush_caches():
    FLUSH.add_(1)


def cases(weight):
    """(operation, ours, bitsandbytes, caches flushed) for one weight."""
    packed, state = quantize_nf4(weight)
    ref_packed, ref_state = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    packed_dq, state_dq = quantize_nf4(weight, double_quant=True)
    ref_packed_dq, ref_state_dq = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    buffer = torch.empty(weight.numel())
    return [
        ("quantize nf4", lambda: quantize_nf4(weight),
         lambda: bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4"), False),
        ("dequantize nf4", lambda: dequantize_nf4(packed, state),
         lambda: bnbF.dequantize_4bit(ref_packed, ref_state, quant_type="nf4"), False),
        ("dequantize nf4 into a reused buffer (as Linear4bit)", lambda: dequantize_nf4(packed, state, out=buffer),
         lambda: bnbF.dequantize_4bit(ref_packed, ref_state, quant_type="nf4"), False),
        ("dequantize nf4 into a reused buffer, caches flushed", lambda: dequantize_nf4(packed, state, out=buffer),
         lambda: bnbF.dequantize_4bit(ref_packed, ref_state, quant_type="nf4"), True),
        ("dequantize nf4 + double quant", lambda: dequantize_nf4(packed_dq, state_dq),
         lambda: bnbF.dequantize_4bit(ref_packed_dq, ref_state_dq, quant_type="nf4"), False),
        ("int8 vectorwise quantize", lambda: vectorwise_quantize(weight),
         lambda: bnbF.int8_vectorwise_quant(weight), False),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per operation")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 weights, blocksize 64")
    print("| weight | operation | ours (ms) | bitsandbytes (ms) | ours / bnb (median) | ours / bnb (fastest) |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
        for name, ours, theirs, flushed in cases(weight):
            times = round_robin_times({"ours": ours, "bnb": theirs}, args.repeats, warmup=1,
                                      before=flush_caches if flushed else None)
            median = {k: statistics.median(v) for k, v in times.items()}
            fastest = {k: min(v) for k, v in times.items()}
            print(f"| {shape[0]}x{shape[1]} | {name} | {median['ours'] * 1e3:.2f} | {median['bnb'] * 1e3:.2f} "
                  f"| {median['ours'] / median['bnb']:.2f} | {fastest['ours'] / fastest['bnb']:.2f} |")


if __name__ == "__main__":
    main()
