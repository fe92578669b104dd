"""Fine-tune a model with LoRA, prompt tuning or full fine-tuning; evaluate before and after; save the adapter.

    python train.py --model minilm-l6 --dataset ../shared/data/rotten_tomatoes --rank 8
    torchrun --nproc_per_node 2 train.py ...        (DDP: gloo on CPU, nccl on GPU)

The loop, top to bottom: AdamW on the trainable parameters only; linear or cosine schedule with
warmup; gradient accumulation (the loss of an optimizer step is the sum over its micro-batches divided
by the step's total number of examples, or label tokens, so 2 x 4 equals 8 exactly); clipping;
evaluation every N steps with early stopping and the best weights kept; a checkpoint (trainable
weights, optimizer, step, data position; the schedule is rebuilt at that step) every N steps and on interruption, from which --resume
continues exactly. Data order is a fixed permutation per epoch (seed + epoch), so the data position is
just (epoch, micro-batch index); each step seeds the random generator (dropout masks) from (seed, step,
process), so the step number restores the RNG state too, on every process of a torchrun job.
"""
import argparse
import copy
import io
import json
import math
import os
import pickle  # its exception class only: checkpoints load with weights_only=True
import random
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext, redirect_stderr
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import data
from evaluation import classify, evaluate, longest_rouge_prompt, metric_names, next_token_nll, scored_labels
from lora import (AdapterError, LoraConfig, PromptTuningModel, apply_lora, disable_adapters, merge_and_unload,
                  print_trainable_parameters, save_adapter)
from lora.adapters import head_names, linear_layer_names, matches, short_names
from models import Tokenizer, load_model, save_model
from models.loading import DECODERS, LoadError, check_positions, read_config, read_json, resolve, write_json, write_text
from quant import dequantize_model
from quant.allocator import keep_freed_memory, map_large_allocations

RUNS = Path(__file__).resolve().parent / "runs"  # the default output folders: in the repository, wherever run from

HIGHER_IS_BETTER = {"accuracy": True, "f1": True, "f1_binary": True, "loss": False, "perplexity": False}


