"""The C kernels that `pip install` builds beside the Python code (quant/nf4_simd.c, models/dropout.c).

Each is a plain C library with no Python API, loaded with ctypes; where it was not built (no C compiler
at install time) the caller keeps its PyTorch path. A ctypes call lets go of the GIL, so a large job is
split between Python threads that each run one range of it at the same time.
"""
import ctypes
import importlib.util
import threading
from typing import Callable, Optional

import torch


def load_library(module: str) -> Optional[ctypes.CDLL]:
    """The library built as extension module `module` (e.g. "quant._nf4_simd"), or None where it was not built."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return ctypes.CDLL(spec.origin)


def run_in_parts(call: Callable[[int, int], int], n: int, parallel_min: int) -> None:
    """call(first, last) over [0, n): once, or from parallel_min items on, in one range per torch thread.

    `call` returns the C function's status; anything but 0 is an error (a kernel refusing its arguments)."""
    n_parts = torch.get_num_threads() if n >= parallel_min else 1
    bounds = [n * part // n_parts for part in range(n_parts + 1)]
    status = [0] * n_parts

    def run(part: int) -> None:
        status[part] = call(bounds[part], bounds[part + 1])

    helpers = [threading.Thread(target=run, args=(part,)) for part in range(1, n_parts)]
    for helper in helpers:
        helper.start()
    run(0)
    for helper in helpers:
        helper.join()
    if any(status):
        raise RuntimeError(f"a C kernel refused its arguments (status {status})")
