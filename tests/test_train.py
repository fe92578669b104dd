"""train.py end to end on the tiny random checkpoints of tests/tiny.py, plus the evaluation it relies on.

Each run is a real `train.main(argv)` job (a few steps, batch <= 8, max length <= 32) on a
small jsonl dataset written into tmp_path; its output folder is read back (log.jsonl,
checkpoint/trainable.safetensors, results.json, adapter/). Nothing is compared with stored
numbers: every reference is computed in the test (a second run, transformers, a hand formula).

    loss falls          seq-cls (DistilBERT, keyword => label) and causal-lm (Llama, memorised pairs)
    grad accumulation   --batch-size 4 --grad-accum 2 == --batch-size 8 (seq-cls; causal-lm token-weighted)
    resume              interrupted + --resume == uninterrupted (LoRA dropout and model dropout on)
    early stopping      a metric that cannot improve stops the run after `patience` evaluations
    metrics             seq-cls accuracy / F1 / loss == hand computation from transformers' logits
    perplexity          evaluate() and sliding_window_perplexity() == transformers' token-weighted loss
    torchrun            2 processes x batch 4 == 1 process x batch 8
    bad input           each a clear DataError / LoadError / argparse error naming the problem
    other paths         generate-label and --method prompt on a decoder, adapter folder contents
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import evaluation
import train
from lora import AdapterError
from lora.adapters import check_adapter_folder
from models import LoadError, load_model
from tiny import NUM_LABELS, random_ids, run_ours

pytestmark = pytest.mark.usefixtures("quiet_warnings")

ROOT = Path(train.__file__).resolve().parent


# ------------------------------------------------------------------ helpers

FILLER = "the movie film plot story was is a of and it".split()
KEYWORDS = ("terrible", "wonderful", "okay")  # the word that decides the label (all in tiny.CORPUS)
PAIRS = [("the capital of France", "Paris"), ("the capital of Italy", "Rome"),
         ("water boils at", "100 degrees Celsius"), ("the quick brown fox", "jumps over the lazy dog"),
         ("I think", "therefore I am"), ("the rain in Spain", "stays mainly in the plain"),
         ("she sells", "sea shells"), ("good", "morning")]  # answers of different token counts


def write_jsonl(folder, split, rows):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return folder


def keyword_rows(n, num_labels=2, seed=0):
    """Label i % num_labels, told by one keyword at a random place among 2-7 filler words."""
    r = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % num_labels
        words = [r.choice(FILLER) for _ in range(r.randint(2, 7))]
        words.insert(r.randrange(len(words) + 1), KEYWORDS[label])
        rows.append({"text": " ".join(words), "label": label})
    return rows


def keyword_dataset(folder, n_train=16, n_eval=8, num_labels=2):
    write_jsonl(folder, "train", keyword_rows(n_train, num_labels, seed=0))
    return write_jsonl(folder, "validation", keyword_rows(n_eval, num_labels, seed=1))


def pair_rows(n):
    return [{"question": q, "answer": a} for q, a in (PAIRS[i % len(PAIRS)] for i in range(n))]


def pair_dataset(folder, n_train=16, n_eval=8):
    write_jsonl(folder, "train", pair_rows(n_train))
    return write_jsonl(folder, "validation", pair_rows(n_eval))


def run(model, dataset, out, *extra):
    """train.main on a tiny job; returns its final metrics."""
    argv = ["--model", str(model), "--dataset", str(dataset), "--output-dir", str(out),
            "--max-length", "32", "--eval-batch-size", "16", *map(str, extra)]
    return train.main(argv)


def log_rows(out, kind="train"):
    with open(Path(out) / "log.jsonl", encoding="utf-8") as f:
        return [row for row in map(json.loads, f) if row["kind"] == kind]


def final_weights(out):
    """The trainable weights after the last step (the checkpoint is written after the final evaluation)."""
    return load_file(str(Path(out) / "checkpoint" / "trainable.safetensors"))


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    assert a, "no trainable weights were saved"
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"trainable weights differ by up to {worst:.3g} (> {atol:g})"


def no_dropout_copy(tiny, family, task, dest):
    """A private copy of a tiny checkpoint with every dropout probability of its config set to 0."""
    folder = tiny.copy(family, task, dest)
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in cfg.items():
        if ("dropout" in key or key.endswith("_pdrop")) and isinstance(value, float):
            cfg[key] = 0.0
    path.write_text(json.dumps(cfg, indent=2))
    return folder


# ------------------------------------------------------------------ the loss falls


def test_seq_cls_loss_falls(tiny, tmp_path):
    folder = tiny.folder("distilbert", "base")  # new 2-label head, LoRA on the attention
    dataset = keyword_dataset(tmp_path / "data", n_train=32, n_eval=16)
    out = tmp_path / "out"
    after = run(folder, dataset, out, "--max-steps", 32, "--batch-size", 8, "--lr", 1e-2,
                "--schedule", "constant", "--warmup", 0)
    losses = [row["loss"] for row in log_rows(out)]
    assert [row["step"] for row in log_rows(out)] == list(range(1, 33))
    assert all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.5 * first, f"train loss went from {first:.3f} to {last:.3f}"
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "seq-cls" and results["labels"] == [0, 1]
    assert results["after"] == after
    assert after["loss"] < results["before"]["loss"]
    assert after["accuracy"] >= 0.75


def test_causal_lm_loss_falls(tiny, tmp_path, allocator_settings):
    from quant import allocator

    folder = tiny.folder("llama", "causal-lm")
    dataset = pair_dataset(tmp_path / "data")
    out = tmp_path / "out"
    after = run(folder, dataset, out, "--max-steps", 20, "--batch-size", 8, "--lr", 3e-2,
                "--schedule", "constant", "--warmup", 0)
    losses = [row["loss"] for row in log_rows(out)]
    assert len(losses) == 20 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 1.0, f"train loss went from {first:.3f} to {last:.3f}"
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "causal-lm"
    assert after["perplexity"] < results["before"]["perplexity"] / 3
    assert after["perplexity"] == pytest.approx(math.exp(after["loss"]), rel=1e-9)
    # without --quant freed memory is kept for reuse (quant/allocator.py)
    assert allocator_settings == [(allocator.M_MMAP_THRESHOLD, 1 << 30), (allocator.M_TRIM_THRESHOLD, 1 << 30)]


def test_qlora_run_saves_a_merged_full_precision_model(tiny, tmp_path, capsys):
    """--quant nf4 --save-merged: <out>/merged is a plain fp32 checkpoint computing what the 4-bit base
    plus the saved adapter computes (the adapter merged into Ŵ, not requantized). A later run into the
    same folder without --save-merged points out the merged model it did not write."""
    from lora import load_adapter

    folder = tiny.folder("llama", "causal-lm")
    out = tmp_path / "out"
    run(folder, pair_dataset(tmp_path / "data"), out, "--max-steps", 3, "--batch-size", 8, "--lr", 3e-2,
        "--quant", "nf4", "--save-merged")
    qlora = load_adapter(load_model(folder, task="causal-lm", quant="nf4")[0], out / "adapter").eval()
    merged, _ = load_model(out / "merged", task="causal-lm")
    assert not any(hasattr(m, "dequantized_weight") for m in merged.modules())
    ids = random_ids("llama", 2, 12, seed=3)
    with torch.no_grad():
        expected, got = qlora(ids, torch.ones_like(ids)), merged(ids, torch.ones_like(ids))
        base = load_model(folder, task="causal-lm", quant="nf4")[0](ids, torch.ones_like(ids))
    assert (expected - base).abs().max() > 1e-3, "the adapter changed nothing; the comparison would be vacuous"
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    assert "is from an earlier run" not in capsys.readouterr().err
    run(folder, pair_dataset(tmp_path / "data"), out, "--max-steps", 1, "--batch-size", 8)
    assert f"note: {out / 'merged'} is from an earlier run in {out}, not from this one" in capsys.readouterr().err


def test_full_fine_tuning_saves_a_checkpoint_transformers_loads(tiny, tmp_path):
    """--method none on a tied decoder: the saved model (in <out>/model, not <out>/adapter as it was; embedding
    stored once) loads in ours and in transformers with equal logits, and differs from the starting checkpoint;
    passed to eval.py as an adapter, the error says to pass it as the model."""
    from tiny import load_hf

    folder = tiny.folder("llama-tied", "causal-lm")
    out = tmp_path / "out"
    run(folder, pair_dataset(tmp_path / "data"), out, "--max-steps", 2, "--batch-size", 8, "--method", "none",
        "--lr", 1e-3)
    ids = random_ids("llama-tied", 2, 12, seed=3)
    with torch.no_grad():
        ours = load_model(out / "model", task="causal-lm")[0](ids, torch.ones_like(ids))
        theirs = load_hf(out / "model", "llama-tied", "causal-lm")(input_ids=ids).logits
        before = load_model(folder, task="causal-lm")[0](ids, torch.ones_like(ids))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    assert (ours - before).abs().max() > 1e-3
    assert not (out / "adapter").exists()
    with pytest.raises(AdapterError, match=r"out is not an adapter folder: it needs adapter_config.json and "
                                           r"adapter_model.safetensors; .*out/model is a fine-tuned model \(--method "
                                           r"none\): pass it as the model$"):
        check_adapter_folder(out)


def test_a_fully_fine_tuned_classifier_saves_the_datas_label_names(tiny, tmp_path):
    """config.json's id2label names the data's labels (the checkpoint's names, or LABEL_i, were kept), so
    transformers' pipelines print them; the merged export too."""
    from transformers import AutoConfig

    rows = [{"text": f"{word} review {i}", "label": word} for i, word in enumerate(["spam", "ham"] * 8)]
    for method, folder in (("none", "model"), ("lora", "merged")):
        bad_run(tiny, tmp_path / method, {"train": rows, "validation": rows}, "--method", method, "--task", "seq-cls",
                *(["--save-merged"] if method == "lora" else []))
        saved = AutoConfig.from_pretrained(str(tmp_path / method / "out" / folder))
        assert saved.id2label == {0: "ham", 1: "spam"} and saved.label2id == {"ham": 0, "spam": 1}


def test_shared_eval_and_test_split_is_evaluated_once(tiny, tmp_path, monkeypatch):
    """Without a test split the final evaluation of the best weights is reused for "after"; it equals
    evaluating the saved adapter afresh."""
    from lora import load_adapter

    calls = []
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: calls.append(a[1]) or evaluation.evaluate(*a, **k))
    folder = tiny.folder("distilbert", "base")
    dataset = keyword_dataset(tmp_path / "data", n_train=16, n_eval=8)  # train + validation only
    out = tmp_path / "out"
    after = run(folder, dataset, out, "--max-steps", 3, "--batch-size", 8, "--lr", 1e-2)
    assert len(calls) == 2 and calls[0] is calls[1]  # before, and the end of training; not a third time
    model, tok = load_model(folder, task="seq-cls", num_labels=2)
    model = load_adapter(model, out / "adapter").eval()
    fresh = evaluation.evaluate(model, calls[0], "seq-cls", tok, batch_size=16)
    assert fresh.keys() == after.keys()
    for key in after:
        assert after[key] == pytest.approx(fresh[key], abs=1e-6), key


def test_default_learning_rate_follows_the_run_length(tiny, tmp_path):
    """LoRA on a classifier: 5e-3 up to 64 optimizer steps, then 5e-3 * (64 / steps)^(1/3); other methods and
    tasks a fixed rate. A run without --lr peaks at that rate (its log's largest lr)."""
    assert train.default_lr("lora", "seq-cls", 64) == 5e-3
    assert train.default_lr("lora", "seq-cls", 512) == pytest.approx(2.5e-3)  # (64 / 512)^(1/3) = 1/2
    assert train.default_lr("lora", "causal-lm", 512) == 1e-3
    assert train.default_lr("none", "seq-cls", 512) == 5e-5
    dataset = keyword_dataset(tmp_path / "data", n_train=16, n_eval=8)
    for steps, peak in ((20, 5e-3), (216, 5e-3 * 2 / 3)):  # (64 / 216)^(1/3) = 2/3
        out = tmp_path / f"steps{steps}"
        run(tiny.folder("distilbert", "base"), dataset, out, "--max-steps", steps, "--batch-size", 8)
        assert max(row["lr"] for row in log_rows(out)) == pytest.approx(peak, rel=1e-9)
        assert json.loads((out / "args.json").read_text())["lr"] == pytest.approx(peak, rel=1e-9)


def test_the_log_shows_each_steps_own_learning_rate_and_a_long_warmup_is_noted(tiny, tmp_path, capsys):
    dataset, folder = keyword_dataset(tmp_path / "data"), tiny.folder("distilbert", "base")
    run(folder, dataset, tmp_path / "out", "--max-steps", 4, "--warmup", 0, "--lr", 0.01, "--batch-size", 4)
    lrs = [row["lr"] for row in log_rows(tmp_path / "out")]
    assert lrs == pytest.approx([0.01, 0.0075, 0.005, 0.0025], rel=1e-12)  # linear decay from the peak, step 1 first
    assert "note: --warmup" not in capsys.readouterr().err
    run(folder, dataset, tmp_path / "long", "--max-steps", 2, "--warmup", 5, "--lr", 0.01, "--batch-size", 4)
    assert ("note: --warmup 5 is 5 steps, as many as the run's 2 or more: the learning rate never reaches 0.01"
            in capsys.readouterr().err)
    with pytest.raises(LoadError, match=r"^--resume: the checkpoint is at step 2, and this run ends at step 1; pass a "
                                        r"larger --max-steps or --epochs to train on$"):
        run(folder, dataset, tmp_path / "long", "--max-steps", 1, "--warmup", 5, "--lr", 0.01, "--batch-size", 4,
            "--resume")


