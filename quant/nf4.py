"""NF4: 4-bit NormalFloat blockwise quantization with double quantization.

QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314).

NormalFloat code (paper section 3)
----------------------------------
Pretrained weights are close to N(0, σ²), so the 16 levels are quantiles of a standard normal,
rescaled to [-1, 1]. To have an exact zero, 8 levels come from the positive half and 7 from the
negative half (16 codes: 7 negative, 0, 8 positive):

    q⁺_i =  Φ⁻¹(p_i),  p_i = linspace(δ, 1/2, 9)[:8]
    q⁻_i = -Φ⁻¹(p_i),  p_i = linspace(δ, 1/2, 8)[:7]
    NF4  = sort(q⁻ ∪ {0} ∪ q⁺) / max(q⁺)

with δ = 0.9677083 ≈ ½((1 - 1/30) + (1 - 1/32)), the mean of the outermost quantile for 15 and
16 bins, so the extreme levels are not at ±∞.

Blockwise absmax quantization
-----------------------------
The flattened weight is cut into blocks of `blocksize` (default 64) consecutive values; each
block b keeps one float32 scale, its absolute maximum:

    s_b = max_j |w_j|,   c_j = argmin_i |w_j / s_b - NF4_i|   (a tie goes to the lower code)
    ŵ_j = NF4[c_j] · s_b

Two 4-bit codes share a byte, the first element in the high nibble: byte_k = c_2k << 4 | c_2k+1,
stored as a (numel / 2, 1) uint8 tensor (bitsandbytes' layout, so the bytes are interchangeable).

Double quantization (paper section 3)
-------------------------------------
The fp32 scales cost 32 / 64 = 0.5 bit per weight. QLoRA quantizes them too: subtract their mean
μ, then quantize s - μ blockwise (256 scales per block) to 8 bits with the signed dynamic code
of Dettmers 2015 (arXiv:1511.04561, 8-bit approximations): 8/64 + 32/(64·256) ≈ 0.127 bit
per weight. Dequantization first rebuilds s_b = DYNAMIC[c'_b] · s'_(b // 256) + μ.

bitsandbytes' CPU kernel rounds the 8-bit codes in two steps: x / absmax is first snapped to a
65536-step grid over [-1, 1], and the grid point is then mapped to its nearest code. We round the
same way so the bytes match bitsandbytes exactly; it differs from exact nearest rounding only for
values within 1/65535 of the midpoint between two codes.

Dequantization
--------------
ŵ = NF4[c] · s_b is a 16-entry table lookup and one multiply per weight. On x86-64 CPUs with AVX2 or
AVX512 it runs in C (quant/nf4_simd.c, built by pip install, loaded with ctypes): the 16 levels sit
in one vector register and a permute looks 16 codes up at once, as bitsandbytes' kernel does. Eager
PyTorch has no register lookup, so the fallback here gathers both levels of each byte from a 256-entry
table in memory and then scales them, about 3 x slower on small weights; both give the same floats.
"""
import ctypes
from dataclasses import dataclass
from typing import Optional

import torch

from models.native import load_library

ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKSIZE = 64  # the default, as bitsandbytes'
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NESTED_BLOCKSIZE = 256


def normal_float_code(offset: float = 0.9677083) -> torch.Tensor:
    """The 16 NF4 levels in [-1, 1], ascending. (16,) float32."""
    # ndtri = Φ⁻¹. float32 quantile points, float32 levels, normalised in float32: this reproduces
    # the published table (bitsandbytes' get_4bit_type("nf4")) bit for bit
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double()).float()  # (8,)
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double()).float()  # (7,)
    levels = torch.cat([negative, torch.zeros(1), positive]).sort().values
    return levels / levels.max()


def dynamic_code() -> torch.Tensor:
    """The 256 levels of the signed 8-bit dynamic data type (Dettmers 2015), ascending. (256,) float32.

    Exponent e = 0..6 selects the decade 10^(e-6); the remaining bits split [0.1, 1] of that decade
    linearly into 2^e steps (one sign bit, then a unary exponent, then the fraction), plus 0 and 1.
    """
    levels = [torch.tensor([0.0, 1.0])]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1)
        midpoints = (edges[:-1] + edges[1:]) / 2
        levels += [midpoints * 10.0 ** (e - 6), -midpoints * 10.0 ** (e - 6)]
    return torch.cat(levels).sort().values


