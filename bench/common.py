"""Timing and memory helpers shared by the benchmark scripts (never used by tests)."""
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def model_dir(name):
    return Path(os.environ.get("PEFT_MODELS_DIR") or Path.home() / ".cache" / "peft-models") / name


def fetched(name, columns=0):
    """The folder of fetched model `name`, or None after printing that it is skipped (as a row of a
    Markdown table of `columns` columns when given)."""
    folder = model_dir(name)
    if folder.is_dir():
        return folder
    print(f"| {name} | skipped: not in {folder.parent} |" + " |" * (columns - 2) if columns
          else f"{name}: skipped, not in {folder.parent}")
    return None


def peak_rss():
    """This process's peak resident memory in bytes (VmHWM) since it started or since reset_peak_rss(). Not
    ru_maxrss: Linux carries the parent's peak into a child the parent starts, so a child of a large benchmark
    process read the parent's memory."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss():
    """Start the peak anew from the current resident memory (Linux's clear_refs "5")."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def timeit(fn, repeats=10, warmup=2):
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def round_robin_times(fns, repeats=10, warmup=2, before=None):
    """Wall times (s) of each function, run round-robin so machine noise hits all alike; `before()`,
    when given, runs untimed ahead of every call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if before is not None:
                before()
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved(fns, repeats=10, warmup=2):
    """Median time of each function, run round-robin."""
    return {name: statistics.median(t) for name, t in round_robin_times(fns, repeats, warmup).items()}


# ---- a LoRA training step of ours, as bench_lora.py and bench_gemm.py time it ----------------------------

def inputs(task, B, T):
    """(ids, attention mask, labels) of a fixed random batch: class ids for seq-cls, the ids themselves for an LM."""
    import torch

    torch.manual_seed(0)
    ids = torch.randint(100, 1000, (B, T))
    return ids, torch.ones_like(ids), torch.randint(0, 2, (B,)) if task == "seq-cls" else ids


def our_loss(model, task, ids, mask, labels):
    """What train.py computes: the classifier's cross-entropy, or the mean next-token NLL (models/fused.py)."""
    import torch.nn.functional as F
    from evaluation import next_token_nll

    if task == "seq-cls":
        return F.cross_entropy(model(ids, mask), labels)
    nll, n = next_token_nll(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    return nll / n


def training_step(model, optimizer, loss, train=True):
    """Forward, loss(model), backward, optimizer step."""
    model.train(train)
    loss(model).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
