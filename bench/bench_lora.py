"""LoRA speed, ours vs peft on the same checkpoint, in one run.

    python bench/bench_lora.py [--repeats 10] [--rank 8]

1. Training step (forward, each side's own training loss, backward, AdamW; LoRA r on the default
   targets), against two yardsticks: peft on transformers (its inverse time is the throughput
   ratio) and the floor for LoRA training, 2x the no-grad forward of the frozen base (the backward
   through frozen layers costs about one more forward): step / floor (target <= 1.15). The loss is
   what train.py computes (cross-entropy of the classifier; for the LM the summed next-token NLL of
   every position, models/fused.py) and, for peft, transformers' loss from `labels=`. Models with
   dropout in their config also get a row with the base model's dropout off, which is what the
   eval-mode floor leaves out. The process runs under quant.allocator.keep_freed_memory(), as
   train.py does without --quant; both sides share it. peft is also timed as running it gives:
   in a fresh process under glibc's default allocator (a child of this script), against its own
   floor there; its step is scaled to this process by the two floors (machine speed drifts between
   processes), which gives the "peft as run" row.
2. Inference latency of the base model, unmerged LoRA and merged LoRA, for ours and peft:
   overhead = unmerged / base - 1 (target: <= 5 % for ours), merged / base (target: 1.00 within noise).
"""
import argparse
import json
import subprocess
import sys

import peft
import torch
import transformers

from common import fetched, inputs, interleaved, model_dir, our_loss, training_step
from lora import LoraConfig, apply_lora, merge_adapter
from models import load_model
from quant.allocator import keep_freed_memory

CASES = [  # (name, our task, transformers class, peft task, targets, batch, tokens)
    ("minilm-l6", "seq-cls", transformers.AutoModelForSequenceClassification, "SEQ_CLS", ["query", "value"], 32, 64),
    ("smollm2-135m", "causal-lm", transformers.AutoModelForCausalLM, "CAUSAL_LM", ["q_proj", "v_proj"], 8, 128),
]


def randomize_b(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.01)


def peft_model(folder, auto, peft_task, targets, rank):
    """(peft LoRA model with random B, the frozen transformers base in eval mode)."""
    hf = auto.from_pretrained(folder, dtype=torch.float32).eval()
    hf_base = auto.from_pretrained(folder, dtype=torch.float32).eval()
    theirs = peft.get_peft_model(hf, peft.LoraConfig(task_type=peft_task, r=rank, lora_alpha=2 * rank,
                                                      target_modules=targets))
    randomize_b(theirs)
    return theirs, hf_base


def no_grad_forward(model, call):
    with torch.no_grad():
        call(model.eval())


def peft_fns(theirs, hf_base, ids, mask, labels):
    """peft's training step and the no-grad forward of the transformers base: {"peft": fn, "peft_floor": fn}."""
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-5)
    return {"peft": lambda: training_step(theirs, optimizer, lambda m: m(input_ids=ids, attention_mask=mask,
                                                                          labels=labels).loss),
            "peft_floor": lambda: no_grad_forward(hf_base, lambda m: m(input_ids=ids, attention_mask=mask))}


def peft_as_run(name, repeats, rank):
    """This script's child (--peft-as-run NAME): peft's step and its floor in a fresh process left at glibc's
    default allocator; prints {"peft": s, "peft_floor": s}."""
    _, task, auto, peft_task, targets, B, T = next(c for c in CASES if c[0] == name)
    fns = peft_fns(*peft_model(model_dir(name), auto, peft_task, targets, rank), *inputs(task, B, T))
    print(json.dumps(interleaved(fns, repeats=repeats)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per variant (median reported)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--peft-as-run", metavar="NAME", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    if args.peft_as_run:
        return peft_as_run(args.peft_as_run, args.repeats, args.rank)
    keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, r={args.rank}")
    for name, task, auto, peft_task, targets, B, T in CASES:
        folder = fetched(name)
        if folder is None:
            continue
        ids, mask, labels = inputs(task, B, T)
        base, _ = load_model(folder, task=task)
        ours, _ = load_model(folder, task=task)
        apply_lora(ours, LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=targets))
        randomize_b(ours)
        theirs, hf_base = peft_model(folder, auto, peft_task, targets, args.rank)

        optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-5)

        def loss(model):
            return our_loss(model, task, ids, mask, labels)

        fns = {
            "ours": lambda: training_step(ours, optimizer, loss),
            "floor": lambda: no_grad_forward(base, lambda m: m(ids, mask)),
            **peft_fns(theirs, hf_base, ids, mask, labels),
        }
        has_dropout = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in base.modules())
        if has_dropout:  # eval mode switches every dropout off; gradients flow as in training
            fns["ours, base dropout off"] = lambda: training_step(ours, optimizer, loss, train=False)
        t = interleaved(fns, repeats=args.repeats)
        # stderr is not captured, so the child's errors reach the terminal
        child = subprocess.run([sys.executable, __file__, "--peft-as-run", name, "--repeats", str(args.repeats),
                                "--rank", str(args.rank)], stdout=subprocess.PIPE, text=True, check=True)
        as_run = json.loads(child.stdout.splitlines()[-1])
        t["peft as run"] = as_run["peft"] * t["peft_floor"] / as_run["peft_floor"]
        print(f"\n{name} {B}x{T}, training step (forward, loss, backward, AdamW):")
        print("| | step (ms) | no-grad forward of the base (ms) | step / (2 x forward) | throughput / peft's |")
        print("|---|---|---|---|---|")
        rows = [("ours", "floor"), ("peft", "peft_floor"), ("peft as run", "peft_floor")]
        rows += [("ours, base dropout off", "floor")] * has_dropout
        for key, fwd in rows:
            print(f"| {key} | {t[key] * 1e3:.0f} | {t[fwd] * 1e3:.0f} | {t[key] / (2 * t[fwd]):.2f} "
                  f"| {t['peft'] / t[key]:.2f} |")
        print(f"ours: {t['peft as run'] / t['ours']:.2f} x the throughput of peft as run (own process, glibc's "
              "default allocator)")

        ours.eval(), theirs.eval()
        ours_merged, _ = load_model(folder, task=task)
        apply_lora(ours_merged, LoraConfig(r=args.rank, alpha=2 * args.rank, target_modules=targets))
        ours_merged.load_state_dict(ours.state_dict())
        merge_adapter(ours_merged)
        with torch.inference_mode():
            t = interleaved({
                "base": lambda: base(ids, mask),
                "unmerged": lambda: ours(ids, mask),
                "merged": lambda: ours_merged(ids, mask),
                "peft_base": lambda: hf_base(input_ids=ids, attention_mask=mask),
                "peft_unmerged": lambda: theirs(input_ids=ids, attention_mask=mask),
            }, repeats=args.repeats)
        print("| inference | ms | / base |\n|---|---|---|")
        for key in ("base", "unmerged", "merged"):
            print(f"| ours {key} | {t[key] * 1e3:.0f} | {t[key] / t['base']:.3f} |")
        for key in ("peft_base", "peft_unmerged"):
            print(f"| {key.replace('_', ' ')} | {t[key] * 1e3:.0f} | {t[key] / t['peft_base']:.3f} |")


if __name__ == "__main__":
    main()
