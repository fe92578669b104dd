"""Our train.py vs peft + transformers Trainer on the same LoRA run, side by side.

    python bench/bench_train_vs_peft.py [--model minilm-l6|smollm2-135m] [--train-samples N] [--eval-samples N]

minilm-l6: ../shared/data/rotten_tomatoes, seq-cls, LoRA r=8 alpha=16 on query,value with the
           classifier and pooler trained, batch 32, 64 tokens, lr 5e-3 (defaults: 2000 / 500 rows).
smollm2-135m: ../shared/data/bbc_news as plain text, causal-lm, LoRA r=8 alpha=16 on q_proj,v_proj,
           batch 8, 128 tokens (every article is longer, so every row is 128 tokens), lr 1e-3
           (defaults: 192 / 32 rows, i.e. 24 optimizer steps).
Both: 1 epoch, linear schedule with 6 % warmup, clipping at 1.0, no weight decay, seed 0, the same
row subsets. Each side runs in its own process (so each gets its own allocator policy: train.py's,
and glibc's default for peft, which is what running it gives). Reported: the test metric (accuracy,
or perplexity of the test rows), training wall time (evaluation excluded), samples/s, peak RSS, and
ours/peft ratios.
"""
import argparse
import json
import subprocess
import sys
import tempfile

from common import ROOT, model_dir

CASES = {
    "minilm-l6": dict(dataset="rotten_tomatoes", task="seq-cls", targets=["query", "value"],
                      modules_to_save=["classifier", "pooler"], batch=32, tokens=64, lr=5e-3, n_train=2000,
                      n_eval=500),
    "smollm2-135m": dict(dataset="bbc_news", task="causal-lm", targets=["q_proj", "v_proj"], modules_to_save=None,
                         batch=8, tokens=128, lr=1e-3, n_train=192, n_eval=32),
}

PEFT_CHILD = r"""
import json, math, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {root!r} + "/bench")
from common import peak_rss
import torch, peft, transformers
from data import load_splits, subsample
folder, c, out = {folder!r}, {case!r}, {out!r}
transformers.logging.set_verbosity_error()
splits = load_splits({dataset!r})
train_rows, test_rows = subsample(splits["train"], c["n_train"], 0), subsample(splits["test"], c["n_eval"], 0)
tok = transformers.AutoTokenizer.from_pretrained(folder)
seq_cls = c["task"] == "seq-cls"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
def enc(rows):
    encoded = [dict(tok(r["text"], truncation=True, max_length=c["tokens"])) for r in rows]
    if seq_cls:
        for e, r in zip(encoded, rows):
            e["labels"] = r["label"]
    return encoded
transformers.set_seed(0)
if seq_cls:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    collator = transformers.DataCollatorWithPadding(tok)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS" if seq_cls else "CAUSAL_LM", r=8,
    lora_alpha=16, target_modules=c["targets"], modules_to_save=c["modules_to_save"]))
args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=c["batch"], learning_rate=c["lr"],
    num_train_epochs=1, warmup_steps=0.06, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
    seed=0, report_to=[], save_strategy="no", eval_strategy="no", use_cpu=True, logging_strategy="no",
    disable_tqdm=True)
trainer = transformers.Trainer(model=model, args=args, train_dataset=enc(train_rows), data_collator=collator)
start = time.time()
trainer.train()
seconds = time.time() - start
model.eval()
correct, nll, count = 0, 0.0, 0
with torch.no_grad():
    for i in range(0, len(test_rows), 16):
        rows = test_rows[i:i + 16]
        batch = tok([r["text"] for r in rows], truncation=True, max_length=c["tokens"], padding=True,
                    return_tensors="pt")
        if seq_cls:
            pred = model(**batch).logits.argmax(-1)
            correct += int((pred == torch.tensor([r["label"] for r in rows])).sum())
        else:
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            n = int((labels[:, 1:] != -100).sum())
            nll += model(**batch, labels=labels).loss.item() * n
            count += n
metric = correct / len(test_rows) if seq_cls else math.exp(nll / count)
print(json.dumps({{"metric": metric, "seconds": seconds,
                   "peak_rss": peak_rss()}}))
"""

OURS_CHILD = r"""
import json, sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {root!r} + "/bench")
from common import peak_rss
import train
c = {case!r}
argv = ["--model", {folder!r}, "--dataset", {dataset!r}, "--task", c["task"], "--train-samples", str(c["n_train"]),
        "--eval-samples", str(c["n_eval"]), "--max-length", str(c["tokens"]), "--batch-size", str(c["batch"]),
        "--epochs", "1", "--lr", str(c["lr"]), "--seed", "0", "--target-modules", ",".join(c["targets"]),
        "--output-dir", {out!r}]
if c["modules_to_save"]:
    argv += ["--modules-to-save", ",".join(c["modules_to_save"])]
after = train.main(argv)
res = json.load(open({out!r} + "/results.json"))
print(json.dumps({{"metric": after["accuracy" if c["task"] == "seq-cls" else "perplexity"],
                   "seconds": res["train_seconds"], "peak_rss": peak_rss()}}))
"""


def run(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=CASES, default="minilm-l6", help="which of the two runs")
    parser.add_argument("--train-samples", type=int, default=None, help="train rows (random subset, seed 0)")
    parser.add_argument("--eval-samples", type=int, default=None, help="test rows (random subset, seed 0)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate for both")
    args = parser.parse_args()
    case = dict(CASES[args.model])
    for key, value in (("n_train", args.train_samples), ("n_eval", args.eval_samples), ("lr", args.lr)):
        if value is not None:
            case[key] = value
    folder, dataset = model_dir(args.model), ROOT.parent / "shared" / "data" / case.pop("dataset")
    if not folder.is_dir() or not dataset.is_dir():
        sys.exit(f"needs {folder} (fetch_models.py) and {dataset}")
    fields = dict(root=str(ROOT), folder=str(folder), dataset=str(dataset), case=case)
    with tempfile.TemporaryDirectory() as tmp:
        peft_result = run(PEFT_CHILD.format(out=tmp + "/peft", **fields))
        ours = run(OURS_CHILD.format(out=tmp + "/ours", **fields))
    n, metric = case["n_train"], "test accuracy" if case["task"] == "seq-cls" else "test perplexity"
    print(f"{args.model} on {dataset.name}, {case['task']}, {n} train / {case['n_eval']} test rows, batch "
          f"{case['batch']} x {case['tokens']} tokens, LoRA r=8 on {','.join(case['targets'])}, lr {case['lr']}")
    print(f"| | {metric} | train time (s) | samples/s | peak RSS (GB) |\n|---|---|---|---|---|")
    for name, r in (("ours", ours), ("peft + Trainer", peft_result)):
        print(f"| {name} | {r['metric']:.4f} | {r['seconds']:.1f} | {n / r['seconds']:.2f} | {r['peak_rss'] / 1e9:.2f} |")
    print(f"| ours / peft | | {ours['seconds'] / peft_result['seconds']:.2f} | "
          f"{peft_result['seconds'] / ours['seconds']:.2f} | {ours['peak_rss'] / peft_result['peak_rss']:.2f} |")


if __name__ == "__main__":
    main()
