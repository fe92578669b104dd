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