def test_a_resumed_run_made_longer_follows_the_longer_schedule_from_its_first_step(tiny, tmp_path):
    """The first resumed step ran at the saved (shorter) schedule's rate: 0.0 for a finished 2-step run resumed
    to 4 steps, where 4 steps from the start give 0.005."""
    dataset, folder = keyword_dataset(tmp_path / "data"), tiny.folder("distilbert", "base")
    common = ["--warmup", 0, "--lr", 0.01, "--batch-size", 4]
    run(folder, dataset, tmp_path / "resumed", "--max-steps", 2, *common)
    run(folder, dataset, tmp_path / "resumed", "--max-steps", 4, *common, "--resume")
    lrs = [row["lr"] for row in log_rows(tmp_path / "resumed")]
    assert lrs == pytest.approx([0.01, 0.005, 0.005, 0.0025], rel=1e-12)  # two steps of 2, then steps 3-4 of 4


POSITIVE_FLAGS = ("--rank", "--batch-size", "--grad-accum", "--max-length", "--num-virtual-tokens", "--eval-batch-size",
                  "--epochs", "--max-steps", "--train-samples", "--eval-samples", "--lr", "--alpha")
NON_NEGATIVE_FLAGS = ("--warmup", "--weight-decay", "--max-grad-norm", "--eval-every", "--early-stopping-patience",
                      "--save-every")


@pytest.mark.parametrize("flag,value,message", [
    *[(flag, 0, r"must be positive, got 0(\.0)?") for flag in POSITIVE_FLAGS],
    *[(flag, -1, r"must be 0 or more, got -1(\.0)?") for flag in NON_NEGATIVE_FLAGS],
    ("--dropout", 1, r"must be in \[0, 1\), got 1.0"),
    *[(flag, value, f"must be a finite number, got {value}") for value in ("nan", "inf")
      for flag in ("--lr", "--alpha", "--warmup", "--epochs", "--weight-decay", "--max-grad-norm", "--dropout")],
    *[("--seed", value, rf"must be in \[0, 2\^32 - 1\], got {value}") for value in (-1, 2**32)],  # numpy's traceback
    ("--target-modules", "query,", r"has an empty name in 'query,'"),  # was "--target-modules:  matches no ..."
    ("--modules-to-save", ",pooler", r"has an empty name in ',pooler'"),
    ("--target-modules", " ", r"is empty; name the layers to adapt, or leave the flag out for the defaults"),  # the defaults were taken
])
def test_out_of_range_flags_are_usage_errors(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--model", "x", f"{flag}={value}"])
    assert exc.value.code == 2
    assert re.search(f"error: {flag} {message}$", capsys.readouterr().err.strip())


def test_default_output_dir_names_the_model_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path / "my-model")
    assert train.parse_args(["--model", ".", "--dataset", "x/rt"]).output_dir == str(train.RUNS / "my-model-rt-lora")


def test_prompt_init_text_needs_text_init(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "x", "--method", "prompt", "--prompt-init", "random", "--prompt-init-text", "x"])
    assert capsys.readouterr().err.strip().endswith(
        "error: --prompt-init-text applies to --prompt-init text only, not to --prompt-init random")


def test_save_merged_needs_lora(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "x", "--method", "prompt", "--save-merged"])
    assert "--save-merged merges a LoRA adapter" in capsys.readouterr().err


def test_text_init_needs_a_text(capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--model", "x", "--method", "prompt", "--prompt-init-text", " "])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        "error: --prompt-init text needs a --prompt-init-text (or use --prompt-init random or sample_vocab)")


def test_early_stopping_needs_evaluations_during_training(capsys):
    """Without --eval-every there is one evaluation, at the end: the patience would never be used."""
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--model", "x", "--early-stopping-patience", "2"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        "error: --early-stopping-patience counts evaluations during training; it needs --eval-every")


def test_full_fine_tuning_of_a_quantized_base_is_a_usage_error(capsys):
    """It used to train the biases and norms only and then fail to save, after the whole run."""
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--model", "x", "--method", "none", "--quant", "nf4"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        "error: --method none trains every weight, which a quantized base cannot do; use --method lora with "
        "--quant nf4 (QLoRA), or --quant none")


@pytest.mark.parametrize("argv,message", [
    (["--method", "prompt", "--target-modules", "q_proj"], "--target-modules applies to --method lora only, not to "
                                                           "--method prompt"),
    (["--method", "prompt", "--rank", "4", "--use-dora"], "--rank, --use-dora apply to --method lora only, not to "
                                                         "--method prompt"),
    (["--method", "none", "--modules-to-save", "classifier"], "--modules-to-save applies to --method lora only, not "
                                                              "to --method none"),
    (["--num-virtual-tokens", "5"], "--num-virtual-tokens applies to --method prompt only, not to --method lora"),
    (["--method", "none", "--prompt-init", "random"], "--prompt-init applies to --method prompt only, not to "
                                                      "--method none"),
])
def test_another_methods_flag_is_a_usage_error(argv, message, capsys):
    """These flags were ignored without a word (a prompt-tuning run with --rank 4 trained no LoRA at all); a flag
    left at its default, or given its default, is no error."""
    with pytest.raises(SystemExit) as exc:
        train.parse_args(["--model", "x", *argv])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"error: {message}")
    train.parse_args(["--model", "x", "--method", "prompt", "--rank", "8", "--alpha", "16"])


# ------------------------------------------------------------------ gradient accumulation


def sgd(groups, lr):
    """Stands in for train.py's torch.optim.AdamW where two runs must end with equal weights."""
    return torch.optim.SGD(groups, lr=lr)


@pytest.mark.parametrize("task", ["seq-cls", "causal-lm"])
def test_grad_accumulation_equals_big_batch(tiny, tmp_path, monkeypatch, task):
    """2 micro-batches of 4 make the same optimizer steps as 1 batch of 8: the loss is divided by the
    step's total examples (seq-cls) or label tokens (causal-lm, answers of different lengths).

    The optimizer is plain SGD here. AdamW divides each gradient entry by its own running magnitude,
    so float rounding in an entry near zero became a difference of a few % of lr in the weights
    (2.7e-5 at lr 1e-3, in about one run in 30: tiny's WordPiece vocabulary, and so the data, changes
    from run to run). SGD's step is linear in the gradient: the runs differ by ~1e-7 while the
    adapter moves by ~0.04."""
    monkeypatch.setattr(torch.optim, "AdamW", sgd)
    if task == "seq-cls":  # no dropout: the two runs draw different masks
        folder = no_dropout_copy(tiny, "distilbert", "base", tmp_path / "model")
        dataset = keyword_dataset(tmp_path / "data", n_train=16, n_eval=8)
    else:
        folder = tiny.folder("llama", "causal-lm")  # no dropout in Llama
        dataset = pair_dataset(tmp_path / "data", n_train=16, n_eval=8)
    common = ["--max-steps", 4, "--lr", 0.5, "--seed", 3]  # 4 steps = 2 epochs of 16 rows
    run(folder, dataset, tmp_path / "big", "--batch-size", 8, "--grad-accum", 1, *common)
    run(folder, dataset, tmp_path / "accum", "--batch-size", 4, "--grad-accum", 2, *common)
    big, accum = log_rows(tmp_path / "big"), log_rows(tmp_path / "accum")
    assert [r["step"] for r in big] == [r["step"] for r in accum] == [1, 2, 3, 4]
    for b, a in zip(big, accum):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["epoch"] == b["epoch"]
    before = dict(load_model(folder, task=task)[0].named_parameters())
    trained = final_weights(tmp_path / "big")
    assert any("lora_A" in n for n in trained) and not set(trained) <= set(before)
    moved = max(w.abs().max().item() for k, w in trained.items() if "lora_B" in k)  # B starts at 0
    assert moved > 1e-3  # the tolerance below is small against how far the adapter moved
    assert_same_weights(trained, final_weights(tmp_path / "accum"), atol=1e-6)

    if task == "causal-lm":  # the check can fail: weigh each micro-batch's mean token loss equally
        original = train.loss_sum

        def micro_batch_mean(model, batch, task, virtual):
            total, n = original(model, batch, task, virtual)
            return total / n * len(batch["labels"]), n

        monkeypatch.setattr(train, "loss_sum", micro_batch_mean)
        monkeypatch.setattr(train, "count_targets", lambda batch, task, virtual: len(batch["labels"]))
        run(folder, dataset, tmp_path / "mean", "--batch-size", 4, "--grad-accum", 2, *common)
        mean = final_weights(tmp_path / "mean")
        assert max((trained[k] - mean[k]).abs().max().item() for k in trained) > 1e-3