METHOD_FLAGS = {"lora": ("rank", "alpha", "dropout", "target_modules", "modules_to_save", "use_rslora", "use_dora"),
                "prompt": ("num_virtual_tokens", "prompt_init", "prompt_init_text")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.HelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default="distilbert", help="local folder, fetched name (minilm-l6, smollm2-135m), alias or Hub id")
    g.add_argument("--dataset", default="rotten_tomatoes", help="Hub name, or a local folder of UTF-8 split files "
                   "(train.jsonl, test.csv, ...; the Hub's train-00000-of-00002.parquet shards make one split) or one file")
    g.add_argument("--dataset-config", default=None, help="configuration of a Hub dataset that has several (glue: "
                   "mrpc, rte, mnli, ...), or that subfolder of a local dataset folder")
    g.add_argument("--task", choices=data.TASKS, default=None, help="inferred from the model and dataset when omitted")
    g.add_argument("--train-split", default="train", help="split to train on")
    g.add_argument("--eval-split", default=None, help="split for evaluation during training (default: validation, else test)")
    g.add_argument("--test-split", default=None, help="split for the before/after table (default: test, else the eval split)")
    g.add_argument("--train-samples", type=int, default=None, help="random subset of the train split (all when omitted)")
    g.add_argument("--eval-samples", type=int, default=None, help="random subset of the eval and test splits")
    g.add_argument("--max-length", type=int, default=128, help="tokens per example (longer inputs are truncated)")
    g.add_argument("--label-words", default=data.DEFAULT_LABEL_WORDS, help="generate-label: the word of each label id, comma-separated")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=("lora", "prompt", "none"), default="lora", help="none = full fine-tuning")
    g.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    g.add_argument("--alpha", type=float, default=16, help="LoRA alpha (scale alpha / r)")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout on the LoRA branch")
    g.add_argument("--target-modules", default=None, help="comma-separated module names, or all-linear (every "
                   "linear layer but the output layer, as peft's shorthand) (default: the architecture's)")
    g.add_argument("--modules-to-save", default=None, help="comma-separated modules trained in full; a "
                   "classifier always trains its head too, as in peft (default: the head, and BERT's pooler; \"\": "
                   "the head alone)")
    g.add_argument("--use-rslora", action="store_true", help="scale alpha / sqrt(r)")
    g.add_argument("--use-dora", action="store_true", help="weight-decomposed LoRA")
    g.add_argument("--num-virtual-tokens", type=int, default=20, help="prompt tuning: soft prompt length")
    g.add_argument("--prompt-init", choices=("random", "sample_vocab", "text"), default="text", help="prompt tuning: initialisation")
    g.add_argument("--prompt-init-text", default="Classify if the sentiment of this review is positive or negative:",
                   help="prompt tuning: text for --prompt-init text")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=float, default=3.0, help="passes over the train split (as many as transformers' Trainer makes by default)")
    g.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=32, help="examples per micro-batch per process")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: lora 1e-3, or for seq-cls 5e-3 up to 64 optimizer steps and "
                        "5e-3 * (64 / steps)^(1/3) beyond; prompt 3e-2; none 5e-5)")
    g.add_argument("--schedule", choices=("linear", "cosine", "constant"), default="linear", help="decay after warmup")
    g.add_argument("--warmup", type=float, default=0.06, help="warmup: a fraction of the steps if < 1, else a step count")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not on biases and norms)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    g.add_argument("--seed", type=int, default=0, help="seed for initialisation, data order and subsets")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype the model is loaded in")
    g.add_argument("--quant", choices=("none", "nf4", "nf4-dq", "int8"), default="none",
                   help="quantize the frozen base while loading (QLoRA: nf4; nf4-dq adds double quantization); large "
                        "tensors are then allocated so that freed ones return to the OS (lower peak memory; "
                        "without --quant freed memory is kept for reuse, which is faster)")
    g.add_argument("--autocast", action="store_true", help="bf16 autocast for forward/backward (weights stay in --dtype)")
    g = p.add_argument_group("evaluation, checkpoints and output")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N optimizer steps (0 = at the end only)")
    g.add_argument("--eval-batch-size", type=int, default=64, help="examples per evaluation batch")
    g.add_argument("--metric", default=None, help="metric for early stopping / best weights: accuracy, f1, "
                   "f1_binary (two labels) or loss (seq-cls) for classification; loss or perplexity for causal-lm "
                   "(default: accuracy, or loss for causal-lm)")
    g.add_argument("--early-stopping-patience", type=int, default=0, help="stop after N evaluations without improvement (0 = never)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps for --resume (default: at each evaluation)")
    g.add_argument("--rouge", action="store_true", help="causal-lm pairs: also ROUGE of greedy generations")
    g.add_argument("--max-new-tokens", type=int, default=64, help="--rouge: tokens generated per answer")
    g.add_argument("--output-dir", default=None, help="where the adapter, logs and checkpoints go "
                   "(default: the repository's runs/<model>-<dataset>-<method>)")
    g.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output-dir")
    g.add_argument("--save-merged", action="store_true",
                   help="lora: also write the model with the adapter merged in, in --dtype (a quantized base is "
                        "dequantized to the dtype it was loaded in first, not requantized), as a plain checkpoint in "
                        "<output-dir>/merged")
    args = p.parse_args(argv)
    for name, value in vars(args).items():  # nan or inf: argparse's float() takes "nan" and "inf"
        if isinstance(value, float) and not math.isfinite(value):
            p.error(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("alpha", "max_new_tokens", "rank", "batch_size", "grad_accum", "max_length", "num_virtual_tokens",
                 "eval_batch_size", "epochs", "max_steps", "train_samples", "eval_samples", "lr"):  # the last four: None
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("warmup", "weight_decay", "max_grad_norm", "eval_every", "early_stopping_patience", "save_every"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(args, name)}")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if not 0 <= args.seed < 2**32:  # numpy's generator takes no other
        p.error(f"--seed must be in [0, 2^32 - 1], got {args.seed}")
    for name in ("target_modules", "modules_to_save"):
        value = getattr(args, name)
        if value is not None and value.strip() and "" in [x.strip() for x in value.split(",")]:
            p.error(f"--{name.replace('_', '-')} has an empty name in {value!r}")
    if args.target_modules is not None and not args.target_modules.strip():
        p.error("--target-modules is empty; name the layers to adapt, or leave the flag out for the defaults")
    if args.method == "prompt" and args.prompt_init == "text" and not args.prompt_init_text.strip():
        p.error("--prompt-init text needs a --prompt-init-text (or use --prompt-init random or sample_vocab)")
    if args.prompt_init != "text" and args.prompt_init_text != p.get_default("prompt_init_text"):
        p.error(f"--prompt-init-text applies to --prompt-init text only, not to --prompt-init {args.prompt_init}")
    if args.early_stopping_patience and not args.eval_every:
        p.error("--early-stopping-patience counts evaluations during training; it needs --eval-every")
    if args.method == "none" and args.quant != "none":
        p.error(f"--method none trains every weight, which a quantized base cannot do; use --method lora with "
                f"--quant {args.quant} (QLoRA), or --quant none")
    if args.max_new_tokens != p.get_default("max_new_tokens") and not args.rouge:
        p.error("--max-new-tokens is the length of the answers --rouge generates; it needs --rouge")
    if args.save_merged and args.method != "lora":
        p.error(f"--save-merged merges a LoRA adapter; it does not apply to --method {args.method}")
    for method, names in METHOD_FLAGS.items():  # another method's flag would be ignored without a word
        changed = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) != p.get_default(n)]
        if changed and args.method != method:
            p.error(f"{', '.join(changed)} {'applies' if len(changed) == 1 else 'apply'} to --method {method} only, "
                    f"not to --method {args.method}")
    if args.output_dir is None:
        dataset = Path(args.dataset).resolve().name if Path(args.dataset).exists() else Path(args.dataset).name
        dataset += f"-{args.dataset_config}" if args.dataset_config else ""
        model = Path(args.model).resolve().name if Path(args.model).exists() else Path(args.model).name  # "." too
        args.output_dir = str(RUNS / f"{model}-{dataset}-{args.method}")
    return args


# ---- distributed ------------------------------------------------------------------------------------