NF4_CODE = normal_float_code()  # (16,)
DYNAMIC_CODE = dynamic_code()  # (256,)

# Dequantization looks bytes up in this table: entry k holds the two float32 NF4 levels of byte k
# (high nibble first) bit-cast to one int64, so a single lookup fetches both; one row, so that it
# broadcasts to the rows `lookup` gathers over. (1, 256)
_bytes = torch.arange(256)
TWO_LEVELS_BY_BYTE = torch.stack([NF4_CODE[_bytes >> 4], NF4_CODE[_bytes & 15]], dim=1).view(torch.int64).view(1, -1)

# Quantization finds each scaled weight's nearest level, i.e. the number of level midpoints strictly
# below it (a tie going to the lower level), without a binary search: [-1, 1] is cut into 64 equal
# cells, none holding more than one midpoint, so that count is the midpoints below the cell plus one
# comparison with the cell's own midpoint (+inf where it has none). Every midpoint is >= 1.6e-3 from
# a cell edge, far beyond the float32 error of computing the cell, so the count is exact. (64,)
NF4_CELLS = 64
_NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # (15,) float32, as bitsandbytes compares
_cell_of_midpoint = ((_NF4_MIDPOINTS.double() + 1) * (NF4_CELLS / 2)).floor().long()
MIDPOINTS_BELOW_CELL = torch.bucketize(-1 + 2 * torch.arange(NF4_CELLS, dtype=torch.float64) / NF4_CELLS,
                                       _NF4_MIDPOINTS.double()).to(torch.uint8)
MIDPOINT_IN_CELL = torch.full((NF4_CELLS,), float("inf")).index_put_((_cell_of_midpoint,), _NF4_MIDPOINTS)


def nearest_nf4_level(scaled: torch.Tensor) -> torch.Tensor:
    """The NF4 code of each value of `scaled` (in [-1, 1]): midpoints strictly below it. uint8, flat."""
    # clamped at 0 too: a NaN casts to INT_MIN (quantize_nf4 then refuses the weight)
    cell = scaled.add(1.0).mul_(NF4_CELLS / 2).to(torch.int32).clamp_(0, NF4_CELLS - 1).view(-1)
    below, midpoint = MIDPOINTS_BELOW_CELL.to(scaled.device), MIDPOINT_IN_CELL.to(scaled.device)
    return below[cell].add_(scaled.reshape(-1) > midpoint[cell])

# bitsandbytes' CPU 8-bit rounding: grid point g in [0, 65535] stands for -1 + 2g/65535 and maps to
# the number of code midpoints strictly below it, i.e. its nearest code (ties to the lower one).
_GRID = 65535
_grid_values = -1.0 + (2.0 * torch.arange(_GRID + 1, dtype=torch.float32)) / _GRID
DYNAMIC_CODE_BY_GRID = torch.searchsorted((DYNAMIC_CODE[:-1] + DYNAMIC_CODE[1:]) * 0.5, _grid_values).to(torch.uint8)