@pytest.mark.parametrize("n_train,grad_accum,epochs,steps", [(24, 2, 2, 4), (16, 4, 3, 3)])
def test_epochs_are_passes_over_the_data_with_accumulation(tiny, tmp_path, monkeypatch, n_train, grad_accum, epochs,
                                                           steps):
    """A step takes --grad-accum micro-batches but ends with its epoch: N epochs see each row N times."""
    seen = []
    original = train.loss_sum

    def recording(model, batch, task, virtual):
        seen.append(len(batch["labels"]))
        return original(model, batch, task, virtual)

    monkeypatch.setattr(train, "loss_sum", recording)
    dataset = keyword_dataset(tmp_path / "data", n_train=n_train)
    run(tiny.folder("distilbert", "base"), dataset, tmp_path / "out", "--batch-size", 8, "--grad-accum", grad_accum,
        "--epochs", epochs)
    assert sum(seen) == epochs * n_train
    assert [r["epoch"] for r in log_rows(tmp_path / "out")] == [e for e in range(epochs) for _ in range(steps // epochs)]


# ------------------------------------------------------------------ resume


def resume_args(extra=()):
    # DistilBERT keeps its own dropout (0.1) and LoRA dropout is on: the RNG state matters.
    # 16 rows / batch 4 = 4 micro-batches per epoch, so 6 steps cross an epoch boundary;
    # linear schedule with warmup, so the scheduler state matters too.
    return ["--max-steps", 6, "--batch-size", 4, "--lr", 1e-2, "--dropout", 0.1, "--warmup", 2, *extra]


def interrupting(monkeypatch, name, on_call, exc=KeyboardInterrupt):
    """Make train.<name> raise `exc` on its `on_call`-th call."""
    original = getattr(train, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == on_call:
            raise exc("simulated interruption")
        return original(*args, **kwargs)

    monkeypatch.setattr(train, name, wrapper)
    return calls


def check_resume(tiny, tmp_path, monkeypatch, patch, on_call, extra=(), exc=KeyboardInterrupt,
                 expect_step=3, raised=None):
    folder = tiny.folder("distilbert", "base")
    dataset = keyword_dataset(tmp_path / "data")
    args = resume_args(extra)
    run(folder, dataset, tmp_path / "straight", *args)

    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        interrupting(m, patch, on_call, exc)
        with pytest.raises(raised or exc):
            run(folder, dataset, out, *args)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == expect_step
    # forgetting --resume must not start over on top of the interrupted run
    message = (rf"^{re.escape(str(out))} holds an interrupted run \(checkpoint at step {expect_step}\); continue it "
               r"with --resume, or start over in another --output-dir \(or after deleting this one\)$")
    with pytest.raises(FileExistsError, match=message):
        run(folder, dataset, out, *args)
    assert json.loads((out / "checkpoint" / "state.json").read_text()) == state
    run(folder, dataset, out, *args, "--resume")

    # every evaluation happens once, the interrupted one redone (it used to be skipped: another best step)
    assert [r["step"] for r in log_rows(out, "eval")] == [r["step"] for r in log_rows(tmp_path / "straight", "eval")]
    results = [json.loads((folder / "results.json").read_text()) for folder in (tmp_path / "straight", out)]
    assert results[0]["best_step"] == results[1]["best_step"]
    assert results[0]["after"] == pytest.approx(results[1]["after"], rel=1e-6)
    # the log reads as the straight run's: rows of steps after the checkpoint (and one cut short) are dropped
    assert [r["step"] for r in log_rows(out)] == [r["step"] for r in log_rows(tmp_path / "straight")] == list(range(1, 7))
    for ours, straight in zip(log_rows(out), log_rows(tmp_path / "straight")):
        assert ours["loss"] == pytest.approx(straight["loss"], rel=1e-6), f"train loss of step {ours['step']}"
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(out), atol=1e-6)


def test_resume_after_interrupt_in_a_step(tiny, tmp_path, monkeypatch):
    # loss_sum's 4th call = the forward of step 4: interrupted after step 3
    check_resume(tiny, tmp_path, monkeypatch, "loss_sum", on_call=4)


def test_resume_after_interrupt_in_the_step_after_an_evaluation(tiny, tmp_path, monkeypatch):
    """The checkpoint an interruption saves knows the evaluation that just finished: it used to hold the state
    from before it (the evaluation due, the old best step) beside the new best weights, so --resume evaluated
    step 2 again, and with lower patience reported one best step and saved another's weights."""
    # loss_sum's 3rd call = the forward of step 3, after the evaluation of step 2
    check_resume(tiny, tmp_path, monkeypatch, "loss_sum", on_call=3, extra=["--eval-every", 2], expect_step=2)


def test_a_repeated_signal_does_not_cut_the_save_short(tiny, tmp_path, monkeypatch):
    """torchrun passes Ctrl-C on to its workers again while they save: the save finishes, then the run stops
    (it was cut short, with "checkpoint saved" printed and no checkpoint written)."""
    folder, dataset, out = tiny.folder("distilbert", "base"), keyword_dataset(tmp_path / "data"), tmp_path / "out"
    original = train.save_checkpoint

    def signalled_again(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the checkpoint is written
        return original(*args, **kwargs)

    with monkeypatch.context() as m:
        interrupting(m, "loss_sum", on_call=4)  # the forward of step 4; no checkpoint was written before
        m.setattr(train, "save_checkpoint", signalled_again)
        with pytest.raises(KeyboardInterrupt):
            run(folder, dataset, out, *resume_args())
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["args.json", "checkpoint", "log.jsonl"]


def test_a_run_killed_while_saving_its_results_is_resumed(tiny, tmp_path, monkeypatch):
    """results.json is written last: a kill while the adapter was written left results.json beside no adapter
    (or another run's), and the run counted as finished."""
    folder, dataset = tiny.folder("distilbert", "base"), keyword_dataset(tmp_path / "data")
    args = resume_args()
    run(folder, dataset, tmp_path / "straight", *args)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupting(m, "save_output", on_call=1, exc=RuntimeError)
        with pytest.raises(RuntimeError):
            run(folder, dataset, out, *args)
    assert not (out / "results.json").exists()
    with pytest.raises(FileExistsError, match="holds an interrupted run"):
        run(folder, dataset, out, *args)
    run(folder, dataset, out, *args, "--resume")
    straight, resumed = (json.loads((f / "results.json").read_text()) for f in (tmp_path / "straight", out))
    assert resumed["after"] == pytest.approx(straight["after"], rel=1e-6) and resumed["best_step"] == straight["best_step"]
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(out), atol=1e-6)


def test_resume_after_sigterm_in_a_step(tiny, tmp_path, monkeypatch):
    """kill's SIGTERM saves the checkpoint as Ctrl-C does (it used to end the run with nothing saved)."""
    def sigterm(message):
        os.kill(os.getpid(), signal.SIGTERM)  # train's handler raises KeyboardInterrupt right here
        return AssertionError("SIGTERM did not stop the run")

    def unhandled(signum, frame):  # in place of the default action, which would end pytest itself
        raise AssertionError("train.py left SIGTERM to its default action: the run would end with nothing saved")

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        check_resume(tiny, tmp_path, monkeypatch, "loss_sum", on_call=4, exc=sigterm, raised=KeyboardInterrupt)
        assert signal.getsignal(signal.SIGTERM) is unhandled  # train.main put the previous handler back
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_resume_after_interrupt_during_evaluation(tiny, tmp_path, monkeypatch):
    # evaluate's calls: 1 = 'before', 2 = after step 3 (--eval-every 3)
    check_resume(tiny, tmp_path, monkeypatch, "evaluate", on_call=2, extra=["--eval-every", 3])


def test_resume_after_interrupt_during_the_final_evaluation(tiny, tmp_path, monkeypatch):
    # evaluate's calls: 1 = 'before', 2-6 = after steps 1-5, 7 = after step 6, the last
    check_resume(tiny, tmp_path, monkeypatch, "evaluate", on_call=7, extra=["--eval-every", 1], expect_step=6)


def test_resume_from_periodic_checkpoint_after_crash(tiny, tmp_path, monkeypatch):
    """A crash (not Ctrl-C: no checkpoint on the way out) in step 5 leaves the --save-every 3
    checkpoint of step 3; --resume from it redoes steps 4-6 exactly."""
    check_resume(tiny, tmp_path, monkeypatch, "loss_sum", on_call=5, extra=["--save-every", 3],
                 exc=RuntimeError)


def test_resume_with_other_settings_is_an_error(tiny, tmp_path):
    folder, dataset, out = tiny.folder("distilbert", "base"), keyword_dataset(tmp_path / "data"), tmp_path / "out"
    run(folder, dataset, out, "--max-steps", 1, "--batch-size", 4, "--rank", 4)
    message = (r"^--resume: other arguments than the interrupted run's \(--rank 2 here, 4 there; --lr 0\.01 here, "
               rf"[0-9.e-]+ there\); resume with those in {re.escape(str(out / 'args.json'))} \(only the length of "
               r"training, how often it evaluates and saves, and --eval-batch-size may change\)$")
    with pytest.raises(LoadError, match=message):
        run(folder, dataset, out, "--max-steps", 2, "--batch-size", 4, "--rank", 2, "--lr", 0.01, "--resume")
    # a longer run, the dataset's path spelt otherwise: allowed
    run(folder, dataset / ".." / dataset.name, out, "--max-steps", 2, "--batch-size", 4, "--rank", 4,
        "--eval-every", 1, "--resume")
    assert [r["step"] for r in log_rows(out)] == [1, 2]
    # without args.json (a run of an older version), the checkpoint's tensors still have to fit
    (out / "args.json").unlink()
    checkpoint = out / "checkpoint" / "trainable.safetensors"
    message = (rf"^{re.escape(str(checkpoint))} does not fit this run: .*lora_A\.default\.weight is \(4, 32\) there "
               r"and \(2, 32\) here \(and \d+ more\); resume with the settings in the run's args\.json$")
    with pytest.raises(LoadError, match=message):
        run(folder, dataset, out, "--max-steps", 3, "--batch-size", 4, "--rank", 2, "--resume")
    with pytest.raises(LoadError, match=r"does not fit this run: it holds .*v_lin\.lora_A\.default\.weight, which "
                                        r"this run does not train"):
        run(folder, dataset, out, "--max-steps", 3, "--batch-size", 4, "--rank", 4, "--target-modules", "q_lin",
            "--resume")


def test_a_finished_run_may_be_run_again_from_scratch(tiny, tmp_path):
    folder, dataset, out = tiny.folder("distilbert", "base"), keyword_dataset(tmp_path / "data"), tmp_path / "out"
    run(folder, dataset, out, "--max-steps", 1, "--batch-size", 4)
    run(folder, dataset, out, "--max-steps", 2, "--batch-size", 4)
    assert [r["step"] for r in log_rows(out)] == [1, 2]


def test_resume_without_checkpoint_is_an_error(tiny, tmp_path):
    dataset = keyword_dataset(tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="--resume: no checkpoint"):
        run(tiny.folder("distilbert", "base"), dataset, tmp_path / "out", "--max-steps", 1, "--resume")


# ------------------------------------------------------------------ early stopping


@pytest.mark.parametrize("patience", [1, 2])
def test_early_stopping(tiny, tmp_path, patience):
    """Every evaluation row has the same text, half labelled 0 and half 1: accuracy is 0.5 whatever
    the model predicts, so it never improves after the first evaluation."""
    write_jsonl(tmp_path / "data", "train", keyword_rows(16))
    dataset = write_jsonl(tmp_path / "data", "validation",
                          [{"text": "the movie was a movie", "label": i % 2} for i in range(8)])
    out = tmp_path / "out"
    run(tiny.folder("bert", "base"), dataset, out, "--max-steps", 10, "--batch-size", 8, "--lr", 1e-2,
        "--eval-every", 1, "--early-stopping-patience", patience)
    assert log_rows(out)[-1]["step"] == patience + 1 < 10
    evals = log_rows(out, "eval")
    assert [r["step"] for r in evals] == list(range(1, patience + 2))
    assert all(r["metrics"]["accuracy"] == 0.5 for r in evals)
    results = json.loads((out / "results.json").read_text())
    assert results["best_step"] == 1
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == patience + 1


def test_resuming_a_run_that_stopped_early_does_not_train_on(tiny, tmp_path):
    """It trained further (steps 7-12 in a tester's run) and replaced results and adapter, where a run that ended
    at --max-steps resumes to a re-evaluation only; more patience continues it."""
    write_jsonl(tmp_path / "data", "train", keyword_rows(16))
    dataset = write_jsonl(tmp_path / "data", "validation", [{"text": "the movie was a movie", "label": i % 2} for i in range(8)])
    out, flags = tmp_path / "out", ("--max-steps", 10, "--batch-size", 8, "--lr", 1e-2, "--eval-every", 1)
    run(tiny.folder("bert", "base"), dataset, out, *flags, "--early-stopping-patience", 1)
    adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    run(tiny.folder("bert", "base"), dataset, out, *flags, "--early-stopping-patience", 1, "--resume")
    assert log_rows(out)[-1]["step"] == 2 and (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    run(tiny.folder("bert", "base"), dataset, out, *flags, "--early-stopping-patience", 2, "--resume")
    assert log_rows(out)[-1]["step"] == 3


def test_the_checkpoint_keeps_the_best_weights_it_knows(tmp_path, capsys):
    """best/ may hold a later evaluation's weights than the checkpoint knows of (a kill after that evaluation);
    resuming restored nothing, so a run reported one best step and saved another's weights. The checkpoint
    now keeps best/ as it was (a hard link), and --resume puts it back."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "out"
    best = {"w": torch.ones(3)}
    train.replace_folder(out / "best", lambda tmp: save_file(best, str(tmp / "trainable.safetensors")))
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    train.save_checkpoint(out / "checkpoint", layer, optimizer, {"step": 3},
                          out / "best" / "trainable.safetensors")
    later = {"w": torch.zeros(3)}  # a later evaluation's, swapped in as the run does
    train.replace_folder(out / "best", lambda tmp: save_file(later, str(tmp / "trainable.safetensors")))
    train.restore_best(out, best_step=2)
    assert torch.equal(load_file(out / "best" / "trainable.safetensors")["w"], best["w"])
    train.save_checkpoint(out / "checkpoint", layer, optimizer, {"step": 1})
    train.restore_best(out, best_step=2)  # a checkpoint of the earlier layout: best/ as found, with a note
    assert torch.equal(load_file(out / "best" / "trainable.safetensors")["w"], best["w"])
    assert "predates keeping the best weights with it" in capsys.readouterr().err
    train.restore_best(out, best_step=None)  # no evaluation before this checkpoint: best/ is a later run's
    assert not (out / "best").exists()


def test_a_resumed_run_saves_the_best_weights_it_reports(tiny, tmp_path):
    """Killed after its last checkpoint (here: the run's last evaluation came after its last checkpoint), then
    resumed to a shorter end: the step it reports as best, the metrics it reports and the saved adapter agree.
    The resumed run also evaluates the step it now ends at, which it used to skip."""
    dataset = keyword_dataset(tmp_path / "data")
    out, folder = tmp_path / "out", tiny.folder("bert", "base")
    flags = ("--batch-size", 4, "--lr", 5e-3, "--eval-every", 2, "--metric", "loss", "--save-every", 3)
    run(folder, dataset, out, "--max-steps", 4, *flags)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    result = run(folder, dataset, out, "--max-steps", 3, *flags, "--resume")
    evals = {r["step"]: r["metrics"]["loss"] for r in log_rows(out, "eval")}
    assert sorted(evals) == [2, 3]  # the log reads as a run to step 3: step 4's rows are gone
    best_step = json.loads((out / "results.json").read_text())["best_step"]
    assert best_step == min(evals, key=evals.get) and result["loss"] == pytest.approx(evals[best_step], abs=1e-6)
    import eval as eval_cli

    again = eval_cli.main(["--model", str(folder), "--adapters", str(out / "adapter"), "--dataset", str(dataset),
                           "--split", "validation", "--max-length", "32"])
    assert again["out"]["loss"] == pytest.approx(evals[best_step], abs=1e-6)  # the column of out/adapter


def test_fractional_epochs_round_up_as_trainer(tiny, tmp_path):
    """--epochs 1.3 of 4 steps is ceil(5.2) = 6 steps, as transformers' Trainer sets max_steps =
    ceil(num_train_epochs x update steps per epoch) (round() gave 5)."""
    dataset = keyword_dataset(tmp_path / "data")  # 16 rows, batch 4: 4 steps an epoch
    run(tiny.folder("bert", "base"), dataset, tmp_path / "out", "--epochs", 1.3, "--batch-size", 4)
    assert log_rows(tmp_path / "out")[-1]["step"] == math.ceil(1.3 * 4) == 6


@pytest.mark.parametrize("pairs,max_length,specials", [(False, 2, 2), (True, 4, 3)])
def test_max_length_must_leave_room_for_the_text(tiny, tmp_path, pairs, max_length, specials):
    """Below the tokenizer's special tokens + a token of each text, the tokenizer does not cut at all: the run
    trained on whole texts, or stopped on a length past the positions."""
    rows = [{"sentence1": r["text"], "sentence2": r["text"], "label": r["label"]} for r in GOOD] if pairs else GOOD
    need = specials + (2 if pairs else 1)
    with pytest.raises(data.DataError, match=rf"^--max-length {max_length} leaves no room for the text: this tokenizer "
                                             rf"adds {specials} special tokens to each (sentence pair|text); use at least {need}$"):
        bad_run(tiny, tmp_path, {"train": rows, "validation": rows}, "--max-length", max_length)
    bad_run(tiny, tmp_path, {"train": rows, "validation": rows}, "--max-length", need)


# ------------------------------------------------------------------ metrics against transformers


def f1_by_hand(preds, labels, classes):
    scores = []
    for c in classes:
        tp = sum(p == c and y == c for p, y in zip(preds, labels))
        fp = sum(p == c and y != c for p, y in zip(preds, labels))
        fn = sum(p != c and y == c for p, y in zip(preds, labels))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return scores


def standardize_head(hf, folder, inputs):
    """Rescale the classifier so every logit has mean 0 and std 1 over `inputs`, and save it: the
    random heads (a saturated BERT pooler above all) otherwise tend to predict one class for all."""
    with torch.no_grad():
        logits = torch.cat([hf(input_ids=ids).logits for ids in inputs])
        mean, std = logits.mean(0), logits.std(0)
        hf.classifier.weight.div_(std[:, None])
        hf.classifier.bias.sub_(mean).div_(std)
    hf.save_pretrained(str(folder))


@pytest.mark.parametrize("family,num_labels", [("distilbert", 3), ("bert", 3), ("distilbert", 2), ("bert", 2)])
def test_seq_cls_metrics_equal_hand_computation(tmp_path, family, num_labels):
    from tiny import write_checkpoint

    folder = tmp_path / "model"
    hf = write_checkpoint(folder, family, "seq-cls", num_labels=num_labels)
    tokenizer = load_model(folder, task="seq-cls", num_labels=num_labels)[1]
    rows = keyword_rows(15, num_labels, seed=2)
    examples = data.encode_classification(rows, tokenizer, 32, list(range(num_labels)), "test")
    inputs = [torch.tensor([e["input_ids"]]) for e in examples]
    standardize_head(hf, folder, inputs)
    model = load_model(folder, task="seq-cls", num_labels=num_labels)[0]
    got = evaluation.evaluate(model, examples, "seq-cls", tokenizer, batch_size=4)  # padded batches

    labels = [row["label"] for row in rows]
    with torch.no_grad():  # transformers, one unpadded example at a time
        logits = torch.cat([hf(input_ids=ids).logits for ids in inputs])
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-4, "an argmax near a tie: pick other rows"
    preds = logits.argmax(-1).tolist()
    assert len(set(preds)) > 1, "one class predicted for every row: the F1 check would be weak"
    classes = sorted(set(preds) | set(labels))
    expected = {"accuracy": sum(p == y for p, y in zip(preds, labels)) / len(labels),
                "f1": sum(f1_by_hand(preds, labels, classes)) / len(classes),
                "loss": torch.nn.functional.cross_entropy(logits, torch.tensor(labels)).item()}
    if num_labels == 2:
        expected["f1_binary"] = f1_by_hand(preds, labels, [1])[0]
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def hf_example(hf_tok, row):
    """input_ids / labels built with transformers' tokenizer: -100 on the prompt, the answer (with its leading
    space) + eos scored."""
    if "question" in row:
        prompt = hf_tok(f"Question: {row['question']}\nAnswer:")["input_ids"]
        answer = hf_tok(" " + row["answer"], add_special_tokens=False)["input_ids"] + [hf_tok.eos_token_id]
        return prompt + answer, [-100] * len(prompt) + answer
    ids = hf_tok(row["text"])["input_ids"]
    return ids, list(ids)


@pytest.mark.parametrize("kind", ["pairs", "text"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_perplexity_equals_transformers(tiny, family, kind):
    from transformers import AutoTokenizer

    folder, hf = tiny.get(family, "causal-lm")
    model, tokenizer = load_model(folder, task="causal-lm")
    hf_tok = AutoTokenizer.from_pretrained(str(folder))
    rows = pair_rows(7) if kind == "pairs" else [{"text": " ".join(q for q, _ in PAIRS[i:i + 3])} for i in range(6)]
    examples = data.encode_causal_lm(rows, tokenizer, 64)  # 64 positions: nothing is cut
    got = evaluation.evaluate(model, examples, "causal-lm", tokenizer, batch_size=3)

    total, count = 0.0, 0
    with torch.no_grad():
        for row, example in zip(rows, examples):
            ids, labels = hf_example(hf_tok, row)
            assert example["input_ids"] == ids and example["labels"] == labels
            n = sum(y != -100 for y in labels[1:])  # HF shifts: label t is predicted at t - 1
            loss = hf(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss.item()
            total, count = total + loss * n, count + n
    if kind == "pairs":
        assert count == sum(len(hf_tok(" " + r["answer"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)
    assert got["loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def hf_sliding_window(hf, ids, window, stride):
    """The loop of transformers' perplexity guide: each window scores the tokens after the previous end."""
    length = len(ids)
    total, count, prev_end = 0.0, 0, 0
    with torch.no_grad():
        for begin in range(0, length, stride):
            end = min(begin + window, length)
            chunk = ids[begin:end][None]
            labels = chunk.clone()
            labels[:, :chunk.shape[1] - (end - prev_end)] = -100
            n = int((labels[:, 1:] != -100).sum())
            total += hf(input_ids=chunk, labels=labels).loss.item() * n
            count += n
            prev_end = end
            if end == length:
                break
    return total, count


@pytest.mark.parametrize("length,window,stride", [(150, 32, 16), (150, 32, 31), (150, 64, 24), (50, 64, 32)])
def test_sliding_window_perplexity_equals_transformers(tiny, length, window, stride):
    folder, hf = tiny.get("llama", "causal-lm")
    model = load_model(folder, task="causal-lm")[0]
    ids = random_ids("llama", 1, length, seed=5)[0]
    total, count = evaluation.sliding_window_perplexity(model, ids.tolist(), window, stride)
    ref_total, ref_count = hf_sliding_window(hf, ids, window, stride)
    assert count == ref_count
    assert total == pytest.approx(ref_total, rel=1e-5)
    assert count == length - 1  # every token but the first scored exactly once
    if window >= length:  # one window: the plain loss of the whole sequence
        with torch.no_grad():
            whole = hf(input_ids=ids[None], labels=ids[None]).loss.item()
        assert total / count == pytest.approx(whole, rel=1e-5)


@pytest.mark.parametrize("stride", [32, 40])
def test_sliding_window_without_overlap_scores_every_token_or_refuses(tiny, stride):
    model = load_model(tiny.folder("llama", "causal-lm"), task="causal-lm")[0]
    ids = random_ids("llama", 1, 150, seed=5)[0].tolist()
    try:
        _, count = evaluation.sliding_window_perplexity(model, ids, 32, stride)
    except ValueError:
        return  # refusing stride >= window is fine too
    assert count == len(ids) - 1


# ------------------------------------------------------------------ torchrun

# a subprocess's environment: offline, one thread each (two torchrun workers share the two cores)
SUBPROCESS_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(*argv, code=None):
    """train.py with argv on two torchrun processes (gloo), or `code` run by python -c with argv as sys.argv[1:]."""
    program = ["--no-python", sys.executable, "-c", code] if code else [str(ROOT / "train.py")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *program,
           *map(str, argv)]
    return subprocess.run(cmd, cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=180)



@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_processes_equal_one(tiny, tmp_path, monkeypatch):
    folder = no_dropout_copy(tiny, "bert", "seq-cls", tmp_path / "model")  # ranks draw different masks
    dataset = keyword_dataset(tmp_path / "data", n_train=24, n_eval=8, num_labels=NUM_LABELS)
    common = ["--model", str(folder), "--dataset", str(dataset), "--max-length", "16", "--max-steps", "3",
              "--lr", "0.5", "--eval-batch-size", "8"]
    with_sgd = ("import runpy, sys, torch; torch.optim.AdamW = lambda groups, lr: torch.optim.SGD(groups, lr=lr); "
                "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")  # as sgd()
    proc = torchrun(ROOT / "train.py", *common, "--batch-size", 4, "--output-dir", tmp_path / "ddp", code=with_sgd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setattr(torch.optim, "AdamW", sgd)
    train.main([*common, "--batch-size", "8", "--output-dir", str(tmp_path / "single")])

    ddp, single = log_rows(tmp_path / "ddp"), log_rows(tmp_path / "single")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [1, 2, 3]
    for d, s in zip(ddp, single):
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-5)
    trained = final_weights(tmp_path / "single")
    assert max(w.abs().max().item() for k, w in trained.items() if "lora_B" in k) > 1e-3  # B starts at 0
    assert_same_weights(trained, final_weights(tmp_path / "ddp"), atol=1e-6)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_resume_with_dropout_is_exact_and_keeps_the_process_count(tiny, tmp_path):
    """The ranks' batches pad to other lengths, so their generators drift apart; the checkpoint kept rank 0's state
    alone and a resumed job drew other masks on rank 1 (weights 0.03 off). Each step now seeds from (seed, step,
    rank). The data position counts global batches, so resuming on another number of processes is refused."""
    dataset = keyword_dataset(tmp_path / "data", n_train=24, n_eval=8, num_labels=NUM_LABELS)
    common = ["--model", str(tiny.folder("bert", "seq-cls")), "--dataset", str(dataset), "--max-length", "16",
              "--batch-size", "3", "--eval-batch-size", "8", "--lr", "0.01", "--schedule", "constant", "--warmup", "0",
              "--dropout", "0.1"]

    def train_on_two(*argv):
        proc = torchrun(*common, *argv)
        assert proc.returncode == 0, proc.stderr[-3000:]

    train_on_two("--max-steps", 4, "--output-dir", tmp_path / "straight")
    train_on_two("--max-steps", 2, "--output-dir", tmp_path / "resumed")
    with pytest.raises(LoadError, match=r"^--resume: the interrupted run ran on 2 process\(es\), this one on 1; "
                                        r"resume it on 2$"):
        train.main([*common, "--max-steps", "4", "--output-dir", str(tmp_path / "resumed"), "--resume"])
    train_on_two("--max-steps", 4, "--output-dir", tmp_path / "resumed", "--resume")
    straight, resumed = log_rows(tmp_path / "straight"), log_rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"), atol=0)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_rank_0_saves_when_another_process_stops_first(tiny, tmp_path):
    """Ctrl-C reaches every process of a torchrun job, and the first to act leaves the others' all-reduce failing
    ("Connection closed by peer"): rank 0 then saved no checkpoint. Here rank 1 alone is interrupted in step 3's
    forward; rank 0 saves step 2's checkpoint, and the job resumed from it ends with the uninterrupted run's
    weights."""
    dataset = keyword_dataset(tmp_path / "data", n_train=24, n_eval=8, num_labels=NUM_LABELS)
    common = ["--model", str(tiny.folder("bert", "seq-cls")), "--dataset", str(dataset), "--max-length", "16",
              "--batch-size", "2", "--eval-batch-size", "8", "--lr", "0.01", "--schedule", "constant", "--warmup", "0",
              "--max-steps", "4"]
    rank_1_stops = ("import os, sys, train\n"
                    "loss_sum, steps = train.loss_sum, []\n"
                    "def stop_in_step_3(*args):\n"
                    "    steps.append(1)\n"
                    "    if os.environ['RANK'] == '1' and len(steps) == 3:\n"
                    "        raise KeyboardInterrupt\n"
                    "    return loss_sum(*args)\n"
                    "train.loss_sum = stop_in_step_3\n"
                    "train.main(sys.argv[1:])\n")

    stopped = torchrun(*common, "--output-dir", tmp_path / "stopped", code=rank_1_stops)
    assert stopped.returncode != 0
    # "another process stopped (the error below)", or "interrupted" where torchrun's SIGTERM came first
    assert " at step 2: checkpoint saved in " in stopped.stderr, stopped.stderr[-3000:]
    assert json.loads((tmp_path / "stopped" / "checkpoint" / "state.json").read_text())["step"] == 2
    for run_dir, extra in (("stopped", ["--resume"]), ("straight", [])):
        proc = torchrun(*common, "--output-dir", tmp_path / run_dir, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["loss"] for r in log_rows(tmp_path / "stopped")] == [r["loss"] for r in log_rows(tmp_path / "straight")]
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "stopped"), atol=0)


# ------------------------------------------------------------------ bad input


def bad_run(tiny, tmp_path, splits, *extra, family=("bert", "base")):
    for split, rows in splits.items():
        write_jsonl(tmp_path / "data", split, rows)
    return run(tiny.folder(*family), tmp_path / "data", tmp_path / "out", "--max-steps", 1, *extra)


GOOD = keyword_rows(8)


def test_wrong_target_module_fails_at_once_in_one_line(tiny, tmp_path, monkeypatch):
    """Before the first evaluation (the adapter is added first; that evaluation runs with it switched off),
    and from the command line as one line naming the layers that exist."""
    dataset = keyword_dataset(tmp_path / "data")
    folder = tiny.folder("distilbert", "base")
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: pytest.fail("evaluated before the adapter was checked"))
    message = ("target modules ['qury'] match no linear layer of this distilbert model; its linear layers are "
               "named: classifier, k_lin, lin1, lin2, out_lin, pre_classifier, q_lin, v_lin")
    with pytest.raises(AdapterError) as exc:
        run(folder, dataset, tmp_path / "out", "--target-modules", "qury")
    assert str(exc.value) == message
    with pytest.raises(AdapterError) as exc:  # one misspelt name among names that match (was trained without it)
        run(folder, dataset, tmp_path / "out", "--target-modules", "q_lin,vlin")
    assert str(exc.value) == ("--target-modules: vlin matches no linear layer of this model; its linear layers are "
                              "named: classifier, k_lin, lin1, lin2, out_lin, pre_classifier, q_lin, v_lin")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", str(folder), "--dataset", str(dataset),
                           "--output-dir", str(tmp_path / "cli"), "--max-length", "32", "--target-modules", "qury"],
                          cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=180)
    assert (proc.returncode, proc.stderr.splitlines(), proc.stdout) == (1, [f"error: {message}"], "")