def init_distributed():
    """(rank, world size); starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def lost_a_peer(error, world):
    """Whether `error` is a collective failing because another process of the job stopped first: gloo's
    "Connection closed by peer" (or "reset by peer"), or a torch.distributed error. The loop runs its collectives
    (DDP's all-reduce in backward, all_sum) only before a step changes anything, so the last finished step is
    intact then."""
    return world > 1 and isinstance(error, RuntimeError) and (isinstance(error, dist.DistError)
                                                              or "by peer" in str(error))


def all_sum(value, world):
    if world == 1:
        return value
    t = torch.tensor(float(value))
    dist.all_reduce(t)
    return t.item()


# ---- data -----------------------------------------------------------------------------------------

def prepare_data(args, tokenizer, task, splits):
    train_name = data.pick_split(splits, args.train_split, ())
    labels = task != "causal-lm"
    eval_name = data.pick_split(splits, args.eval_split, ("validation", "test"), labels)
    test_name = data.pick_split(splits, args.test_split, ("test", eval_name), labels)
    if eval_name is None:
        raise data.DataError(f"the dataset has no validation or test split (splits: {', '.join(splits)}); "
                             "pass --eval-split")
    for name in dict.fromkeys((train_name, eval_name, test_name)):
        data.check_rows(splits[name], task, name)
    if task != "causal-lm":
        data.check_classes(splits[train_name], train_name)
    if args.rouge:  # scored on the test split only
        data.check_rouge(task, splits[test_name], test_name)
    for flag, n, name in dict.fromkeys([("--train-samples", args.train_samples, train_name),  # eval and test
                                        ("--eval-samples", args.eval_samples, eval_name),    # may be one split
                                        ("--eval-samples", args.eval_samples, test_name)]):
        if n is not None and n > len(splits[name]):
            print(f"note: {flag} {n} is more than split {name!r} has; all its {len(splits[name])} rows are used",
                  file=sys.stderr)
    train_rows = data.subsample(splits[train_name], args.train_samples, args.seed)
    eval_rows = data.subsample(splits[eval_name], args.eval_samples, args.seed)
    test_rows = data.subsample(splits[test_name], args.eval_samples, args.seed)
    # from the whole splits: a subset may miss a rare class, and the ids of the others would shift
    names = data.label_names([splits[n] for n in dict.fromkeys((train_name, eval_name, test_name))]) \
        if task != "causal-lm" else None
    words = data.parse_label_words(args.label_words, names, task)
    train_set, eval_set = (data.encode(rows, task, tokenizer, args.max_length, names, words, name)
                           for rows, name in ((train_rows, train_name), (eval_rows, eval_name)))
    # one split for both (e.g. no validation split): the same object, so main() can reuse its evaluation
    test_set = eval_set if test_name == eval_name else data.encode(test_rows, task, tokenizer, args.max_length,
                                                                   names, words, test_name)
    if args.rouge:  # an empty prompt stops the run here, not after the first perplexity pass
        longest_rouge_prompt(test_set, f"the evaluated rows of split {test_name!r}")
    return train_set, eval_set, test_set, names, words


def micro_batches(n_examples, batch_size, world, seed, epoch):
    """Index lists of one epoch's global micro-batches (batch_size x world examples each)."""
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    size = batch_size * world
    out = [order[i:i + size] for i in range(0, n_examples, size)]
    if world > 1 and len(out[-1]) < size:
        out.pop()  # every process must get an equal share
    return out


# ---- loss -----------------------------------------------------------------------------------------

def loss_sum(model, batch, task, virtual):
    """Sum of the loss over the micro-batch and what it is summed over (examples or label tokens); `virtual`:
    the soft prompt's tokens (model may be DistributedDataParallel, which does not pass on the attribute)."""
    if task == "seq-cls":
        logits = classify(model, batch)
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), len(batch["labels"])
    return next_token_nll(model, batch, virtual)


def count_targets(batch, task, virtual):
    """What loss_sum sums over; `virtual`: the soft prompt's tokens (its last one predicts the first token)."""
    return len(batch["labels"]) if task == "seq-cls" else int((scored_labels(batch["labels"], virtual) != -100).sum())


# ---- schedule and checkpoints ------------------------------------------------------------------------

def default_lr(method, task, total_steps):
    """The peak learning rate when --lr is not given.

    LoRA on a classifier also trains a fresh head (and BERT's pooler): a short run needs large steps to
    move it at all (5e-3), while a long run ends better with smaller ones, so past 64 optimizer steps
    the rate shrinks as steps^(-1/3): 3.1e-3 at 266 steps, 2.2e-3 at 800. Measured with minilm-l6 on
    rotten_tomatoes (README); that the best rate falls as training gets longer is what Bjorck et al.
    2025 ("Scaling Optimal LR Across Token Horizons", arXiv:2409.19913) found for pretraining.
    """
    if method == "lora" and task == "seq-cls":
        return 5e-3 * min(1.0, 64 / total_steps) ** (1 / 3)
    return {"lora": 1e-3, "prompt": 3e-2, "none": 5e-5}[method]


def warmup_steps(warmup, total_steps):
    """--warmup as a step count: a fraction of the steps rounded up (as TrainingArguments' get_warmup_steps)."""
    return math.ceil(warmup * total_steps) if warmup < 1 else int(warmup)