@dataclass
class NF4State:
    """Everything besides the packed codes that dequantization needs.

    absmax         (n_blocks,) float32 block scales; with double quantization the 8-bit codes
                   of (scale - offset) instead, uint8
    nested_absmax  (ceil(n_blocks / 256),) float32 scales of those codes (double quant only)
    offset         () float32, mean of the block scales (double quant only)
    The nested code table is always DYNAMIC_CODE, with 256 scales per nested block.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    nested_absmax: Optional[torch.Tensor] = None
    offset: Optional[torch.Tensor] = None

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


def check_blocksize(numel: int, blocksize: int) -> None:
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"NF4 blocksize must be one of {ALLOWED_BLOCKSIZES}, got {blocksize}")
    if numel == 0:
        raise ValueError("NF4 needs a non-empty weight")
    if numel % blocksize:
        raise ValueError(f"NF4 needs the number of weights ({numel}) to be a multiple of blocksize ({blocksize})")


def quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """Absmax-scaled 8-bit dynamic-code quantization of a 1-D tensor; the last block may be short.

    Returns (codes (n,) uint8, absmax (ceil(n / blocksize),) float32).
    """
    n = x.numel()
    blocks = torch.nn.functional.pad(x.float(), (0, -n % blocksize)).view(-1, blocksize)  # zeros leave absmax alone
    absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    grid_index = ((scaled + 1.0) * 0.5 * _GRID + 0.5).int()  # truncation, as the C kernel's cast
    codes = DYNAMIC_CODE_BY_GRID.to(x.device)[grid_index]
    codes.masked_fill_((absmax == 0)[:, None], 0)  # bitsandbytes writes code 0 for an all-zero block
    return codes.view(-1)[:n].clone(), absmax  # clone: don't keep the padding's storage alive


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """Inverse of quantize_blockwise_8bit: DYNAMIC_CODE[codes] * absmax of their block. float32."""
    scale = absmax.repeat_interleave(blocksize)[: codes.numel()]  # (n,) the scale of each code's block
    return DYNAMIC_CODE.to(codes.device).index_select(0, codes.int()) * scale


# Quantization also walks the weight in chunks of this many values, writing into the preallocated
# codes and scales: its float temporaries stay small (and in cache) however large the weight is,
# so quantizing a model while loading it does not leave weight-sized holes in the heap.
QUANTIZE_CHUNK = 1 << 16


def quantize_nf4(weight: torch.Tensor, blocksize: int = BLOCKSIZE, double_quant: bool = False):
    """Quantize `weight` (any shape, numel a multiple of blocksize) to packed NF4.

    Returns (packed (numel / 2, 1) uint8, NF4State).
    """
    if weight.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"NF4 quantization takes float32/float16/bfloat16 weights, got {weight.dtype}")
    check_blocksize(weight.numel(), blocksize)
    values = weight.detach().reshape(-1)  # (numel,)
    n_blocks = values.numel() // blocksize
    packed = torch.empty(values.numel() // 2, 1, dtype=torch.uint8, device=weight.device)  # (numel / 2, 1)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=weight.device)  # (n_blocks,)
    step = max(QUANTIZE_CHUNK // blocksize, 1)  # blocks per chunk
    for first in range(0, n_blocks, step):
        last = min(first + step, n_blocks)
        blocks = values[first * blocksize: last * blocksize].float().view(-1, blocksize)  # (chunk blocks, blocksize)
        scale = torch.amax(blocks.abs(), dim=1, out=absmax[first:last])
        # an all-zero block has absmax 0; the clamp keeps 0 * (1 / absmax) finite
        scaled = (blocks * (1.0 / scale.clamp(min=1e-38))[:, None]).clamp_(-1, 1)
        codes = nearest_nf4_level(scaled).view(-1, blocksize)
        chunk_bytes = packed[first * blocksize // 2: last * blocksize // 2].view(-1, blocksize // 2)
        torch.bitwise_or(codes[:, 0::2] << 4, codes[:, 1::2], out=chunk_bytes)

    if not torch.isfinite(absmax).all():  # amax keeps a NaN; the codes of such a block are meaningless
        raise ValueError("NF4 quantization needs finite weights; this one holds NaN or inf")
    state = NF4State(absmax, weight.shape, weight.dtype, blocksize)
    if double_quant:
        state.offset = absmax.mean()
        if not torch.isfinite(state.offset):  # float32 overflows summing scales near its maximum
            raise ValueError(f"double quantization: the mean of the block scales overflows float32 (largest "
                             f"{absmax.max().item():.3g}); quantize this weight without double quantization")
        state.absmax, state.nested_absmax = quantize_blockwise_8bit(absmax - state.offset)
    return packed, state


def dequantize_absmax(state: NF4State) -> torch.Tensor:
    """The float32 block scales, undoing double quantization if it was used. (n_blocks,)"""
    if not state.double_quant:
        return state.absmax
    return dequantize_blockwise_8bit(state.absmax, state.nested_absmax) + state.offset


# Dequantization walks the codes in chunks of this many bytes (2 weights each), so the int64 index
# and float32 output of one chunk (4 + 4 MB) stay in the last-level cache between the three passes
# (convert, look up, scale); measured here, 2^19 beats both smaller chunks (Python overhead) and one
# whole-tensor pass (4096 x 4096 into a buffer: 4.6 ms, vs 5.8 at 2^18, 8.1 at 2^16, 9.4 in one pass).
DEQUANTIZE_CHUNK = 1 << 19
# The lookup is a gather along the rows of a (rows, LOOKUP_ROW) view of the chunk from the table
# broadcast to every row: torch's CPU gather then splits the rows across its threads, where a 1-D
# index_select runs on one (576 x 1536: 0.28-0.31 vs 0.41-0.50 ms for the whole dequantization;
# bitsandbytes 0.08). Into a fresh tensor the output's page faults then happen on every core too, as
# fast as the Python threads that each dequantized a part before (4096 x 4096: 31 vs 29-31 ms).
LOOKUP_ROW = 2048


def dequantize_scratch_size(n_bytes: int) -> int:
    """Elements of the int64 index scratch that dequantizing n_bytes of codes needs: one chunk's."""
    return min(DEQUANTIZE_CHUNK, n_bytes)