@pytest.mark.parametrize("train_rows,eval_rows,extra,message", [
    ([{"text": "a film"}] * 4, [{"text": "a film"}] * 4, ["--task", "seq-cls"],
     r"split 'train' lacks column\(s\) label needed by seq-cls; it has text"),
    ([{"body": "a film", "label": 0}] * 4, [{"body": "a film", "label": 0}] * 4, ["--task", "seq-cls"],
     r"split 'train' lacks column\(s\) text needed by seq-cls; it has body, label"),
    (GOOD, [{"text": "a film"}] * 4, [], r"split 'validation' lacks column\(s\) label"),
    ([{"body": "a film", "stars": 3}] * 4, [{"body": "a film", "stars": 3}] * 4, [],
     r"cannot infer the task from columns \['body', 'stars'\]; pass --task"),
    (pair_rows(4), pair_rows(4), ["--task", "generate-label"], r"split 'train' lacks column\(s\) label, text"),
], ids=["no-label", "no-text", "eval-no-label", "no-task", "pairs-as-generate-label"])
def test_missing_columns(tiny, tmp_path, train_rows, eval_rows, extra, message):
    with pytest.raises(data.DataError, match=message):
        bad_run(tiny, tmp_path, {"train": train_rows, "validation": eval_rows}, *extra)


