"""Perplexity of smollm2-135m on bbc_news with an fp32, NF4, NF4 + double-quant and LLM.int8 base:
ours and transformers + bitsandbytes on the same texts and windows, side by side.

    python bench/bench_quant_perplexity.py [--articles 100] [--window 512] [--stride 256]

Both sides score each of the first N test articles with sliding windows (evaluation.py's protocol:
every token once, with at least window - stride tokens of context after the first window) and report
exp(token-weighted mean NLL).
Our NF4/int8 bytes equal bitsandbytes' (tests/test_quant.py), so the columns should agree to the
precision of the matmuls (bitsandbytes' int8 CPU path rounds differently from ours in fp32).
"""
import argparse
import json

import torch
import torch.nn.functional as F
import transformers

from common import ROOT, model_dir
from evaluation import perplexity_of_texts
from models import load_model

FORMATS = {"fp32": None, "nf4": "nf4", "nf4-dq": "nf4-dq", "int8": "int8"}


def hf_model(folder, fmt):
    options = {}
    if fmt in ("nf4", "nf4-dq"):
        options["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=fmt == "nf4-dq",
            bnb_4bit_compute_dtype=torch.float32)
    elif fmt == "int8":
        options["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu",
                                                              **options).eval()
    for module in model.modules():  # on AVX512-BF16 CPUs bnb's eval-mode 4-bit layer computes in bf16: keep fp32
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


class HFLogits(torch.nn.Module):
    """transformers' model behind our call signature, so both go through the same scoring code."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, logits_mask=None, targets=None):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        logits = logits if logits_mask is None else logits[logits_mask]
        return logits if targets is None else F.cross_entropy(logits.float(), targets, reduction="sum")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--articles", type=int, default=100, help="first N bbc_news test articles")
    parser.add_argument("--window", type=int, default=512, help="tokens per window")
    parser.add_argument("--stride", type=int, default=256, help="window advance")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    folder = model_dir("smollm2-135m")
    data = ROOT.parent / "shared" / "data" / "bbc_news" / "test.jsonl"
    texts = [json.loads(line)["text"] for line in open(data, encoding="utf-8")][: args.articles]
    print(f"smollm2-135m, first {len(texts)} bbc_news test articles, window {args.window}, stride {args.stride}")
    print("| base | ours | transformers + bitsandbytes | ours / theirs |\n|---|---|---|---|")
    for name, quant in FORMATS.items():
        ours, tokenizer = load_model(folder, task="causal-lm", quant=quant)
        mine = perplexity_of_texts(ours, tokenizer, texts, args.window, args.stride)["perplexity"]
        del ours
        theirs = perplexity_of_texts(HFLogits(hf_model(folder, name)), tokenizer, texts, args.window,
                                     args.stride)["perplexity"]
        print(f"| {name} | {mine:.2f} | {theirs:.2f} | {mine / theirs:.4f} |", flush=True)


if __name__ == "__main__":
    main()