def lookup(table: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """out[i] = table[0, index[i]] for 1-D index and out: a gather over rows of LOOKUP_ROW entries, and
    one more for the remainder."""
    rows, tail = divmod(index.numel(), LOOKUP_ROW)
    whole = rows * LOOKUP_ROW
    if rows:
        torch.gather(table.expand(rows, -1), 1, index[:whole].view(rows, LOOKUP_ROW), out=out[:whole].view(rows, LOOKUP_ROW))
    if tail:
        torch.gather(table, 1, index[whole:].view(1, tail), out=out[whole:].view(1, tail))


class BlockScales(ctypes.Structure):
    """quant/nf4_simd.c's BlockScales: the float32 scales, or (absmax NULL) the double-quantized ones."""
    _fields_ = [("absmax", ctypes.c_void_p), ("absmax_codes", ctypes.c_void_p), ("nested_absmax", ctypes.c_void_p),
                ("dynamic_levels", ctypes.c_void_p), ("offset", ctypes.c_float)]


def _load_simd_lookup():
    """The C lookup of quant/nf4_simd.c and the widest SIMD this CPU runs it with: (library, 512 | 256), or
    (None, 0) where it was not built or the CPU has neither AVX512 nor AVX2."""
    library = load_library(f"{__package__}._nf4_simd")
    if library is None:
        return None, 0
    library.nf4_dequantize.argtypes = [ctypes.c_void_p, ctypes.POINTER(BlockScales), ctypes.c_void_p, ctypes.c_void_p,
                                       ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int64]
    library.nf4_dequantize.restype = ctypes.c_int
    width = library.nf4_simd_width()
    return (library, width) if width else (None, 0)


_SIMD_LOOKUP, SIMD_WIDTH = _load_simd_lookup()  # tests set SIMD_WIDTH to 256 or 0 to run the other paths
# From this many weights on, the blocks are split between torch's threads (OpenMP in the C library, on torch's own
# threads). Into a reused buffer, one thread vs two here: 576 x 1536 0.085 vs 0.051 ms, 2048 x 2048 0.39 vs 0.18 ms,
# 4096 x 4096 2.7 vs 2.1 ms (into a fresh tensor 28 vs 17 ms; 2026-12-04, ad-hoc script not kept); below about 64K
# weights waking a thread costs more.
SIMD_PARALLEL_MIN = 1 << 16


def simd_dequantize(codes: torch.Tensor, state: NF4State, weight: torch.Tensor) -> None:
    """weight = NF4[codes] * block scale by the C lookup, for contiguous CPU codes and float32 weight."""
    if state.double_quant:
        absmax_codes, nested_absmax = state.absmax.contiguous(), state.nested_absmax.to(torch.float32).contiguous()
        scales = BlockScales(None, absmax_codes.data_ptr(), nested_absmax.data_ptr(), DYNAMIC_CODE.data_ptr(),
                             float(state.offset))
    else:
        absmax = state.absmax.to(torch.float32).contiguous()
        scales = BlockScales(absmax.data_ptr(), None, None, None, 0.0)
    status = _SIMD_LOOKUP.nf4_dequantize(codes.data_ptr(), ctypes.byref(scales), NF4_CODE.data_ptr(), weight.data_ptr(),
                                         state.absmax.numel(), state.blocksize, SIMD_WIDTH,
                                         SIMD_PARALLEL_MIN // state.blocksize)
    if status:
        raise RuntimeError(f"quant/nf4_simd.c refused blocksize {state.blocksize} at width {SIMD_WIDTH}")


def dequantize_nf4(packed: torch.Tensor, state: NF4State, out: Optional[torch.Tensor] = None,
                   scratch: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ŵ = NF4[code] * block absmax, computed in float32 and returned as state.dtype, state.shape.

    On a CPU with AVX2 or AVX512 one C pass looks the codes up in a register (quant/nf4_simd.c); elsewhere
    PyTorch widens the codes, gathers both levels of each byte from TWO_LEVELS_BY_BYTE and scales them.
    A caller that dequantizes many layers can pass buffers to reuse instead of allocating per call:
    out      float32 tensor of at least numel elements to write ŵ into (the result is then a view
             of `out` when state.dtype is float32);
    scratch  int64 tensor of at least dequantize_scratch_size(numel / 2) elements for the PyTorch
             path's indices.
    """
    n_bytes, blocksize = packed.numel(), state.blocksize
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed NF4 codes are uint8, got {packed.dtype}")
    if state.shape.numel() != 2 * n_bytes or state.absmax.numel() * blocksize != 2 * n_bytes:
        raise ValueError(f"the state does not fit the codes: {n_bytes} bytes hold {2 * n_bytes} weights, the state "
                         f"describes shape {tuple(state.shape)} in {state.absmax.numel()} blocks of {blocksize}")
    if state.double_quant:
        n_nested = -(-state.absmax.numel() // NESTED_BLOCKSIZE)
        if state.absmax.dtype != torch.uint8 or state.nested_absmax.numel() != n_nested:
            raise ValueError(f"a double-quantized state holds uint8 codes of its block scales and {n_nested} nested "
                             f"scales of {state.absmax.numel()} block scales, got {state.absmax.dtype} codes and "
                             f"{state.nested_absmax.numel()} nested scales")
    codes = packed.reshape(-1)  # (numel / 2,)
    n_index = dequantize_scratch_size(n_bytes)
    if out is None:
        out = torch.empty(2 * n_bytes, dtype=torch.float32, device=packed.device)
    elif out.dtype != torch.float32 or out.numel() < 2 * n_bytes or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 tensor of at least {2 * n_bytes} elements")
    if scratch is not None and (scratch.dtype != torch.int64 or scratch.numel() < n_index):
        raise ValueError(f"scratch must be an int64 tensor of at least {n_index} elements")
    weight = out.view(-1)[: 2 * n_bytes]
    if SIMD_WIDTH and packed.device.type == "cpu" and blocksize % 16 == 0:
        simd_dequantize(codes.contiguous(), state, weight)
        return weight.view(state.shape).to(state.dtype)
    absmax = dequantize_absmax(state)
    if scratch is None:
        scratch = torch.empty(n_index, dtype=torch.int64, device=packed.device)
    two_levels = weight.view(torch.int64)  # (numel / 2,) each entry the two float32 levels of one byte
    table = TWO_LEVELS_BY_BYTE.to(packed.device)
    for start in range(0, n_bytes, DEQUANTIZE_CHUNK):  # a chunk is a whole number of blocks
        stop = min(start + DEQUANTIZE_CHUNK, n_bytes)
        index = scratch[: stop - start]
        index.copy_(codes[start:stop])  # gather takes int32 or int64 indices, not uint8; int64 was faster
        lookup(table, index, two_levels[start:stop])
        blocks = weight[2 * start: 2 * stop].view(-1, blocksize)  # (blocks in chunk, blocksize)
        blocks.mul_(absmax[2 * start // blocksize: 2 * stop // blocksize, None])
    return weight.view(state.shape).to(state.dtype)