def test_row_missing_a_column(tiny, tmp_path):
    rows = GOOD[:3] + [{"text": "a film without a label"}] + GOOD[3:]
    with pytest.raises(data.DataError, match="label"):
        bad_run(tiny, tmp_path, {"train": rows, "validation": GOOD})


@pytest.mark.parametrize("empty", ["train", "validation"])
def test_empty_split(tiny, tmp_path, empty):
    splits = {"train": GOOD, "validation": GOOD, empty: []}
    with pytest.raises(data.DataError, match=f"split '{empty}' is empty"):
        bad_run(tiny, tmp_path, splits, "--task", "seq-cls")


def test_empty_train_file_without_task(tiny, tmp_path):
    with pytest.raises(data.DataError, match="empty"):
        bad_run(tiny, tmp_path, {"train": [], "validation": GOOD})


def test_unknown_task(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bad_run(tiny, tmp_path, {"train": GOOD, "validation": GOOD}, "--task", "token-cls")
    assert exc.value.code == 2
    assert "--task: invalid choice: 'token-cls'" in capsys.readouterr().err


@pytest.mark.parametrize("split", ["train", "validation"])
def test_minus_one_beside_other_labels_is_a_class(tiny, tmp_path, split):
    """-1/0/1 sentiment: before, -1 beside 0 was read as "no label" and the run refused the labelled split."""
    three = [dict(row) for row in GOOD]
    three[5]["label"] = -1
    bad_run(tiny, tmp_path, {"train": GOOD, "validation": GOOD, split: three})
    assert json.loads((tmp_path / "out" / "results.json").read_text())["labels"] == [-1, 0, 1]


def test_a_split_labelled_minus_one_throughout_is_not_evaluated_unless_named(tiny, tmp_path, capsys):
    """GLUE's layout: the test split has no labels (-1 throughout). By default the validation split is evaluated
    in its place (the run stopped on "label -1 is out of range"); named with --test-split, the error says what to do."""
    unlabelled = [dict(row, label=-1) for row in GOOD]
    bad_run(tiny, tmp_path, {"train": GOOD, "validation": GOOD, "test": unlabelled})
    assert "note: split 'test' has no labels (-1 throughout, as GLUE's test splits); split 'validation' is evaluated " \
           "instead" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "results.json").read_text())["labels"] == [0, 1]
    message = (r"^split 'test' row 0: label -1 is out of range \(expected one of \[0, 1\]\); -1 marks a row without a "
               r"label here \(GLUE's test splits, SNLI's pairs without a gold label\): leave such rows out, or pick a "
               r"labelled split \(train.py --test-split / --eval-split, eval.py --split\)$")
    with pytest.raises(data.DataError, match=message):
        bad_run(tiny, tmp_path / "named", {"train": GOOD, "validation": GOOD, "test": unlabelled}, "--test-split", "test")


def test_label_set_comes_from_the_whole_splits(tiny, tmp_path):
    """A subset that misses a rare class keeps its head output (before, the head shrank and ids shifted)."""
    rows = [{"text": f"review {i}", "label": "neutral" if i == 0 else ("pos" if i % 2 else "neg")} for i in range(8)]
    assert "neutral" not in {r["label"] for r in data.subsample(rows, 3, 0)}  # the run's train subset (seed 0)
    bad_run(tiny, tmp_path, {"train": rows, "validation": rows[1:]}, "--train-samples", 3)
    assert json.loads((tmp_path / "out" / "results.json").read_text())["labels"] == ["neg", "neutral", "pos"]


@pytest.mark.parametrize("labels,message", [
    ([0] * 8, r"^split 'train' has one label \(0\); training a classifier needs two or more$"),
    ([[0]] + [1] * 7, r"^split 'train' row 0: label \[0\] is not one class \(a string or a number\)$"),
])
def test_one_label_or_a_list_label_is_an_error(tiny, tmp_path, labels, message):
    rows = [{"text": f"review {i}", "label": y} for i, y in enumerate(labels)]
    with pytest.raises(data.DataError, match=message):
        bad_run(tiny, tmp_path, {"train": rows, "validation": rows}, "--task", "seq-cls")


def test_fewer_examples_than_one_global_batch(tiny, tmp_path, monkeypatch):
    """Several processes drop an epoch's last partial global batch; with none left the run stopped on a
    ZeroDivisionError after the first evaluation (2 processes faked: the check comes before any collective)."""
    monkeypatch.setattr(train, "init_distributed", lambda: (0, 2))
    with pytest.raises(data.DataError, match=r"^6 training examples are fewer than one global batch \(4 x 2 "
                                             r"processes\); lower --batch-size$"):
        bad_run(tiny, tmp_path, {"train": GOOD[:6], "validation": GOOD}, "--batch-size", 4)


def test_generate_label_needs_room_for_the_text(tiny, tmp_path):
    _, tok = load_model(tiny.folder("gpt2", "causal-lm"), task="causal-lm")
    room = max(len(ids) for ids in data.label_word_ids(tok, ["negative", "positive"]))  # the longest word + eos
    with pytest.raises(data.DataError, match=rf"^generate-label keeps {room} of --max-length's tokens for the longest "
                                             rf"label word and eos; --max-length {room} leaves none for the text$"):
        bad_run(tiny, tmp_path, {"train": GOOD, "validation": GOOD}, "--task", "generate-label", "--max-length", room,
                family=("gpt2", "causal-lm"))


def test_generate_label_words_longer_than_eight_tokens_fit_the_positions(tiny, tmp_path):
    """Every prompt is cut to leave room for the longest word: at --max-length = the model's 64 positions, words of
    more than 8 tokens went past the last position when they were scored (a traceback at the first evaluation)."""
    words = "the quick brown fox jumps over the lazy dog,machine learning models learn patterns from data"
    long_rows = [{"text": " ".join(["word"] * 80), "label": i % 2} for i in range(4)]
    result = bad_run(tiny, tmp_path, {"train": long_rows, "validation": long_rows}, "--task", "generate-label",
                     "--max-length", 64, "--label-words", words, family=("gpt2", "causal-lm"))
    assert set(result) >= {"accuracy", "f1"}


def test_labels_that_are_not_all_ints_are_names():
    """One non-int label makes every label a name, the ints included (0 and "0" are the same class)."""
    rows = [{"label": 1.5}, {"label": 0}, {"label": "pos"}, {"label": 1.5}]
    names = data.label_names([rows])
    assert names == ["0", "1.5", "pos"]
    assert data.label_ids(rows, names, "train") == [1, 0, 2, 1]
    ints = [{"label": 1}, {"label": 0}]
    assert data.label_names([ints]) == [0, 1] and data.label_ids(ints, [0, 1], "train") == [1, 0]


@pytest.mark.parametrize("flag", ["--eval-split", "--test-split"])
def test_a_named_split_the_dataset_lacks_is_an_error(tiny, tmp_path, flag):
    """Not a silent fallback to another split."""
    with pytest.raises(data.DataError, match="split 'dev' not found; the dataset has test, train, validation"):
        bad_run(tiny, tmp_path, {"train": GOOD, "validation": GOOD, "test": GOOD}, flag, "dev")


def test_label_words_must_match_labels(tiny, tmp_path):
    with pytest.raises(data.DataError, match=r"--label-words gives 3 words for 2 labels \[0, 1\]"):
        bad_run(tiny, tmp_path, {"train": GOOD, "validation": GOOD}, "--task", "generate-label",
                "--label-words", "bad,good,okay", family=("gpt2", "causal-lm"))
    for words in ("good,good", "bad,"):
        with pytest.raises(data.DataError, match=r"^--label-words must give a different, non-empty word for each"):
            bad_run(tiny, tmp_path, {"train": GOOD, "validation": GOOD}, "--task", "generate-label",
                    "--label-words", words, family=("gpt2", "causal-lm"))


def test_max_length_beyond_positions(tiny, tmp_path):
    with pytest.raises(LoadError, match="--max-length 100 exceeds .*maximum of 64 positions"):
        bad_run(tiny, tmp_path, {"train": GOOD, "validation": GOOD}, "--max-length", 100)


def test_causal_lm_needs_a_decoder(tiny, tmp_path):
    with pytest.raises(LoadError, match="needs a decoder"):
        bad_run(tiny, tmp_path, {"train": pair_rows(4), "validation": pair_rows(4)}, "--task", "causal-lm")


# ------------------------------------------------------------------ generate-label, prompt tuning


def assert_adapter_folder(folder):
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "adapter_config.json").read_text())
    return config, load_file(str(folder / "adapter_model.safetensors"))


def test_generate_label_end_to_end(tiny, tmp_path):
    dataset = keyword_dataset(tmp_path / "data", n_train=8, n_eval=8)
    out = tmp_path / "out"
    after = run(tiny.folder("gpt2", "causal-lm"), dataset, out, "--task", "generate-label",
                "--label-words", "terrible,wonderful", "--max-steps", 2, "--batch-size", 4, "--lr", 1e-2)
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "generate-label" and results["labels"] == [0, 1]
    assert results["after"] == after
    for metrics in (results["before"], after):
        assert 0 <= metrics["accuracy"] <= 1 and 0 <= metrics["f1"] <= 1
        assert metrics["accuracy"] in {k / 8 for k in range(9)}  # a fraction of the 8 rows
    assert all(math.isfinite(r["loss"]) for r in log_rows(out))
    config, tensors = assert_adapter_folder(out / "adapter")
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert any("lora_A" in k for k in tensors) and any("lora_B" in k for k in tensors)


def test_prompt_tuning_end_to_end(tiny, tmp_path):
    dataset = pair_dataset(tmp_path / "data", n_train=8, n_eval=4)
    out = tmp_path / "out"
    after = run(tiny.folder("llama", "causal-lm"), dataset, out, "--method", "prompt", "--num-virtual-tokens", 4,
                "--max-steps", 3, "--batch-size", 4, "--lr", 3e-2)
    assert math.isfinite(after["loss"])
    config, tensors = assert_adapter_folder(out / "adapter")
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 4
    assert list(tensors) == ["prompt_embeddings"] and tensors["prompt_embeddings"].shape == (4, 32)
    trained = load_file(str(out / "best" / "trainable.safetensors"))  # the weights the adapter was saved from
    assert len(trained) == 1, f"prompt tuning should train the prompt only, got {list(trained)}"
    assert torch.equal(next(iter(trained.values())), tensors["prompt_embeddings"])


def test_a_module_to_save_that_matches_nothing_is_an_error(tiny, tmp_path):
    with pytest.raises(AdapterError, match=r"--modules-to-save: 'clasifier' matches no module of this model; its "
                                           r"modules are named: .*classifier, .*q_lin"):
        bad_run(tiny, tmp_path, {"train": GOOD, "validation": GOOD}, "--modules-to-save", "classifier,clasifier",
                family=("distilbert", "base"))


def test_output_folder_that_cannot_be_made_fails_before_any_evaluation(tiny, tmp_path, monkeypatch):
    dataset = keyword_dataset(tmp_path / "data")
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: pytest.fail("evaluated before the output folder was made"))
    with pytest.raises(LoadError, match=r"^--output-dir .*a-file is a file; name a folder$"):  # was errno's text
        run(tiny.folder("distilbert", "base"), dataset, tmp_path / "a-file", "--max-steps", 1)


def test_evaluation_before_training_sees_the_base_model(tiny, tmp_path, monkeypatch):
    """The soft prompt is added before the first evaluation (so a bad --method setting fails at once);
    that evaluation must still score the base model: the prompt switched off."""
    ids = random_ids("llama", 2, 6)
    mask = torch.ones_like(ids)
    logits = {}
    add_method, evaluate = train.add_method, train.evaluate

    def recording_add_method(args, model, tokenizer):
        logits["base"] = run_ours(model, ids, mask)
        model = add_method(args, model, tokenizer)
        logits["with the prompt"] = run_ours(model, ids, mask)
        return model

    def recording_evaluate(model, *args, **kwargs):
        logits.setdefault("first evaluation", run_ours(model, ids, mask))
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(train, "add_method", recording_add_method)
    monkeypatch.setattr(train, "evaluate", recording_evaluate)
    run(tiny.folder("llama", "causal-lm"), pair_dataset(tmp_path / "data", n_train=8, n_eval=4), tmp_path / "out",
        "--method", "prompt", "--num-virtual-tokens", 4, "--max-steps", 1, "--batch-size", 4)
    assert not torch.allclose(logits["with the prompt"], logits["base"])  # so the check below can fail
    assert torch.equal(logits["first evaluation"], logits["base"])


