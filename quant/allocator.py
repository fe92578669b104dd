"""How glibc's malloc treats freed tensors: the memory / speed trade of a CPU training process.

glibc serves requests below a *dynamic* threshold from its heap and raises the threshold (up to
32 MiB) whenever a larger memory-mapped block is freed; larger blocks get their own mapping, and
the top of the heap is returned to the OS once enough of it is free. Both ends cost time: every
fresh mapping, and the heap regrowing after a trim, page-faults in and zeroes its memory (on
smollm2-135m, LoRA, 8 x 128 tokens, about 1.3 GB of page faults per training step before the loss
was fused, 0.35 GB after). Both ends also cost memory: the holes that freed temporaries leave
between live activations cannot be returned (0.3-0.7 GB of such free fragments at the peak of a
4 x 256 step, a random amount, enough to swallow the 0.37 GB that NF4 saves on the weights).

Two fixed policies (mallopt, glibc only; elsewhere they do nothing and return False):
  keep_freed_memory()     speed: every block below 1 GiB comes from the heap and the heap keeps up to
                          1 GiB of free memory, so after the first step a step allocates nothing new
                          (train.py and eval.py without --quant)
  map_large_allocations() memory: every block of 128 KiB or more gets its own mapping, released when
                          the tensor is freed, so the peak follows the live tensors (--quant: QLoRA
                          is about memory)
bench/bench_qlora_memory.py measures the peak and the step time under each.
"""
import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def _mallopt(*settings) -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)  # glibc only (not macOS, not musl)
    return mallopt is not None and all(bool(mallopt(option, value)) for option, value in settings)


def map_large_allocations(threshold: int = 128 * 1024) -> bool:
    """Serve allocations >= threshold bytes with their own mappings (freed ones go back to the OS)."""
    return _mallopt((M_MMAP_THRESHOLD, threshold))


def keep_freed_memory(limit: int = 1 << 30) -> bool:
    """Serve allocations below `limit` bytes from the heap and trim it only once `limit` bytes at its
    top are free (freed memory is reused). mallopt takes a C int: limit < 2 GiB."""
    return _mallopt((M_MMAP_THRESHOLD, limit), (M_TRIM_THRESHOLD, limit))
