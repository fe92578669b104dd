"""LLM.int8(): vector-wise int8 matmul with mixed-precision outlier decomposition.

Dettmers et al. 2022, "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale",
arXiv:2208.07339.

Vector-wise quantization (paper section 3.1)
--------------------------------------------
Every row of X (one token) and every row of W (one output unit) gets its own absmax scale:

    c_x[i] = max_k |X[i, k]|,   X_i8 = round(127 · X / c_x[:, None])     (N, K) int8
    c_w[o] = max_k |W[o, k]|,   W_i8 = round(127 · W / c_w[:, None])     (O, K) int8

so the product dequantizes with one outer product of scales:

    X Wᵀ ≈ (X_i8 W_i8ᵀ) ⊙ (c_x ⊗ c_w) / 127²,   X_i8 W_i8ᵀ accumulated exactly in int32

Mixed-precision decomposition (paper section 3.2)
-------------------------------------------------
From ~6.7B parameters on, a few hidden dimensions carry activations far larger than the rest;
one of them inflates c_x for its whole row and wipes out the precision of every other value.
Input columns holding any |X[i, k]| >= threshold (6.0) are taken out of the int8 product and
multiplied in full precision against the matching (dequantized) weight columns:

    O = {k : max_i |X[i, k]| >= threshold}
    Y = int8 product over k ∉ O  +  X[:, O] · Ŵ[:, O]ᵀ,   Ŵ = W_i8 · c_w[:, None] / 127

As in bitsandbytes, c_x is taken after zeroing just the outlier values, so the other entries
of an outlier column still count toward it; `vectorwise_quantize` then matches
bitsandbytes.functional.int8_vectorwise_quant exactly.
"""
import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def vectorwise_quantize(x: torch.Tensor, threshold: float = 0.0):
    """Row-wise absmax int8 quantization of a 2-D tensor (N, K).

    Returns (x_int8 (N, K) int8, row_absmax (N,) float32, outlier_cols). With threshold > 0,
    outlier_cols is the int64 index of the columns holding a value >= threshold (possibly empty)
    and those columns are zero in x_int8; with threshold == 0 it is None.
    """
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"int8 quantization takes a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"vectorwise_quantize expects a 2-D (rows, features) tensor, got shape {tuple(x.shape)}")
    outlier_cols = None
    if threshold > 0:
        outliers = x.abs() >= threshold  # (N, K)
        outlier_cols = outliers.any(dim=0).nonzero().view(-1)
        x = x.masked_fill(outliers, 0)
    row_absmax = x.abs().amax(dim=1).float()  # (N,)
    # an all-zero row has absmax 0; the clamp keeps its codes at 0 instead of 0 * inf = NaN
    x_int8 = torch.round(x * (127.0 / row_absmax.clamp(min=1e-38))[:, None]).to(torch.int8)
    if outlier_cols is not None:
        x_int8[:, outlier_cols] = 0
    return x_int8, row_absmax, outlier_cols


def vectorwise_dequantize(x_int8: torch.Tensor, row_absmax: torch.Tensor) -> torch.Tensor:
    """x̂ = x_int8 · row_absmax[:, None] / 127, float32."""
    return x_int8.float() * (row_absmax[:, None] / 127.0)


def int8_matmul(a_int8: torch.Tensor, b_int8: torch.Tensor) -> torch.Tensor:
    """a_int8 @ b_int8ᵀ with exact integer accumulation: (N, K) x (O, K) -> (N, O) int32.

    The sum runs in float64, which holds every partial sum exactly (|sum| <= K · 127² < 2^53),
    so BLAS returns the same integers as an int32-accumulating int8 GEMM, much faster on CPUs
    without int8 dot-product instructions.
    """
    return (a_int8.double() @ b_int8.double().t()).to(torch.int32)


def int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, weight_absmax: torch.Tensor,
                bias: torch.Tensor | None = None, threshold: float = 6.0) -> torch.Tensor:
    """LLM.int8() forward y = x Wᵀ + b for x (N, K), W given as (O, K) int8 + (O,) row absmax.

    Returns (N, O) in x.dtype; the int8 product is dequantized and the outliers added in float32.
    """
    x_int8, x_absmax, outlier_cols = vectorwise_quantize(x, threshold)
    accumulator = int8_matmul(x_int8, weight_int8)  # (N, O) int32
    y = accumulator.float() * (x_absmax[:, None] * weight_absmax[None, :]) / (127 * 127)  # (N, O)
    if outlier_cols is not None and outlier_cols.numel():
        outlier_weight = vectorwise_dequantize(weight_int8[:, outlier_cols], weight_absmax)  # (O, |outliers|)
        y += x[:, outlier_cols].float() @ outlier_weight.t()
    if bias is not None:
        y += bias
    return y.to(x.dtype)