def test_all_linear_targets(tiny, tmp_path):
    """--target-modules all-linear: an adapter on every linear layer of the decoder, none on the LM head."""
    folder, dataset, out = tiny.folder("gpt2", "causal-lm"), pair_dataset(tmp_path / "data", 8, 4), tmp_path / "out"
    run(folder, dataset, out, "--max-steps", 1, "--batch-size", 4, "--target-modules", "all-linear")
    config, tensors = assert_adapter_folder(out / "adapter")
    layers = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in tensors if "lora_A" in k}
    expected = {f"transformer.h.{i}.{name}" for i in range(2)
                for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert layers == expected and sorted(config["target_modules"]) == sorted(expected)


def test_empty_texts_are_left_out_and_missing_answers_are_errors(tiny, tmp_path, capsys):
    """causal-lm: rows with no token to predict (empty texts) are left out with a note, a split of them only
    is an error; a null answer is an error (it used to train on the word "None")."""
    texts = [{"text": t} for t in ("the movie was wonderful", "", "a terrible film", "", "it rained")]
    write_jsonl(tmp_path / "plain", "train", texts)
    run(tiny.folder("gpt2", "causal-lm"), write_jsonl(tmp_path / "plain", "validation", texts), tmp_path / "out",
        "--max-steps", 1, "--batch-size", 2)
    err = capsys.readouterr().err
    for split in ("train", "validation"):
        assert f"split {split!r}: 2 of 5 rows have no token to predict (empty text) and are left out" in err
    message = r"^split 'train': no row has a token to predict \(empty texts, or --max-length 32 too short\?\)$"
    with pytest.raises(data.DataError, match=message):
        bad_run(tiny, tmp_path, {"train": [{"text": ""}] * 4, "validation": texts}, family=("gpt2", "causal-lm"))
    rows = pair_rows(4)
    rows[2]["answer"] = None
    with pytest.raises(data.DataError, match=r"^split 'train' row 2: missing answer$"):
        bad_run(tiny, tmp_path / "pairs", {"train": rows, "validation": pair_rows(2)}, family=("gpt2", "causal-lm"))


def test_csv_and_parquet_read_like_jsonl(tmp_path):
    """Twelve integer labels: CSV's strings become ints again ("10" used to sort between "1" and "2", so the
    head's output 2 meant label 10); an empty CSV label cell is a missing label."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"review number {i}", "label": (7 * i) % 12} for i in range(24)]
    write_jsonl(tmp_path / "jsonl", "train", rows)
    (tmp_path / "csv").mkdir()
    with open(tmp_path / "csv" / "train.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, ["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "parquet" / "train.parquet")
    for kind in ("jsonl", "csv", "parquet"):
        loaded = data.load_splits(tmp_path / kind)["train"]
        assert loaded == rows, kind
        names = data.label_names([loaded])
        assert names == list(range(12)) and data.label_ids(loaded, names, "train") == [r["label"] for r in rows]
    with open(tmp_path / "csv" / "train.csv", "a", newline="", encoding="utf-8") as f:
        f.write("a review without its label,\n")
    loaded = data.load_splits(tmp_path / "csv")["train"]
    with pytest.raises(data.DataError, match=r"^split 'train' row 24: missing label$"):
        data.check_rows(loaded, "seq-cls", "train")


def test_split_files_as_the_hub_lays_them_out(tmp_path):
    """datasets.load_dataset is the reference: the Hub's shards (train-00000-of-00002.parquet, ...) are one
    split, and files that begin with a byte-order mark read as without it. Before, each shard was a split of
    its own and a BOM was a JSON error (a CSV's first column was named '\\ufefftext'). A split in two
    formats, a file that is not UTF-8 and a damaged Parquet file are one line each (were a silent pick of
    one file and two tracebacks)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"review number {i}", "label": i % 2} for i in range(30)]
    hub = tmp_path / "hub"
    hub.mkdir()
    for i, part in enumerate((rows[:10], rows[10:25], rows[25:])):
        pq.write_table(pa.Table.from_pylist(part), hub / f"train-{i:05d}-of-00003.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:4]), hub / "test-00000-of-00001.parquet")
    bom, bom_csv = tmp_path / "bom", tmp_path / "bom_csv"
    bom.mkdir()
    bom_csv.mkdir()
    for split, part in (("train", rows), ("test", rows[:4])):
        (bom / f"{split}.jsonl").write_text("\ufeff" + "".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        lines = "".join(f"{r['text']},{r['label']}\n" for r in part)
        (bom_csv / f"{split}.csv").write_text("\ufefftext,label\n" + lines, encoding="utf-8")
    for folder in (hub, bom, bom_csv):
        reference = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf-cache"))  # not ~/.cache
        ours = data.load_splits(folder)
        assert set(ours) == set(reference) == {"train", "test"}, folder.name
        for split in ours:
            assert ours[split] == list(reference[split]), (folder.name, split)
    (bom / "train.csv").write_text("text,label\nfine,1\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"^.*bom: split 'train' is in two files, train.csv and train.jsonl; "
                                             r"keep one$"):
        data.load_splits(bom)
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "test.jsonl").write_bytes('{"text": "café", "label": 0}\n'.encode("latin-1"))
    with pytest.raises(data.DataError, match=r"test.jsonl: not UTF-8 text \(byte 0xe9 at offset 13\); save it as "
                                             r"UTF-8$"):
        data.load_splits(latin)
    (latin / "test.jsonl").write_text("not a parquet file")
    (latin / "test.jsonl").rename(latin / "test.parquet")
    with pytest.raises(data.DataError, match=r"test.parquet: not a readable Parquet file \(.*\)$"):
        data.load_splits(latin)


def test_json_rows_must_be_objects_and_a_damaged_state_is_one_line(tiny, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "train.json").write_text('["a review", "another"]')
    with pytest.raises(data.DataError, match=r"train\.json: item 0: a row must be a JSON object of columns, found a "
                                             r"str$"):
        data.load_splits(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "train.jsonl").write_text('{"text": "fine", "label": 0}\n\n[1, 0]\n')
    with pytest.raises(data.DataError, match=r"train\.jsonl:3: a row must be a JSON object of columns, found a list$"):
        data.load_splits(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.json").write_text('[{"text": "fine", "label": 0}, {"text": ')
    with pytest.raises(data.DataError, match=r"train\.json: not valid JSON \(Expecting value, line 1 column 41\)$"):
        data.load_splits(tmp_path / "c")
    folder, dataset, out = tiny.folder("distilbert", "base"), keyword_dataset(tmp_path / "data"), tmp_path / "out"
    run(folder, dataset, out, "--max-steps", 1, "--batch-size", 4)
    good = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    start_over = r".*\); start over in another --output-dir, or after deleting .*out$"
    damages = [("state.json", b'{"step": 1, ', r"checkpoint/state\.json: not valid JSON \(.*\)$"),
               ("state.json", b'{"step": 1}', r"checkpoint/state\.json is damaged \(KeyError: .*before" + start_over),
               ("trainable.safetensors", good["trainable.safetensors"][:100],
                r"checkpoint/trainable\.safetensors is damaged \(SafetensorError" + start_over),
               ("optimizer.pt", good["optimizer.pt"][:100],
                r"checkpoint/optimizer\.pt is damaged \(RuntimeError" + start_over)]
    for name, content, message in damages:  # each one line (were tracebacks), naming the file
        for good_name, good_content in good.items():
            (out / "checkpoint" / good_name).write_bytes(good_content)
        (out / "checkpoint" / name).write_bytes(content)
        with pytest.raises(LoadError, match=message):
            run(folder, dataset, out, "--max-steps", 2, "--batch-size", 4, "--resume")


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "llama"])
def test_prompt_and_answer_tokenize_as_their_joined_text(tiny, family):
    """A careful transformers user tokenizes prompt + answer as one text (TRL's prompt/completion
    datasets do): the answer's first word keeps its leading-space token. Before, the prompt ended in a
    space, which became a token of its own ("Answer", ":", " ", "The" instead of "Answer", ":", " The")."""
    from transformers import AutoTokenizer

    folder = tiny.folder(family, "causal-lm")
    tok, reference = load_model(folder, task="causal-lm")[1], AutoTokenizer.from_pretrained(folder)
    rows = [{"question": "how many legs does a spider have?", "answer": "The spider has 8 legs."},
            {"document": "The cat sat on the mat all day.", "summary": "A cat rested."}]
    for row in rows:
        (example,) = data.encode([row], "causal-lm", tok, 64)
        prompt, answer = (f.format(v) for f, v in zip(data.PAIR_FORMATS[next(iter(row))], row.values()))
        joined = reference(prompt + answer)["input_ids"] + [tok.eos_token_id]
        assert example["input_ids"] == joined
        assert example["labels"][:len(example["prompt_ids"])] == [-100] * len(example["prompt_ids"])
        assert example["labels"][len(example["prompt_ids"]):] == reference(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_a_prompt_cut_from_the_left_keeps_bos(tiny):
    """Cutting a long prompt keeps the tokenizer's BOS in front, as transformers' truncation_side="left"
    does; the ids used to be cut after BOS was added, so every cut prompt started mid-text without it."""
    from transformers import AutoTokenizer

    folder = tiny.folder("llama", "causal-lm")
    tok, reference = load_model(folder, task="causal-lm")[1], AutoTokenizer.from_pretrained(folder, truncation_side="left")
    question = "The quick brown fox jumps over the lazy dog. " * 4
    (example,) = data.encode([{"question": question, "answer": "It was."}], "causal-lm", tok, 24)
    prompt = data.PAIR_FORMATS["question"][0].format(question)
    n_prompt = example["labels"].count(-100)
    assert example["input_ids"][:n_prompt] == reference(prompt, truncation=True, max_length=n_prompt)["input_ids"]
    assert example["prompt_ids"] == reference(prompt, truncation=True, max_length=24)["input_ids"]
    assert example["input_ids"][0] == example["prompt_ids"][0] == tok.bos_token_id

    review = {"text": "This movie was terrible, a complete waste of time. " * 5, "label": 0}
    (example,) = data.encode([review], "generate-label", tok, 20, names=[0, 1], words=["negative", "positive"])
    assert example["input_ids"][0] == example["prompt_ids"][0] == tok.bos_token_id
    assert example["prompt_ids"] == reference(data.LABEL_PROMPT.format(text=review["text"]), truncation=True,
                                              max_length=len(example["prompt_ids"]))["input_ids"]


def test_generate_label_cuts_every_prompt_to_the_same_room(tiny):
    """With label words of different lengths, each training prompt is cut to leave room for the longest word
    (as scoring cuts them); before, a label's own word length set its prompt's, which leaked the label."""
    tok = load_model(tiny.folder("gpt2", "causal-lm"), task="causal-lm")[1]
    words = ["bad", "unfavourable and disappointing"]
    rows = [{"text": "word " * 100, "label": y} for y in (0, 1)]
    examples = data.encode(rows, "generate-label", tok, 40, names=[0, 1], words=words)
    room = max(len(ids) for ids in data.label_word_ids(tok, words))
    assert [len(e["prompt_ids"]) for e in examples] == [40 - room] * 2
    assert [e["labels"].count(-100) for e in examples] == [40 - room] * 2
    assert examples[0]["input_ids"][:40 - room] == examples[1]["input_ids"][:40 - room]


def test_rouge_prompts_are_cut_to_max_length_and_must_leave_room(tiny, tmp_path):
    tok = load_model(tiny.folder("gpt2", "causal-lm"), task="causal-lm")[1]
    rows = [{"question": "how many legs does a spider have, and how many does an ant have? " * 3, "answer": "8 and 6"}]
    prompt = tok.encode(data.PAIR_FORMATS["question"][0].format(rows[0]["question"]))
    assert len(prompt) > 20
    (example,) = data.encode(rows, "causal-lm", tok, 20)
    assert example["prompt_ids"] == prompt[-20:]  # as the training input's prompt is cut: from the left
    with pytest.raises(LoadError, match=r"^8 prompt tokens \+ 64 new tokens exceed the model's maximum of 64 positions$"):
        bad_run(tiny, tmp_path, {"train": pair_rows(4), "validation": pair_rows(4)}, "--rouge", "--max-length", 8,
                family=("gpt2", "causal-lm"))
    after = bad_run(tiny, tmp_path, {"train": pair_rows(4), "validation": pair_rows(4)}, "--rouge", "--max-length", 8,
                    "--max-new-tokens", 16, family=("gpt2", "causal-lm"))
    assert {"rouge1", "rouge2", "rougeL"} <= set(after)
    with pytest.raises(SystemExit):
        train.parse_args(["--model", "x", "--max-new-tokens", "16"])


def test_rouge_without_prompt_answer_pairs_is_one_error(tiny, tmp_path, monkeypatch):
    """--rouge on plain text or on a classification task used to be ignored without a word (the table simply had
    no ROUGE rows); both CLIs now refuse it before the first evaluation."""
    import eval as eval_cli

    texts = [{"text": "the movie was wonderful and the plot was okay"}] * 4
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: pytest.fail("evaluated first"))
    monkeypatch.setattr(eval_cli, "evaluate", lambda *a, **k: pytest.fail("evaluated first"))
    plain = (r"^--rouge scores generated answers, so it needs task causal-lm on prompt/answer columns "
             r"\(question/answer, document/summary, prompt/completion\); split 'validation' is plain text$")
    with pytest.raises(data.DataError, match=plain):
        bad_run(tiny, tmp_path / "plain", {"train": texts, "validation": texts}, "--rouge",
                family=("gpt2", "causal-lm"))
    with pytest.raises(data.DataError, match=r"\); the task is seq-cls$"):
        bad_run(tiny, tmp_path / "labels", {"train": GOOD, "validation": GOOD}, "--rouge")
    with pytest.raises(data.DataError, match=r"\); the task is generate-label$"):
        eval_cli.main(["--model", str(tiny.folder("gpt2", "causal-lm")), "--dataset", str(tmp_path / "labels" / "data"),
                       "--task", "generate-label", "--max-length", "32", "--rouge"])


@pytest.mark.parametrize("family,task,rows", [(("bert", "base"), "seq-cls", GOOD),
                                              (("bert", "base"), "seq-cls", keyword_rows(9, num_labels=3)),
                                              (("gpt2", "causal-lm"), "generate-label", GOOD),
                                              (("gpt2", "causal-lm"), "causal-lm", pair_rows(8))])