def lr_lambda(schedule, warmup_steps, total_steps):
    def factor(step):
        if step < warmup_steps:  # transformers' get_*_schedule_with_warmup: the first step's rate is 0
            return step / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0
    return factor


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def recover_folder(folder):
    """Finish or undo a replace_folder that was interrupted: folder.old beside folder.tmp means the new folder was
    whole (it is renamed in only once written), so it goes in; any other leftover is deleted."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    if old.exists():
        if not folder.exists():
            os.replace(tmp if tmp.exists() else old, folder)
        if old.exists():
            shutil.rmtree(old)
    if tmp.exists():
        shutil.rmtree(tmp)


def replace_folder(folder, write):
    """Fill a new folder beside `folder` with write(path), then swap it in: an interruption or a kill never leaves a
    half-written folder in its place, and recover_folder repairs a swap cut short."""
    folder = Path(folder)
    tmp, old = folder.with_name(folder.name + ".tmp"), folder.with_name(folder.name + ".old")
    recover_folder(folder)
    tmp.mkdir(parents=True)
    write(tmp)
    with signals_deferred():
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old.exists():
            shutil.rmtree(old)


def link_or_copy(source, target):
    """A hard link (no copy of the bytes) where the file system allows one, else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def save_checkpoint(folder, model, optimizer, state, best=None):
    """The checkpoint --resume continues from; `best` (best/trainable.safetensors) goes with it, so that a run
    resumed from here reports and saves the same best weights (best/ may hold a later step's by then)."""
    def write(tmp):
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        # the schedule's place is state["step"]; its shape is the resumed run's (--max-steps may grow)
        torch.save({"optimizer": optimizer.state_dict()}, tmp / "optimizer.pt")
        write_json(tmp / "state.json", state)
        if best is not None:
            link_or_copy(best, tmp / "best.safetensors")

    replace_folder(folder, write)


def restore_best(out, best_step):
    """best/ as it was when the checkpoint was written (a run killed later may have replaced it)."""
    kept = out / "checkpoint" / "best.safetensors"
    if kept.exists():
        replace_folder(out / "best", lambda tmp: link_or_copy(kept, tmp / "trainable.safetensors"))
    elif best_step is None:  # no evaluation before the checkpoint: any best/ is a later one's
        recover_folder(out / "best")
        shutil.rmtree(out / "best", ignore_errors=True)
    else:
        print(f"note: {out / 'checkpoint'} predates keeping the best weights with it; {out / 'best'} is taken as the "
              f"best step {best_step}'s (a later evaluation may have replaced them)", file=sys.stderr)


def step_seed(seed, step, rank):
    """The random generator's seed for one optimizer step on one process. The ranks' batches differ in length,
    so their generators drift apart; saving rank 0's state alone made a resumed torchrun job draw other masks."""
    return hash((seed, step, rank)) % 2**63  # a tuple of ints hashes the same in every process


@contextmanager
def signals_deferred():
    """Ctrl-C or SIGTERM within the block raises KeyboardInterrupt when the block ends: an optimizer step, its log
    row and the state an interruption saves happen together, or not at all. Within an outer block it does nothing
    of its own (the outer one raises when it ends)."""
    if signal.getsignal(signal.SIGINT) is _defer:
        yield
        return
    _caught.clear()
    handlers = {}
    try:  # installed inside: a signal between the two installs must not leave SIGINT deferred for good
        for s in (signal.SIGINT, signal.SIGTERM):
            handlers[s] = signal.signal(s, _defer)
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    if _caught:
        raise KeyboardInterrupt


_caught = []


def _defer(signum, frame):
    _caught.append(signum)


# what may change when resuming: how long to train, how often to evaluate and save, and where the run is
MAY_CHANGE_ON_RESUME = {"resume", "epochs", "max_steps", "eval_every", "save_every", "early_stopping_patience",
                        "eval_batch_size", "output_dir"}


def check_resume(args, out, world):
    """--resume needs the interrupted run's checkpoint and its arguments (args.json): other data, batches,
    learning rate, model or number of processes would not continue that run but silently start a different one
    from its middle."""
    if not (out / "checkpoint" / "state.json").is_file():
        raise FileNotFoundError(f"--resume: no checkpoint in {out / 'checkpoint'}")
    if not (out / "args.json").is_file():
        return
    saved = read_json(out / "args.json")
    if saved.get("processes", world) != world:  # the data position counts global batches of --batch-size x processes
        raise LoadError(f"--resume: the interrupted run ran on {saved['processes']} process(es), this one on {world}; "
                        f"resume it on {saved['processes']}")
    if args.lr is None:  # the interrupted run's default, resolved from its number of steps
        args.lr = saved.get("lr")

    def same(key, value):
        if key in ("model", "dataset") and Path(value).exists() and Path(saved[key]).exists():
            return Path(value).resolve() == Path(saved[key]).resolve()
        return value == saved[key]

    differ = [f"--{k.replace('_', '-')} {v} here, {saved[k]} there" for k, v in vars(args).items()
              if k not in MAY_CHANGE_ON_RESUME and k in saved and not same(k, v)]
    if differ:
        raise LoadError(f"--resume: other arguments than the interrupted run's ({'; '.join(differ)}); resume with "
                        f"those in {out / 'args.json'} (only the length of training, how often it evaluates and "
                        "saves, and --eval-batch-size may change)")


