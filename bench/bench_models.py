"""Forward-pass time of our models vs transformers' on the same checkpoint, in one run.

    python bench/bench_models.py [--repeats 10]
Prints, per model: batch shape, our median time, transformers' median time, and ours / theirs.
"""
import argparse

import torch
import transformers

from common import fetched, interleaved
from models import load_model

CASES = [  # (fetched name, our task, transformers class, batch, tokens)
    ("minilm-l6", "base", transformers.AutoModel, 32, 64),
    ("smollm2-135m", "causal-lm", transformers.AutoModelForCausalLM, 8, 128),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per model (median reported)")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| model | batch | ours (ms) | transformers (ms) | ours / transformers |\n|---|---|---|---|---|")
    for name, task, auto, B, T in CASES:
        folder = fetched(name, 5)
        if folder is None:
            continue
        ours, _ = load_model(folder, task=task)
        ref = auto.from_pretrained(folder, dtype=torch.float32).eval()
        ids = torch.randint(100, 1000, (B, T))
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            t = interleaved({"ours": lambda: ours(ids, mask), "hf": lambda: ref(input_ids=ids, attention_mask=mask)},
                            repeats=args.repeats)
        print(f"| {name} | {B}x{T} | {t['ours'] * 1e3:.1f} | {t['hf'] * 1e3:.1f} | {t['ours'] / t['hf']:.2f} |")


if __name__ == "__main__":
    main()