def test_metric_must_be_one_the_evaluation_gives(tiny, tmp_path, family, task, rows):
    """--metric is checked against what evaluation gives for the task (each one logged by an evaluation here);
    one that it does not give, such as accuracy for causal-lm, used to end the run in a KeyError after the
    first evaluation and is now one line before it."""
    out, dataset = tmp_path / "ok", write_jsonl(tmp_path / "data", "train", rows)
    write_jsonl(dataset, "validation", rows)
    run(tiny.folder(*family), dataset, out, "--task", task, "--max-steps", 1, "--eval-every", 1)
    logged = next(row["metrics"] for row in log_rows(out, "eval"))
    names = data.label_names([rows]) if task != "causal-lm" else None
    assert evaluation.metric_names(task, names) == list(logged)
    wrong = "accuracy" if task == "causal-lm" else "perplexity"
    with pytest.raises(data.DataError, match=rf"^--metric {wrong} is not one of the evaluation's metrics for {task}: "
                                             rf"{', '.join(logged)}$"):
        run(tiny.folder(*family), dataset, tmp_path / "bad", "--task", task, "--metric", wrong)


def test_training_loss_of_sentence_pairs_is_transformers(tiny, tmp_path):
    """The training loss of an MNLI-layout batch (premise/hypothesis) equals transformers' cross-entropy with the
    same token types, and a short run on such a split trains (its loss falls)."""
    from transformers import BertTokenizerFast

    from tiny import load_hf

    folder = tiny.folder("bert", "seq-cls")
    rows = [{"premise": r["text"], "hypothesis": f"it is about {KEYWORDS[r['label']]}", "label": r["label"]}
            for r in keyword_rows(12, num_labels=NUM_LABELS)]
    model, tok = load_model(str(folder), task="seq-cls", num_labels=NUM_LABELS)
    batch = data.collate(data.encode(rows, "seq-cls", tok, 24, list(range(NUM_LABELS))), tok.pad_token_id)
    assert "token_type_ids" in batch and int(batch["token_type_ids"].max()) == 1
    loss, count = train.loss_sum(model.train(False), batch, "seq-cls", 0)
    hf_tok = BertTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    reference = hf_tok([r["premise"] for r in rows], [r["hypothesis"] for r in rows], padding=True, truncation=True,
                       max_length=24, return_tensors="pt")
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(batch[key], reference[key]), key
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(load_hf(folder, "bert", "seq-cls")(**reference).logits,
                                                     batch["labels"], reduction="sum")
    assert count == len(rows) and loss.item() == pytest.approx(expected.item(), abs=1e-4)
    dataset = write_jsonl(tmp_path / "data", "train", rows)
    write_jsonl(dataset, "validation", rows)
    run(folder, dataset, tmp_path / "out", "--max-steps", 12, "--batch-size", 4, "--lr", 1e-2)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    # on the whole split, not on the noisy per-step losses of different batches (which flipped between runs)
    assert results["after"]["loss"] < results["before"]["loss"]


def test_more_samples_than_a_split_has_is_pointed_out(tiny, tmp_path, capsys):
    """--train-samples / --eval-samples beyond a split's size take all of it, as before, but no longer silently;
    a split that serves both evaluation and the final table is named once."""
    dataset = write_jsonl(tmp_path / "data", "train", GOOD)
    write_jsonl(dataset, "test", GOOD[:4])
    run(tiny.folder("bert", "base"), dataset, tmp_path / "out", "--max-steps", 1, "--train-samples", 100,
        "--eval-samples", 4, "--warmup", 0)
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")] == [
        f"note: --train-samples 100 is more than split 'train' has; all its {len(GOOD)} rows are used"]
    run(tiny.folder("bert", "base"), dataset, tmp_path / "out2", "--max-steps", 1, "--eval-samples", 5, "--warmup", 0)
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")] == [
        "note: --eval-samples 5 is more than split 'test' has; all its 4 rows are used"]


def test_dataset_config_picks_a_hub_configuration_or_a_subfolder(tmp_path, monkeypatch, tiny):
    """GLUE and other Hub datasets with several configurations need one (datasets.load_dataset(name, config));
    a local folder laid out the same way (glue/mrpc/train.jsonl, ...) takes it as the subfolder. Without it,
    such a folder used to be "holds no files" with no word of the subfolders."""
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a: calls.append(a) or {"train": [{"text": "x", "label": 0}]})
    assert data.load_splits("nyu-mll/glue", "mrpc") == {"train": [{"text": "x", "label": 0}]}
    data.load_splits("rotten_tomatoes")
    assert calls == [("nyu-mll/glue", "mrpc"), ("rotten_tomatoes", None)]
    glue = tmp_path / "glue"
    for config, n in (("mrpc", 3), ("rte", 5)):
        write_jsonl(glue / config, "train", GOOD[:n])
    assert data.load_splits(glue, "rte") == {"train": GOOD[:5]}
    with pytest.raises(data.DataError, match=r"glue holds no .* files; its subfolders mrpc, rte do: pick one with "
                                             r"--dataset-config$"):
        data.load_splits(glue)
    with pytest.raises(data.DataError, match=r"glue has no subfolder 'qqp' \(--dataset-config\); it has: mrpc, rte$"):
        data.load_splits(glue, "qqp")
    with pytest.raises(data.DataError, match=r"--dataset-config picks a Hub configuration or a subfolder; .*train.jsonl "
                                             r"is a file$"):
        data.load_splits(glue / "rte" / "train.jsonl", "rte")
    args = train.parse_args(["--model", "minilm-l6", "--dataset", str(glue), "--dataset-config", "rte"])
    assert args.output_dir == str(train.RUNS / "minilm-l6-glue-rte-lora")
    write_jsonl(glue / "rte", "validation", GOOD)
    run(tiny.folder("bert", "base"), glue, tmp_path / "out", "--dataset-config", "rte", "--max-steps", 1)
    assert json.loads((tmp_path / "out" / "args.json").read_text())["dataset_config"] == "rte"
    import eval as eval_cli

    base = eval_cli.main(["--model", str(tiny.folder("bert", "base")), "--dataset", str(glue), "--dataset-config", "rte",
                          "--split", "validation", "--max-length", "32"])["base"]
    assert base == pytest.approx(json.loads((tmp_path / "out" / "results.json").read_text())["before"], abs=1e-6)


def test_label_words_outside_generate_label_are_an_error(tiny, tmp_path):
    """--label-words names the answer words of generate-label; for another task they were ignored without a word."""
    import eval as eval_cli

    with pytest.raises(data.DataError, match=r"^--label-words applies to --task generate-label; the task is seq-cls$"):
        bad_run(tiny, tmp_path, {"train": GOOD, "validation": GOOD}, "--label-words", "bad,good")
    pairs = write_jsonl(tmp_path / "pairs", "test", pair_rows(2))
    with pytest.raises(data.DataError, match=r"^--label-words applies to --task generate-label; the task is "
                                             r"causal-lm$"):
        eval_cli.main(["--model", str(tiny.folder("gpt2", "causal-lm")), "--dataset", str(pairs), "--max-length", "32",
                       "--label-words", "no,yes"])


@pytest.mark.parametrize("virtual", [0, 3])
def test_the_loss_is_divided_by_the_tokens_it_sums(tiny, virtual):
    """count_targets (the step's denominator) counts what next_token_nll sums over: with a soft prompt the first
    token too, which its last virtual position predicts (as in peft)."""
    from lora import PromptTuningModel

    model = load_model(tiny.folder("gpt2", "causal-lm"), task="causal-lm")[0]
    if virtual:
        model = PromptTuningModel(model).add_prompt("default", virtual)
    ids = torch.randint(10, 100, (2, 6))
    labels = ids.clone()
    labels[1, :2] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    with torch.no_grad():
        _, n = evaluation.next_token_nll(model, batch)
    assert train.count_targets(batch, "causal-lm", virtual) == n == (10 if virtual else 9)  # 12 tokens, 2 unlabelled


def test_a_signal_as_deferring_begins_leaves_no_handler_deferred(monkeypatch):
    """A signal between installing the SIGINT and SIGTERM handlers (a pending SIGTERM's KeyboardInterrupt) left
    SIGINT deferred for good, and every later signals_deferred() then deferred nothing."""
    install, installs = signal.signal, []

    def second_install_interrupted(signum, handler):
        installs.append(signum)
        if len(installs) == 2:
            raise KeyboardInterrupt
        return install(signum, handler)

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(signal, "signal", second_install_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with train.signals_deferred():
            pytest.fail("the block ran")
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGINT) is before


def test_only_a_failed_collective_counts_as_another_process_stopping():
    """Rank 0 saves the last finished step when a collective fails because a peer left; any other error is raised as
    it is (it may have come in the middle of a step, and resuming would not get past it)."""
    gloo = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:15047. This is "
                        "typically caused by a remote worker crashing.")
    assert train.lost_a_peer(gloo, 2) and train.lost_a_peer(torch.distributed.DistBackendError("NCCL error"), 4)
    assert not train.lost_a_peer(gloo, 1)
    assert not train.lost_a_peer(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"), 2)
    assert not train.lost_a_peer(ValueError("Connection closed by peer"), 2)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_within_a_step_stops_the_run_after_its_log_row(signum):
    """An interruption between the optimizer step and the state it saves (or the step's log row, which waited in
    the loss all-reduce for a slower rank) left a checkpoint at step N with no row N in log.jsonl."""
    done = []
    handler = signal.getsignal(signum)
    with pytest.raises(KeyboardInterrupt):
        with train.signals_deferred():
            os.kill(os.getpid(), signum)
            done.append("the rest of the block")
    assert done == ["the rest of the block"] and signal.getsignal(signum) is handler


def test_more_layouts_read_as_datasets_reads_them(tmp_path):
    """datasets.load_dataset is the reference: dev / valid / eval files are the validation and test splits (dev
    used to be a split of its own, so training picked test to select on), shards with the Hub's older fingerprint
    suffix are one split, split subfolders (train/0000.parquet) are splits, a metadata file, a hidden file, an
    upper-case suffix and a JSON array after a newline read as datasets reads them, and an empty CSV cell is a
    missing value (None)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"review number {i}", "label": i % 2} for i in range(12)]
    layouts = {name: tmp_path / name for name in ("dev", "fingerprint", "subfolders", "extras")}
    for folder in layouts.values():
        folder.mkdir()
    write_jsonl(layouts["dev"], "train", rows)
    write_jsonl(layouts["dev"], "dev", rows[:4])
    write_jsonl(layouts["dev"], "eval", rows[4:8])
    pq.write_table(pa.Table.from_pylist(rows), layouts["fingerprint"] / "train-00000-of-00001-a09b74b3ef9c3b56.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:3]), layouts["fingerprint"] / "test-00000-of-00001-5c7d0f1e2b3a4c6d.parquet")
    for split, part in (("train", rows), ("test", rows[:5])):
        (layouts["subfolders"] / split).mkdir()
        pq.write_table(pa.Table.from_pylist(part), layouts["subfolders"] / split / "0000.parquet")
    write_jsonl(layouts["extras"], "train", rows)
    (layouts["extras"] / "test.json").write_text("\n" + json.dumps(rows[:3], indent=1))
    (layouts["extras"] / "dataset_info.json").write_text(json.dumps({"description": "x", "splits": {}}, indent=2))
    (layouts["extras"] / "._train.jsonl").write_bytes(b"\x00\x05\x16\x07\xff\xfe")  # macOS resource fork
    for name, folder in layouts.items():
        reference = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf-cache"))
        ours = data.load_splits(folder)
        assert set(ours) == set(reference), name
        for split in ours:
            assert ours[split] == list(reference[split]), (name, split)
    (layouts["extras"] / "train.jsonl").rename(layouts["extras"] / "train.JSONL")  # `datasets` does not read it
    assert data.load_splits(layouts["extras"])["train"] == rows
    csv_folder = tmp_path / "csv"
    csv_folder.mkdir()
    (csv_folder / "train.csv").write_text("text,label\nfine,1\n,0\nbad,1.0\n", encoding="utf-8")
    reference = list(datasets.load_dataset(str(csv_folder), cache_dir=str(tmp_path / "hf-cache"))["train"])
    assert data.load_splits(csv_folder)["train"] == reference == [
        {"text": "fine", "label": 1.0}, {"text": None, "label": 0.0}, {"text": "bad", "label": 1.0}]
    with pytest.raises(data.DataError, match=r"^split 'train' row 1: missing text$"):
        data.check_rows(reference, "seq-cls", "train")
    (layouts["dev"] / "test.jsonl.gz").write_bytes(b"")
    with pytest.raises(data.DataError, match=r"test\.jsonl\.gz: \.gz files are not read; convert it to one of "
                                             r"\.jsonl, \.json, \.csv, \.parquet \(decompress it\)$"):
        data.load_splits(layouts["dev"])
    write_jsonl(layouts["fingerprint"], "validation", rows[:2])
    write_jsonl(layouts["fingerprint"], "valid", rows[:2])
    with pytest.raises(data.DataError, match=r"split 'validation' is in two files, valid.jsonl and validation.jsonl"):
        data.load_splits(layouts["fingerprint"])


@pytest.mark.parametrize("labels,names,ids", [
    ([0, "1", 1, "0"], [0, 1], [0, 1, 1, 0]),  # a JSON string and a number are one class (were four)
    ([1.0, 0, "1.0", True], [0, 1], [1, 0, 1, 1]),
    ([-1, 1, 1, -1], [-1, 1], [0, 1, 1, 0]),  # -1 / 1 sentiment: -1 is a class (was "one label (1)")
    (["pos", "neg", "pos", "neg"], ["neg", "pos"], [1, 0, 1, 0]),
])
def test_labels_are_classes_whatever_type_stores_them(labels, names, ids):
    rows = [{"text": "x", "label": label} for label in labels]
    data.check_classes(rows, "train")
    assert data.label_names([rows]) == names
    assert data.label_ids(rows, names, "train") == ids


@pytest.mark.parametrize("labels,names,ids", [
    ([1, 2, 2, 1], [1, 2], [0, 1, 1, 0]),  # 1-based ids: two classes (was a never-used class 0, three outputs)
    ([5, 1, 3, 3], [1, 3, 5], [2, 0, 1, 1]),  # star ratings keep their values, in order
    ([-1, 0, 1, 0], [-1, 0, 1], [0, 1, 2, 1]),  # -1/0/1 sentiment (was "label -1 is out of range")
    ([0, 1, 2, 0], [0, 1, 2], [0, 1, 2, 0]),  # beside ids 0..2, -1 is SNLI's "no gold label" (next test)
    ([-2, -1, 0, 1, 2], [-2, -1, 0, 1, 2], [0, 1, 2, 3, 4]),  # a -2..2 scale keeps its -1
    ([0, 2, 2, 0], [0, 1, 2], [0, 2, 2, 0]),  # ids from 0 are a ClassLabel's: an absent id keeps its output
])
def test_integer_labels_not_from_zero_keep_their_values(labels, names, ids):
    rows = [{"text": "x", "label": label} for label in labels]
    assert data.label_names([rows]) == names
    assert data.label_ids(rows, names, "train") == ids


def test_minus_one_beside_three_or_more_ids_from_zero_is_no_label():
    """SNLI marks pairs without a gold label -1: they must not become a fourth class, trained and scored."""
    rows = [{"premise": "p", "hypothesis": "h", "label": y} for y in (0, 1, 2, -1, 0, 2)]
    assert data.label_names([rows]) == [0, 1, 2]
    without_two = [{"premise": "p", "hypothesis": "h", "label": y} for y in (0, 1, -1)]
    assert data.label_names([rows, without_two]) == [0, 1, 2]  # decided over all splits (was [-1, 0, 1, 2])
    with pytest.raises(data.DataError, match=r"^split 'train' row 3: label -1 is out of range .*SNLI's pairs"):
        data.label_ids(rows, [0, 1, 2], "train")


def test_a_split_without_labels_never_gives_way_to_train_and_an_empty_one_is_not_unlabelled():
    rows = keyword_rows(4)
    unlabelled = [dict(row, label=-1) for row in rows]
    fallbacks = ("test", "validation", "train")
    assert data.pick_split({"train": rows, "test": unlabelled}, None, fallbacks, labels=True) == "test"
    assert data.pick_split({"train": rows, "validation": rows, "test": []}, None, fallbacks, labels=True) == "test"
    assert data.pick_split({"train": rows, "validation": rows, "test": unlabelled}, None, fallbacks,
                           labels=True) == "validation"


@pytest.mark.parametrize("cells", [
    [" 0", " 1", "1", "0"],  # a space after the comma
    ["+1", "-1", "-1", "+1"],
    ["True", "False", "true", "FALSE"],
    ["1", "NA", "0", "1"],  # pandas' missing value
])
def test_csv_label_columns_are_typed_as_datasets_types_them(tmp_path, cells):
    """Each gave extra classes (" 0" beside "0", "True" beside "true", a class "NA"; "+1" sorted before "-1")."""
    import datasets

    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "train.csv").write_text("text,label\n" + "".join(f"row {i},{c}\n" for i, c in enumerate(cells)),
                                      encoding="utf-8")
    reference = list(datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf-cache"))["train"])
    ours = data.load_splits(folder)["train"]
    assert [row["label"] for row in ours] == [row["label"] for row in reference]  # 1 == 1.0: pandas' NaN makes floats


def test_csv_rows_with_more_fields_than_the_header_and_long_cells(tmp_path):
    """An unquoted comma made " fun movie" a class (`datasets` refuses the file); a cell over 131072 characters
    stopped the run on csv's traceback (`datasets` reads it)."""
    import datasets

    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "train.csv").write_text("text,label\ngood,1\ngreat, fun movie,1\n", encoding="utf-8")
    with pytest.raises(data.DataError, match=r"train\.csv:3: 3 fields where the header has 2; quote a text that holds "
                                             r"commas$"):
        data.load_splits(folder)
    long_text = "word " * 40000
    (folder / "train.csv").write_text(f"text,label\nshort,0\n\"{long_text}\",1\n", encoding="utf-8")
    reference = list(datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf-cache"))["train"])
    assert data.load_splits(folder)["train"] == reference and len(reference[1]["text"]) == len(long_text)


@pytest.mark.parametrize("layout", ["data/train.jsonl", "data/train-00000-of-00001.parquet",
                                    "default/train/0000.parquet", "data/train/part.jsonl"])
def test_one_data_folder_inside_is_read_as_datasets_reads_it(tmp_path, layout):
    """A Hub snapshot (README + data/...) and the Parquet converter's layout were "holds no files" or asked for
    --dataset-config."""
    import datasets

    rows = [{"text": f"row {i}", "label": i % 2} for i in range(4)]
    folder = tmp_path / "snapshot"
    path = folder / layout
    path.parent.mkdir(parents=True)
    for split, part in (("train", rows[:3]), ("test", rows[3:])):
        target = path.parent.parent / split / path.name if layout.count("/") == 2 else path.with_name(
            path.name.replace("train", split))
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.Table.from_pylist(part), target)
        else:
            target.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    (folder / "README.md").write_text("# a dataset card\n", encoding="utf-8")
    reference = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "hf-cache"))
    ours = data.load_splits(folder)
    assert ours.keys() == reference.keys() == {"train", "test"}
    assert all(ours[split] == list(reference[split]) for split in ours)


