"""The C kernels that `pip install` builds beside the Python code (quant/nf4_simd.c, models/dropout.c).

Each is a plain C library with no Python API, loaded with ctypes; where it was not built (no C compiler
at install time) the caller keeps its PyTorch path. The libraries split large jobs with OpenMP, built by gcc
against libgomp.so.1: torch's Linux wheels ship their own libgomp.so.1 and load it on import, before these,
so the loader gives them that one and their loops run on torch's intra-op threads (a compiler bringing
another OpenMP runtime, e.g. clang's libomp, would add a second pool of threads competing with torch's).
"""
import ctypes
import importlib.util
from typing import Optional

import torch  # noqa: F401  (first: its libgomp.so.1 must be the one the libraries get)


def load_library(module: str) -> Optional[ctypes.CDLL]:
    """The library built as extension module `module` (e.g. "quant._nf4_simd"), or None where it was not built."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    return ctypes.CDLL(spec.origin)
