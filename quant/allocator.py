"""Give freed large tensors back to the OS, so the memory QLoRA saves shows in a step's peak.

glibc's malloc serves requests below a *dynamic* threshold from its heap and raises the threshold
(up to 32 MiB) whenever a larger memory-mapped block is freed, so after the first large tensor of a
training step every activation comes from the heap. The holes that freed temporaries leave between
live activations cannot be returned to the OS: on smollm2-135m (LoRA, 4 x 256 tokens) the heap held
0.3-0.7 GB of such free fragments at the peak of a step, a random amount that could swallow the
0.37 GB NF4 saves on the weights. A fixed threshold (mallopt M_MMAP_THRESHOLD) serves every block
of at least 128 KiB with its own mapping, released when the tensor is freed, so the peak follows
the live tensors (bench/bench_qlora_memory.py measures both policies and the step time).
"""
import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def map_large_allocations(threshold: int = 128 * 1024) -> bool:
    """Serve allocations >= threshold bytes with mmap (glibc); False where that is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)  # glibc only (not macOS, not musl)
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, threshold))