def test_fractional_labels_are_scores_not_classes(tmp_path):
    """STS-B's similarity scores made one class per distinct score (40 classes for 40 rows)."""
    rows = [{"sentence1": "a", "sentence2": "b", "label": score} for score in (0.07, 1.0, 3.25, 5.0)]
    with pytest.raises(data.DataError, match=r"^split 'train' row 0: label 0\.07 is a score, not a class; regression "
                                             r"\(e\.g\. STS-B's similarity scores\) is not supported$"):
        data.check_rows(rows, "seq-cls", "train")


def test_nan_labels_and_texts_are_missing(tmp_path):
    """Python's json writes a missing float as NaN; it was read as the class "nan" and the text "nan"."""
    folder = tmp_path / "nan"
    folder.mkdir()
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": float("nan")}]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(data.DataError, match=r"^split 'train' row 2: missing label$"):
        data.check_rows(data.load_splits(folder)["train"], "seq-cls", "train")
    rows[2] = {"text": float("nan"), "label": 1}
    with pytest.raises(data.DataError, match=r"^split 'train' row 2: missing text$"):
        data.check_rows(rows, "seq-cls", "train")
    with pytest.raises(data.DataError, match=r"^split 'train' row 2: missing text$"):
        data.check_rows(rows, "causal-lm", "train")


def test_default_output_dir_names_a_dataset_given_as_dot(tmp_path, monkeypatch):
    (tmp_path / "rt").mkdir()
    monkeypatch.chdir(tmp_path / "rt")
    assert train.parse_args(["--model", "m", "--dataset", "."]).output_dir == str(train.RUNS / "m-rt-lora")


@pytest.mark.parametrize("schedule,warmup,total", [("linear", 0.06, 798), ("linear", 5, 100), ("cosine", 0.1, 37),
                                                   ("constant", 3, 20), ("linear", 0, 10)])
def test_schedules_equal_transformers(schedule, warmup, total):
    """Ours warmed up as (step + 1) / (warmup + 1) over int(ratio * steps) steps: every rate of README's run (798
    steps, 6 % warmup) differed from Trainer's."""
    import transformers

    steps = train.warmup_steps(warmup, total)
    assert steps == transformers.TrainingArguments(output_dir="unused", warmup_steps=warmup).get_warmup_steps(total)
    reference = {"linear": transformers.get_linear_schedule_with_warmup,
                 "cosine": transformers.get_cosine_schedule_with_warmup,
                 "constant": lambda opt, w, _: transformers.get_constant_schedule_with_warmup(opt, w)}[schedule]
    ref = reference(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), steps, total)
    ours = train.lr_lambda(schedule, steps, total)
    for step in range(total):
        assert ours(step) == pytest.approx(ref.get_last_lr()[0], abs=1e-12), step
        ref.optimizer.step()
        ref.step()


def test_an_interrupted_checkpoint_swap_is_repaired(tiny, tmp_path):
    """A kill between the swap's two renames left checkpoint.old and a whole checkpoint.tmp: --resume found no
    checkpoint and a fresh run started over on top of it; a kill while checkpoint.old was deleted blocked every
    later save (Directory not empty)."""
    folder, dataset = tiny.folder("distilbert", "base"), keyword_dataset(tmp_path / "data")
    common = ("--batch-size", 4, "--lr", 1e-2, "--warmup", 0, "--save-every", 1, "--eval-every", 0)
    first = tmp_path / "first"
    run(folder, dataset, first, "--max-steps", 2, *common)
    (first / "results.json").unlink()  # as if killed before the run's end
    reference = shutil.copytree(first, tmp_path / "reference")
    run(folder, dataset, reference, "--max-steps", 3, *common, "--resume")
    for case in ("between the renames", "deleting old"):
        out = shutil.copytree(first, tmp_path / case)
        ckpt = out / "checkpoint"
        shutil.copytree(ckpt, out / "checkpoint.old")
        if case == "between the renames":
            ckpt.rename(out / "checkpoint.tmp")
            with pytest.raises(FileExistsError, match="holds an interrupted run"):
                run(folder, dataset, out, "--max-steps", 3, *common)  # a fresh run is refused, not started over
        run(folder, dataset, out, "--max-steps", 3, *common, "--resume")
        assert not (out / "checkpoint.old").exists() and not (out / "checkpoint.tmp").exists()
        assert_same_weights(final_weights(out), final_weights(reference), atol=0)


def test_a_pickle_or_wrongly_typed_state_in_the_checkpoint_is_one_line(tiny, tmp_path):
    folder, dataset, out = tiny.folder("distilbert", "base"), keyword_dataset(tmp_path / "data"), tmp_path / "out"
    run(folder, dataset, out, "--max-steps", 1, "--batch-size", 4)
    (out / "results.json").unlink()
    good = (out / "checkpoint" / "state.json").read_text()
    state = json.loads(good) | {"step": "x"}
    (out / "checkpoint" / "state.json").write_text(json.dumps(state))
    with pytest.raises(LoadError, match=r"state\.json is damaged \(ValueError: step is 'x', not a count\)"):
        run(folder, dataset, out, "--max-steps", 2, "--batch-size", 4, "--resume")
    (out / "checkpoint" / "state.json").write_text(good)
    torch.save({"optimizer": argparse.Namespace(x=1)}, out / "checkpoint" / "optimizer.pt")  # not weights-only
    with pytest.raises(LoadError, match=r"optimizer\.pt is damaged \(UnpicklingError: "):
        run(folder, dataset, out, "--max-steps", 2, "--batch-size", 4, "--resume")


def test_dora_magnitudes_are_decayed_as_trainer_decays_them(tiny, tmp_path, monkeypatch):
    """Trainer decays every trained parameter but biases and LayerNorm weights; ours left out DoRA's magnitudes."""
    groups, models = [], []

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kw):
            groups.extend(params)
            super().__init__(params, **kw)

    add_method = train.add_method
    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    monkeypatch.setattr(train, "add_method", lambda *a: models.append(add_method(*a)) or models[-1])
    run(tiny.folder("bert", "base"), keyword_dataset(tmp_path / "data"), tmp_path / "out", "--max-steps", 1,
        "--batch-size", 4, "--use-dora", "--weight-decay", 0.1)
    from transformers import Trainer

    trained = [(n, p) for n, p in models[0].named_parameters() if p.requires_grad]
    expected = set(Trainer.get_decay_parameter_names(None, models[0])) & {n for n, _ in trained}  # Trainer's rule
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert {n for n, p in trained if id(p) in decayed} == expected
    assert any("lora_magnitude_vector" in n for n in expected)


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.jsonl.gz", "missing.tsv"])
def test_a_missing_file_is_not_looked_for_on_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataError, match=rf"^dataset '{re.escape(name)}': no such file or folder$"):
        data.load_splits(name)


def test_a_hub_class_label_minus_one_is_a_missing_label(monkeypatch):
    """The dataset's own ClassLabel says -1 is "no label" (SNLI, GLUE's test splits), whatever the other ids."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    hub = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, -1]}, features=features),
        "test": datasets.Dataset.from_dict({"text": ["d", "e"], "label": [-1, -1]}, features=features)})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a: hub)
    splits = data.load_splits("someone/reviews")
    assert [row["label"] for row in splits["train"]] == [0, 1, None]
    assert data.pick_split(splits, None, ("test", "train"), labels=True) == "test"  # never train in its place
    with pytest.raises(data.DataError, match=r"^split 'train' row 2: missing label$"):
        data.check_rows(splits["train"], "seq-cls", "train")


def test_a_class_label_minus_one_in_a_parquet_file_written_by_datasets_is_missing(tmp_path):
    """A Hub snapshot's Parquet records its features: read from the file, -1 was a third class; by name, missing."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    (tmp_path / "data").mkdir()
    datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0, 1, -1, 1]},
                               features=features).to_parquet(str(tmp_path / "data" / "train.parquet"))
    datasets.Dataset.from_dict({"text": ["e", "f"], "label": [-1, -1]},
                               features=features).to_parquet(str(tmp_path / "data" / "test.parquet"))
    splits = data.load_splits(tmp_path / "data")
    assert [row["label"] for row in splits["train"]] == [0, 1, None, 1]
    with pytest.raises(data.DataError, match=r"^split 'test' has no labels: pick a labelled split \(train.py "
                                             r"--test-split / --eval-split, eval.py --split\)$"):
        data.check_rows(splits["test"], "seq-cls", "test")