def cut_log(path, state):
    """Drop the log rows of steps after the checkpoint (a killed run's, which the resumed run does again) and a
    last row cut short by the kill, so the log reads as an uninterrupted run's."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    step, evaluated = state["step"], not state["eval_due"] and state["last_eval"] in (None, state["step"])
    kept = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # written when the run was killed
                break
            raise LoadError(f"{path} is damaged (line {i + 1}: {e.msg}); start over in another --output-dir, or "
                            f"after deleting {path.parent}") from e
        if row["step"] < step or row["step"] == step and (row["kind"] == "train" or evaluated):
            kept.append(line)
    if len(kept) < len(lines):
        write_text(path, "".join(line + "\n" for line in kept))


def check_not_interrupted(out):
    """A fresh run would overwrite the checkpoint of an interrupted one (no results.json after it) in `out`."""
    state, results = out / "checkpoint" / "state.json", out / "results.json"
    if state.is_file() and (not results.is_file() or results.stat().st_mtime < state.stat().st_mtime):
        step = read_json(state).get("step")
        raise FileExistsError(f"{out} holds an interrupted run (checkpoint at step {step}); continue it with --resume, "
                              "or start over in another --output-dir (or after deleting this one)")


def damaged(path, error):
    return LoadError(f"{path} is damaged ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
                     f"start over in another --output-dir, or after deleting {Path(path).parent.parent}")


def load_trainable(model, path):
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors' own error types; re-raised naming the file
        raise damaged(path, e) from e
    params = dict(model.named_parameters())
    trained = {name for name, p in params.items() if p.requires_grad}
    misfit = ([f"it lacks {name}" for name in sorted(trained - set(state))]
              + [f"it holds {name}, which this run does not train" for name in sorted(set(state) - trained)]
              + [f"{name} is {tuple(v.shape)} there and {tuple(params[name].shape)} here"
                 for name, v in state.items() if name in trained and v.shape != params[name].shape])
    if misfit:  # --resume with other settings than the interrupted run's (a rank, targets, method)
        raise LoadError(f"{path} does not fit this run: {misfit[0]}" + (f" (and {len(misfit) - 1} more)" if
                        len(misfit) > 1 else "") + "; resume with the settings in the run's args.json")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# ---- reporting ----------------------------------------------------------------------------------

def results_table(before, after):
    keys = [k for k in after if isinstance(after[k], (int, float))]
    lines = ["| metric | before | after |", "|---|---|---|"]
    for k in keys:
        b = before.get(k)
        lines.append(f"| {k} | {b:.4f} | {after[k]:.4f} |" if b is not None else f"| {k} | - | {after[k]:.4f} |")
    return "\n".join(lines)


def plot_curves(log_path, out_path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in open(log_path, encoding="utf-8")]
    train = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
    evals = [(r["step"], r["metrics"]) for r in rows if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        axes[0].plot(*zip(*train))
    axes[0].set(xlabel="step", ylabel="train loss")
    if evals:
        metric = next(iter(evals[-1][1]))
        axes[1].plot([s for s, _ in evals], [m[metric] for _, m in evals], marker="o")
        axes[1].set(xlabel="step", ylabel=f"eval {metric}")
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return True


# ---- main -----------------------------------------------------------------------------------------

def build_model(args, folder, cfg, task, num_labels):
    model_task = "seq-cls" if task == "seq-cls" else "causal-lm"
    if model_task == "causal-lm" and cfg["model_type"] not in DECODERS:
        raise LoadError(f"task {task} needs a decoder; {args.model} is a {cfg['model_type']} encoder (use --task seq-cls)")
    prompt = args.method == "prompt"
    check_positions(cfg, args.model, args.max_length + (args.num_virtual_tokens if prompt else 0),
                    f"--max-length {args.max_length}" + (f" + {args.num_virtual_tokens} virtual tokens" if prompt else ""))
    # QLoRA is about memory: freed activations leave the process; otherwise they are reused, so a step
    # does not page-fault in fresh memory (quant/allocator.py)
    (keep_freed_memory if args.quant == "none" else map_large_allocations)()
    return load_model(folder, task=model_task, num_labels=num_labels, dtype=getattr(torch, args.dtype),
                      quant=None if args.quant == "none" else args.quant, ignore_mismatched_sizes=True)


def add_method(args, model, tokenizer):
    if args.method == "lora":
        split = lambda s: None if s is None else [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
        # apply_lora lets a module to save match nothing (peft's files name heads of every architecture);
        # a name typed here must match
        for name in split(args.modules_to_save) or []:
            if not head_names(model, [name]):
                names = short_names(n for n, _ in model.named_modules() if n and not n[-1].isdigit())
                raise AdapterError(f"--modules-to-save: {name!r} matches no module of this model; its modules are "
                                   f"named: {', '.join(names)}")
        targets = "all-linear" if args.target_modules == "all-linear" else split(args.target_modules)
        # apply_lora, as peft, needs only one of the names to match; a misspelt one typed here is an error
        layers = linear_layer_names(model)
        unmatched = [t for t in targets if not any(matches(n, [t]) for n in layers)] \
            if isinstance(targets, list) else []
        if unmatched and len(unmatched) < len(targets):  # none matching: apply_lora says so
            raise AdapterError(f"--target-modules: {', '.join(unmatched)} "
                               f"{'matches' if len(unmatched) == 1 else 'match'} no linear layer of this model; its "
                               f"linear layers are named: {', '.join(short_names(layers))}")
        apply_lora(model, LoraConfig(r=args.rank, alpha=args.alpha, dropout=args.dropout, use_rslora=args.use_rslora,
                                     use_dora=args.use_dora, target_modules=targets,
                                     modules_to_save=split(args.modules_to_save)))
        return model
    if args.method == "prompt":
        return PromptTuningModel(model).add_prompt("default", args.num_virtual_tokens, args.prompt_init,
                                                   args.prompt_init_text, tokenizer)
    return model.requires_grad_(True)


def stop_on_sigterm(signum, frame):
    """kill, a job scheduler or torchrun stopping the run: saved and resumable as after Ctrl-C."""
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(argv)
    rank, world = init_distributed()
    is_main = rank == 0
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise LoadError(f"--output-dir {out} is a file; name a folder")
    if out.is_dir() and rank == 0:
        recover_folder(out / "checkpoint")  # a save that a kill cut short
    if dist.is_initialized():
        dist.barrier()  # before the other processes read it
    if args.resume:
        check_resume(args, out, world)
    else:
        check_not_interrupted(out)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    splits = data.load_splits(args.dataset, args.dataset_config)
    if args.train_split not in splits:
        raise data.DataError(f"the dataset has no {args.train_split!r} split (it has {', '.join(splits)})")
    folder = resolve(args.model)
    cfg = read_config(folder)
    is_decoder = cfg["model_type"] in DECODERS
    task = args.task or data.infer_task(splits[args.train_split], is_decoder)
    with nullcontext() if is_main else redirect_stderr(io.StringIO()):  # its notes once, from the first process
        train_set, eval_set, test_set, names, words = prepare_data(args, Tokenizer.from_folder(folder, cfg), task,
                                                                   splits)
    metric = args.metric or ("loss" if task == "causal-lm" else "accuracy")
    if metric not in metric_names(task, names):
        raise data.DataError(f"--metric {metric} is not one of the evaluation's metrics for {task}: "
                             f"{', '.join(metric_names(task, names))}")
    model, tokenizer = build_model(args, folder, cfg, task, len(names) if names else 2)
    if model.resized_heads and is_main:
        print(f"note: {args.model}'s {', '.join(model.resized_heads)} is sized for another number of labels than "
              f"the data's {len(names)}; it starts at random", file=sys.stderr)
    if task == "causal-lm" and tokenizer.pad_token_id is None:
        raise LoadError("the tokenizer has no pad or eos token to pad batches with")

    eval_seconds = [0.0]

    def run_eval(examples, desc, rouge=False):
        start = time.time()
        result = evaluate(model, examples, task, tokenizer, args.eval_batch_size, words, rouge=rouge,
                          max_new_tokens=args.max_new_tokens, desc=desc)
        eval_seconds[0] += time.time() - start
        return result

    state = {"step": 0, "epoch": 0, "micro": 0, "best": None, "best_step": None, "best_metrics": None, "bad_evals": 0,
             "before": None, "eval_due": False, "last_eval": None}  # eval_due: the evaluation after this step has not
    # finished; last_eval: the step of the last finished evaluation
    if args.resume:
        # older checkpoints lack the last two
        saved_state = {"eval_due": False, "last_eval": None} | read_json(out / "checkpoint" / "state.json")
        if set(state) - set(saved_state):
            raise damaged(out / "checkpoint" / "state.json", KeyError(", ".join(sorted(set(state) - set(saved_state)))))
        bad = next((k for k in ("step", "epoch", "micro", "bad_evals")
                    if type(saved_state[k]) is not int or saved_state[k] < 0), None)
        if bad:
            raise damaged(out / "checkpoint" / "state.json", ValueError(f"{bad} is {saved_state[bad]!r}, not a count"))
        state = saved_state
    # both before the first evaluation, so that a wrong target name or an output folder that cannot be
    # made fails at once; the folder on every process, so that all stop (only the first writes into it)
    out.mkdir(parents=True, exist_ok=True)
    model = add_method(args, model, tokenizer)
    if state["before"] is None:
        with disable_adapters(model):  # the base model (with --method none there is nothing to switch off)
            state["before"] = run_eval(test_set, "eval before" if is_main else None, args.rouge)
    if is_main:
        print_trainable_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # as transformers' Trainer: no decay on biases and norm weights (the 1-D tensors), decay on DoRA's magnitudes
    decayed = {id(p) for name, p in model.named_parameters() if p.ndim >= 2 or "lora_magnitude_vector" in name}
    groups = [{"params": [p for p in params if id(p) in decayed], "weight_decay": args.weight_decay},
              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    batches_per_epoch = len(micro_batches(len(train_set), args.batch_size, world, args.seed, 0))
    if not batches_per_epoch:  # several processes drop an epoch's last, partial global batch
        raise data.DataError(f"{len(train_set)} training examples are fewer than one global batch ({args.batch_size} "
                             f"x {world} processes); lower --batch-size")
    if args.method == "none" and args.dtype == "bfloat16" and is_main:
        print("note: full fine-tuning of bfloat16 weights keeps no float32 copy, so most AdamW updates round away; "
              "--dtype float32 (with --autocast for bf16 compute) trains them", file=sys.stderr)
    steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum)  # the last step of an epoch may be short
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * steps_per_epoch))  # as Trainer rounds
    if args.lr is None:
        args.lr = default_lr(args.method, task, total_steps)
    if is_main:
        print(f"{total_steps} optimizer steps, peak learning rate {args.lr:.3g}")
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    warmup = warmup_steps(args.warmup, total_steps)
    if warmup >= total_steps and is_main:
        print(f"note: --warmup {args.warmup:g} is {warmup} steps, as many as the run's {total_steps} or more: the "
              f"learning rate never reaches {args.lr:.3g}", file=sys.stderr)
    if state["step"] > total_steps:  # equal: interrupted in the final evaluation, which resuming redoes
        raise LoadError(f"--resume: the checkpoint is at step {state['step']}, and this run ends at step {total_steps}; "
                        "pass a larger --max-steps or --epochs to train on")
    schedule = lr_lambda(args.schedule, warmup, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    if args.resume:
        load_trainable(model, out / "checkpoint" / "trainable.safetensors")
        try:
            saved = torch.load(out / "checkpoint" / "optimizer.pt", weights_only=True)
            optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, EOFError, KeyError, ValueError, TypeError, pickle.UnpicklingError) as e:  # torch.load's,
            # the states' (weights_only refuses anything but tensors and plain containers: UnpicklingError)
            raise damaged(out / "checkpoint" / "optimizer.pt", e) from e
        # at its step of this run's schedule: the saved learning rate is the interrupted run's, which differs
        # when the resumed run is longer
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule, last_epoch=state["step"] - 1)
        if is_main:
            restore_best(out, state["best_step"])
    virtual = getattr(model, "virtual_tokens", 0)  # a soft prompt's positions: its last one predicts the first token
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else None
    train_model = ddp or model
    if is_main:
        write_json(out / "args.json", vars(args) | {"processes": world})
    if is_main and args.resume:
        cut_log(out / "log.jsonl", state)
    log = open(out / "log.jsonl", "a" if args.resume else "w", encoding="utf-8") if is_main else None
    autocast = torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16) if args.autocast else nullcontext()

    committed = {}  # the state of the last finished step or evaluation: what an interruption saves

    def checkpoint():
        if is_main:
            best = out / "best" / "trainable.safetensors" if state["best_step"] is not None else None
            save_checkpoint(out / "checkpoint", model, optimizer, state, best)

    def evaluate_step():
        """Evaluate after this step, keep the best weights; whether early stopping ends the run."""
        result = run_eval(eval_set, "eval" if is_main else None)
        better = state["best"] is None or (result[metric] > state["best"] if HIGHER_IS_BETTER[metric]
                                           else result[metric] < state["best"])
        # the new best weights, the state that knows them, the log row and what an interruption saves: together
        with signals_deferred():
            if better:
                state["best"], state["best_step"], state["bad_evals"] = result[metric], state["step"], 0
                state["best_metrics"] = result
                if is_main:
                    weights = trainable_state(model)
                    replace_folder(out / "best", lambda tmp: save_file(weights, str(tmp / "trainable.safetensors")))
            else:
                state["bad_evals"] += 1
            state["eval_due"], state["last_eval"] = False, state["step"]
            if log:
                log.write(json.dumps({"kind": "eval", "step": state["step"], "metrics": result}) + "\n")
                log.flush()
            committed.update(copy.deepcopy(state))
        if is_main:
            tqdm.write(f"step {state['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
        stop = bool(args.early_stopping_patience and state["bad_evals"] >= args.early_stopping_patience)
        if stop and is_main:
            tqdm.write(f"early stopping: no better {metric} for {state['bad_evals']} evaluations")
        if stop or not args.save_every:
            checkpoint()
        return stop

    epoch_batches = micro_batches(len(train_set), args.batch_size, world, args.seed, state["epoch"])
    if state["step"] >= total_steps and state["last_eval"] != state["step"]:  # resumed to end where it stands
        state["eval_due"] = True
    committed.update(copy.deepcopy(state))
    bar = tqdm(total=total_steps, initial=state["step"], desc="train", disable=not is_main)
    started, eval_seconds[0] = time.time(), 0.0
    on_sigterm = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        # a run interrupted in an evaluation redoes it first; one that stopped early stays stopped (unless
        # resumed with more patience)
        stop = state["eval_due"] and evaluate_step()
        stop = stop or bool(args.early_stopping_patience and state["bad_evals"] >= args.early_stopping_patience)
        while not stop and state["step"] < total_steps:
            model.train()
            torch.manual_seed(step_seed(args.seed, state["step"], rank))
            if state["micro"] >= len(epoch_batches):
                state["epoch"], state["micro"] = state["epoch"] + 1, 0
                epoch_batches = micro_batches(len(train_set), args.batch_size, world, args.seed, state["epoch"])
            group = []
            # a step takes up to --grad-accum micro-batches but never spans two epochs (as transformers'
            # Trainer), so --epochs N is N passes over the data
            for _ in range(min(args.grad_accum, len(epoch_batches) - state["micro"])):
                indices = epoch_batches[state["micro"]]
                share = len(indices) // world
                mine = indices[rank * share:(rank + 1) * share] if world > 1 else indices
                group.append(data.collate([train_set[i] for i in mine], tokenizer.pad_token_id))
                state["micro"] += 1
            denominator = all_sum(sum(count_targets(b, task, virtual) for b in group), world) / world
            step_loss = 0.0
            for i, batch in enumerate(group):
                sync = nullcontext() if ddp is None or i == len(group) - 1 else ddp.no_sync()
                with sync, autocast:
                    total, _ = loss_sum(train_model, batch, task, virtual)
                    (total / denominator).backward()
                step_loss += total.item()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            lr = scheduler.get_last_lr()[0]  # this step's
            # before the deferred block: a collective there would keep waiting for a process that was stopped
            step_loss = all_sum(step_loss, world) / (denominator * world)
            with signals_deferred():
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["step"] += 1
                state["eval_due"] = bool(args.eval_every and state["step"] % args.eval_every == 0
                                         or state["step"] >= total_steps)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if log:
                    log.write(json.dumps({"kind": "train", "step": state["step"], "epoch": state["epoch"],
                                          "loss": step_loss, "lr": lr, "time": time.time() - started}) + "\n")
                    log.flush()
                committed.update(copy.deepcopy(state))
            if not math.isfinite(step_loss):
                raise FloatingPointError(f"the training loss became {step_loss} at step {state['step']}; lower --lr "
                                         f"and start over in another --output-dir (or after deleting {out})")
            if state["eval_due"] and evaluate_step():
                break
            if args.save_every and state["step"] % args.save_every == 0:
                checkpoint()
    except BaseException as stopped:
        # Ctrl-C or SIGTERM; or, under torchrun, a collective failing because another process stopped first (on
        # Ctrl-C every process gets the signal, and the one that acts first leaves its peers' all-reduce failing:
        # rank 0 then saved nothing). Either way the weights and optimizer are still those of the last finished step.
        done = saved = False
        while not done:  # every call inside the try: a signal pending from before the save interrupts it there
            try:
                if isinstance(stopped, KeyboardInterrupt) or lost_a_peer(stopped, world):
                    with signals_deferred():  # a signal now (torchrun's SIGTERM after a Ctrl-C) waits for the save
                        state = copy.deepcopy(committed)
                        checkpoint()
                        saved = True
                done = True
            except KeyboardInterrupt:
                done = saved  # deferred until the save ended; or pending from before it began: save again
        if saved and is_main:
            why = "interrupted" if isinstance(stopped, KeyboardInterrupt) else "another process stopped (the error below)"
            print(f"\n{why} at step {state['step']}: checkpoint saved in {out / 'checkpoint'}; "
                  "run again with --resume to continue", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, on_sigterm)
        bar.close()
        if log:
            log.close()

    if world > 1:
        dist.barrier()  # rank 0 has written best/ before any rank reads it
    if state["best_step"] is not None:  # this run's (or the resumed run's) best evaluation
        load_trainable(model, out / "best" / "trainable.safetensors")
    if test_set is eval_set and not args.rouge and state.get("best_metrics") is not None:
        after = state["best_metrics"]  # the best weights were already evaluated on these very examples
    else:
        after = run_eval(test_set, "eval after" if is_main else None, args.rouge)
    if is_main:
        print(f"\n{args.model} on {data.dataset_label(args.dataset, args.dataset_config)} ({task}, {args.method}), "
              f"best step {state['best_step']} by {metric}:")
        print(results_table(state["before"], after))
        results = {"before": state["before"], "after": after, "best_step": state["best_step"], "task": task,
                   "labels": names, "train_seconds": time.time() - started - eval_seconds[0]}
        saved = out / ("model" if args.method == "none" else "adapter")  # full fine-tuning: a whole checkpoint
        save_output(model, tokenizer, saved, args, task, names, words)
        if plot_curves(out / "log.jsonl", out / "curves.png"):
            print(f"curves: {out / 'curves.png'}")
        print(f"saved: {saved}")
        if args.save_merged:  # after the adapter, as merging changes the model in place
            merged = merge_and_unload(dequantize_model(model))
            replace_folder(out / "merged", lambda tmp: save_model(merged, tmp, tokenizer, head_labels(task, names)))
            print(f"saved the merged model: {out / 'merged'}")
        written = {saved.name} | ({"merged"} if args.save_merged else set())
        for stale in sorted({"adapter", "model", "merged"} - written):
            if (out / stale).exists():  # left by an earlier run into this folder; not ours to delete
                print(f"note: {out / stale} is from an earlier run in {out}, not from this one", file=sys.stderr)
        # last: results.json newer than the checkpoint marks the run finished (check_not_interrupted), so a run
        # killed while saving is one that --resume completes, not one whose results describe other files
        write_json(out / "results.json", results)
    if world > 1:
        dist.destroy_process_group()
    return after


def head_labels(task, names):
    """The data's label names for a saved classifier's config.json (None for an LM)."""
    return [str(name) for name in names] if task == "seq-cls" and names else None


def save_output(model, tokenizer, folder, args, task, names, words=None):
    """The adapter in peft's format (or, after full fine-tuning, the whole model), the tokenizer and the
    labels in head order (eval.py maps a split's labels through them), with generate-label's words."""
    def write(tmp):
        if args.method == "none":
            save_model(model, tmp, tokenizer, head_labels(task, names))
        else:
            save_adapter(model, tmp)
            tokenizer.save(tmp)
        if names:
            write_json(tmp / data.LABELS_FILE, {"labels": names} | ({"label_words": words} if words else {}))

    replace_folder(folder, write)


if __name__ == "__main__":
    try:
        main()
    except (LoadError, AdapterError, data.DataError, FloatingPointError) as e:
        # every process of a torchrun job reads the same files and the same all-reduced loss: one says it
        sys.exit(f"error: {e}" if os.environ.get("RANK", "0") == "0" else 1)
    except OSError as e:  # a path and why, from whichever process met it
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)
