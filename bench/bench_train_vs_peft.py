"""Our train.py vs peft + transformers Trainer on the same LoRA run, side by side.

    python bench/bench_train_vs_peft.py [--train-samples 2000] [--eval-samples 500]

minilm-l6 on ../shared/data/rotten_tomatoes, seq-cls, LoRA r=8 alpha=16 on query,value with the
classifier and pooler trained, batch 32, 64 tokens, 1 epoch, linear schedule with 6 % warmup, the same
lr, seed and row subsets. Each side runs in its own process; reported: test accuracy, training wall
time (evaluation excluded), samples/s and peak RSS, with ours/peft ratios.
"""
import argparse
import json
import subprocess
import sys
import tempfile

from common import ROOT, model_dir

PEFT_CHILD = r"""
import json, random, resource, sys, time
sys.path.insert(0, {root!r})
import numpy as np, torch, peft, transformers
from data import load_splits, subsample
folder, lr, n_train, n_eval, out = {folder!r}, {lr}, {n_train}, {n_eval}, {out!r}
transformers.logging.set_verbosity_error()
splits = load_splits({dataset!r})
train_rows, test_rows = subsample(splits["train"], n_train, 0), subsample(splits["test"], n_eval, 0)
tok = transformers.AutoTokenizer.from_pretrained(folder)
enc = lambda rows: [dict(tok(r["text"], truncation=True, max_length=64), labels=r["label"]) for r in rows]
transformers.set_seed(0)
model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16,
    target_modules=["query", "value"], modules_to_save=["classifier", "pooler"]))
args = transformers.TrainingArguments(output_dir=out, per_device_train_batch_size=32, learning_rate=lr,
    num_train_epochs=1, warmup_steps=0.06, lr_scheduler_type="linear", weight_decay=0.0, max_grad_norm=1.0,
    seed=0, report_to=[], save_strategy="no", eval_strategy="no", use_cpu=True, logging_strategy="no",
    disable_tqdm=True)
trainer = transformers.Trainer(model=model, args=args, train_dataset=enc(train_rows),
    data_collator=transformers.DataCollatorWithPadding(tok))
start = time.time()
trainer.train()
seconds = time.time() - start
model.eval()
correct = 0
with torch.no_grad():
    for i in range(0, len(test_rows), 64):
        rows = test_rows[i:i + 64]
        batch = tok([r["text"] for r in rows], truncation=True, max_length=64, padding=True, return_tensors="pt")
        pred = model(**batch).logits.argmax(-1)
        correct += int((pred == torch.tensor([r["label"] for r in rows])).sum())
print(json.dumps({{"accuracy": correct / len(test_rows), "seconds": seconds,
                   "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""

OURS_CHILD = r"""
import json, resource, sys
sys.path.insert(0, {root!r})
import train
after = train.main(["--model", {folder!r}, "--dataset", {dataset!r}, "--train-samples", "{n_train}",
    "--eval-samples", "{n_eval}", "--max-length", "64", "--batch-size", "32", "--lr", "{lr}", "--seed", "0",
    "--modules-to-save", "classifier,pooler", "--output-dir", {out!r}])
res = json.load(open({out!r} + "/results.json"))
print(json.dumps({{"accuracy": after["accuracy"], "seconds": res["train_seconds"],
                   "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}))
"""


def run(code):
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-samples", type=int, default=2000, help="train rows (random subset, seed 0)")
    parser.add_argument("--eval-samples", type=int, default=500, help="test rows (random subset, seed 0)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate for both")
    args = parser.parse_args()
    folder, dataset = model_dir("minilm-l6"), ROOT.parent / "shared" / "data" / "rotten_tomatoes"
    if not folder.is_dir() or not dataset.is_dir():
        sys.exit(f"needs {folder} (fetch_models.py) and {dataset}")
    fields = dict(root=str(ROOT), folder=str(folder), dataset=str(dataset), lr=args.lr,
                  n_train=args.train_samples, n_eval=args.eval_samples)
    with tempfile.TemporaryDirectory() as tmp:
        peft_result = run(PEFT_CHILD.format(out=tmp + "/peft", **fields))
        ours = run(OURS_CHILD.format(out=tmp + "/ours", **fields))
    n = args.train_samples
    print(f"minilm-l6 rotten_tomatoes, {n} train / {args.eval_samples} test rows, LoRA r=8, lr {args.lr}")
    print("| | test accuracy | train time (s) | samples/s | peak RSS (GB) |\n|---|---|---|---|---|")
    for name, r in (("ours", ours), ("peft + Trainer", peft_result)):
        print(f"| {name} | {r['accuracy']:.4f} | {r['seconds']:.0f} | {n / r['seconds']:.1f} | {r['peak_rss'] / 1e9:.2f} |")
    print(f"| ours / peft | | {ours['seconds'] / peft_result['seconds']:.2f} | "
          f"{peft_result['seconds'] / ours['seconds']:.2f} | {ours['peak_rss'] / peft_result['peak_rss']:.2f} |")


if __name__ == "__main__":
    main()
