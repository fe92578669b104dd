"""Training hot spots with hand-written backward passes: the same math as the composite PyTorch
expressions, in fewer passes over memory and without their largest temporaries.

Autograd differentiates a composite expression op by op, keeping every intermediate and running
one backward kernel per op. For the few expressions that dominate a LoRA step besides the matrix
products, the derivative written out by hand needs far fewer passes.

RMSNorm (Zhang & Sennrich 2019, arXiv:1910.07467)
--------------------------------------------------
    y = w · x̂,  x̂ = x · r,  r = (mean(x²) + eps)^(-1/2)                   (per row of C values)
    dL/dx = r · (g' - x̂ · mean(g' · x̂)),  g' = w · dL/dy                  dL/dw = Σ_rows dL/dy · x̂
The forward is computed exactly as transformers does (fp32 statistics), so logits are unchanged.

Rotary position embedding (Su et al. 2021, arXiv:2104.09864), transformers' half-split layout
-------------------------------------------------------------------------------------------
    y = x · cos + rotate_half(x) · sin,  rotate_half([x1, x2]) = [-x2, x1]
    dL/dx = g · cos + rotate_halfᵀ(g · sin),  rotate_halfᵀ([g1, g2]) = [g2, -g1]
(cos and sin repeat their first half, so both halves use the same angles.)

Linear + cross-entropy, chunked (the idea of Liger Kernel, Hsu et al. 2024, arXiv:2410.10989)
-----------------------------------------------------------------------------------------
    z = h Wᵀ + b,  loss = Σ_i (logsumexp(z_i) - z_i[t_i]),  dloss/dz_i = softmax(z_i) - onehot(t_i)
The (n, vocab) logits are the largest activation of a small LM (201 MB for 1024 tokens of
SmolLM2) and autograd writes several tensors of that size. Here the rows go through in chunks; each
chunk's logits become its gradient in place, dloss/dh = (dloss/dz) W (and dloss/dW = (dloss/dz)ᵀ h
when W trains) is accumulated right away, and backward only scales it by the incoming gradient.
No logits tensor outlives its chunk, and the product that recomputing them would cost is avoided.

Frozen linear layers on oneDNN
------------------------------
    y = x Wᵀ + b,  dL/dx = dL/dy W                          (W and b frozen: no dL/dW, no dL/db)
torch computes a float32 product on CPU with MKL's sgemm. oneDNN's matmul, the primitive that
torch.compile emits for CPU linear layers (torch.ops.mkldnn._linear_pointwise), computes the same
float32 product in another summation order, and on this machine (AMD EPYC, 2 threads) it was
1.02-1.80 x faster for every product of a MiniLM or SmolLM2 LoRA step and of generation, forward
x Wᵀ and backward dL/dy W (bench/bench_gemm.py; a LoRA step 1.16-1.23 x faster in all). `Linear`
takes it whenever nothing about the product trains (the base model under LoRA or QLoRA, and every
layer without gradients); a weight that trains, autocast, other dtypes and devices go through
F.linear as before.

Dropout from 16-bit random lanes (Srivastava et al. 2014)
----------------------------------------------------------
    y = x · m / (1 - p),  m_j ~ Bernoulli(1 - p)
torch's CPU Bernoulli sampler costs ~10 ns per element (a quarter of a MiniLM training step). Here each
element gets a uniform 16-bit lane u and m = (u >= round(p · 65536)): p is rounded to a multiple of
1/65536 (0.1 becomes 0.100006). The lanes come from models/dropout.c where pip install built it: a
counter-based hash of the element's index keyed by one 64-bit draw of torch's generator, computed in the
same vectorised pass that writes m and y (and backward's dL/dy · m / (1 - p)), split between torch's OpenMP
threads. Without the library they are four 16-bit lanes of each 64-bit draw of torch's generator, in PyTorch ops;
the masks differ between the two, the probabilities do not. Either way the generator is torch's, so seeding and
checkpointed RNG state work as before. The mask is uint8, not bool: torch's CPU kernels write and read bool
without vectorising. A MiniLM step's dropout went from about 55 ms (torch's sampler) to 21-38 ms (the PyTorch
lanes), together with adding padding masks to attention scores as 0 / -inf instead of masked_fill_ with a
broadcast bool mask; in C on one thread a step cost 11-25 ms more than with dropout off, on torch's two threads
about 5 ms more (bench/bench_lora.py's row with the base's dropout off). Forward and backward through autograd
(bench/bench_dropout.py, 2026-12-04): an attention mask (32 x 12 x 64 x 64) 1.64 ms on torch's two threads, 2.10
on one, 4.88 on the PyTorch lanes, 16.3 with F.dropout; a hidden state (32 x 64 x 384) 0.92, 1.15, 2.50 and 8.44.
"""
import ctypes
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .native import load_library


# ---- RMSNorm ------------------------------------------------------------------------------------

class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        ctx.eps = eps
        return weight * (x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        x32 = x.float()
        if torch.is_grad_enabled():  # create_graph: r as a function of x, so a second derivative sees it
            rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + ctx.eps)
        grad_normed = (grad_y * weight).float()  # g' = dL/dx̂
        # r · (g' - x̂ · mean(g' · x̂)) = g' · r - x · (r³ · mean(g' · x))
        coef = torch.linalg.vecdot(grad_normed, x32).unsqueeze(-1).mul_(rstd.pow(3)).div_(x.shape[-1])
        grad_x = torch.addcmul(grad_normed * rstd, x32, coef, value=-1).to(x.dtype)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad_y * (x32 * rstd).to(x.dtype)).reshape(-1, x.shape[-1]).sum(0)
        return grad_x, grad_w, None


def rms_norm(x, weight, eps):
    """weight · x / sqrt(mean(x²) + eps) over the last dimension, statistics in fp32."""
    return _RMSNorm.apply(x, weight, eps)


# ---- rotary position embedding ------------------------------------------------------------------

class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        half = x.shape[-1] // 2
        y = x * cos
        # products rounded before the sum, as transformers' expression does (addcmul_ may fuse them)
        y[..., :half] -= x[..., half:] * sin[..., :half]  # x1·cos - x2·sin
        y[..., half:] += x[..., :half] * sin[..., half:]  # x2·cos + x1·sin
        return y

    @staticmethod
    def backward(ctx, grad_y):
        cos, sin = ctx.saved_tensors
        half = grad_y.shape[-1] // 2
        grad_x = grad_y * cos
        grad_x[..., :half].addcmul_(grad_y[..., half:], sin[..., half:])
        grad_x[..., half:].addcmul_(grad_y[..., :half], sin[..., :half], value=-1)
        return grad_x, None, None


def rope(x, cos, sin):
    """x · cos + rotate_half(x) · sin; cos, sin broadcast against x (..., T, hs) and are constants."""
    return _Rope.apply(x, cos, sin)


# ---- frozen linear layers on oneDNN --------------------------------------------------------------

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# oneDNN keeps every primitive it creates, one per product shape, in a cache of 1024 by default, and
# the cached primitives hold memory: with a batch length that changes every step, 112 MiniLM LoRA
# steps peaked at 2.19 GB against 1.13 GB with torch's products (bench/bench_gemm.py). One step needs
# 12 (SmolLM2) to 16 (MiniLM), each layer shape forward and backward; a cap of 24 peaked at 1.33 GB.
# oneDNN reads this when it creates its first primitive; a value the user set stays.
PRIMITIVE_CACHE_CAPACITY = 24
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(PRIMITIVE_CACHE_CAPACITY))


def linear_product(x, weight, bias=None):
    """x Wᵀ + b for x (..., in), weight (out, in) (any strides): oneDNN for float32 on CPU (see the module
    docstring), else F.linear. The result is no view (as F.linear's), so adding to it in place (LoRA
    does) needs no copy back in backward. oneDNN's product has no derivative, so it is only taken where
    autograd records nothing: inside a Function's forward, or a backward without create_graph (a
    second-order gradient through a frozen layer then goes through F.linear)."""
    recorded = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if recorded or not (_ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32):
        return F.linear(x, weight, bias)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")  # (n, out)
    return y if x.dim() == 2 else torch.ops.aten._unsafe_view(y, (*x.shape[:-1], weight.shape[0]))


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):  # x (..., in)
        ctx.save_for_backward(weight)
        return linear_product(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):  # (..., out)
        (weight,) = ctx.saved_tensors
        return linear_product(grad_y, weight.t()), None, None


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias), through `linear_product` unless the weight or bias trains or autocast is on."""
    trains = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    if trains or torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenLinear.apply(x, weight, bias)
    return linear_product(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters) whose forward is `linear` above."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


# ---- linear + cross-entropy ---------------------------------------------------------------------

# Rows of logits per chunk: 256 x a 49152-token vocabulary is 50 MB, within this CPU's L3 cache;
# fewer rows re-read W more often (W is read twice per chunk), more make the chunk spill to memory.
CROSS_ENTROPY_ROWS = 256


def _chunk_loss_(logits, targets):
    """Sum of -log softmax(logits)[targets]; turns `logits` (m, V) into softmax(logits) in place."""
    target_logits = logits.gather(1, targets[:, None])  # (m, 1)
    row_max = logits.amax(1, keepdim=True)  # (m, 1)
    sums = logits.sub_(row_max).exp_().sum(1, keepdim=True)  # logits now hold exp(z - max)
    loss = (sums.log() + row_max - target_logits).sum()
    logits.div_(sums)
    return loss


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        grad_b = torch.zeros_like(bias) if need_b else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, n, CROSS_ENTROPY_ROWS):
            h = hidden[start:start + CROSS_ENTROPY_ROWS]  # (m, C)
            t = targets[start:start + CROSS_ENTROPY_ROWS]
            logits = linear_product(h, weight, bias).float()  # (m, V); autograd is off in forward
            total += _chunk_loss_(logits, t)
            if not (need_h or need_w or need_b):
                continue
            logits[torch.arange(len(t), device=t.device), t] -= 1  # softmax - onehot = dloss/dz
            grad_z = logits if hidden.dtype == torch.float32 else logits.to(hidden.dtype)
            if need_h:
                grad_h[start:start + CROSS_ENTROPY_ROWS] = linear_product(grad_z, weight.t())
            if need_w:
                grad_w.addmm_(grad_z.t(), h)
            if need_b:
                grad_b += grad_z.sum(0)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.needs = (need_h, need_w, need_b)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        if torch.is_grad_enabled():
            raise RuntimeError("the chunked linear + cross-entropy computes its gradients in forward; they have no "
                               "derivative of their own, so create_graph=True (second-order gradients) is not supported")
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_total if need else None for need in ctx.needs]
        return (*grads, None)


def linear_cross_entropy(hidden, weight, bias, targets):
    """Σ_i -log softmax(hidden_i Wᵀ + b)[targets_i] without materialising the (n, vocab) logits.

    hidden (n, C), weight (V, C), bias (V,) or None, targets (n,) int64; the logits are fp32.
    """
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets)


def lm_loss(lm_head, hidden, targets):
    """Summed next-token NLL of `hidden` (n, C) through `lm_head` (fused when it is a plain nn.Linear)."""
    if type(lm_head) in (nn.Linear, Linear):
        return linear_cross_entropy(hidden, lm_head.weight, lm_head.bias, targets)
    return F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")  # an adapter or trained copy


# ---- dropout ------------------------------------------------------------------------------------

_DROPOUT = load_library("models._dropout")  # models/dropout.c, None where pip install had no C compiler
if _DROPOUT is not None:
    _i64, _u32, _ptr = ctypes.c_int64, ctypes.c_uint32, ctypes.c_void_p
    _DROPOUT.dropout_keep_mask.argtypes = [_ptr, _i64, _u32, _u32, _u32]
    _DROPOUT.dropout_forward.argtypes = [_ptr, _ptr, _ptr, _i64, _u32, _u32, _u32, ctypes.c_float]
    _DROPOUT.dropout_backward.argtypes = [_ptr, _ptr, _ptr, _i64, ctypes.c_float]
    for _function in (_DROPOUT.dropout_keep_mask, _DROPOUT.dropout_forward, _DROPOUT.dropout_backward):
        _function.restype = None
# The loops run on torch's OpenMP threads (models/native.py). A Python helper thread per dropout was faster alone
# but made a MiniLM LoRA step slower (1.17 vs 1.12 x the floor): it competed for the two cores with torch's threads,
# which spin for a while after each parallel op; torch's own threads are the ones that spin.


def native_dropout(x: torch.Tensor) -> bool:
    """Whether models/dropout.c takes x: built, and x a float32 CPU tensor."""
    return _DROPOUT is not None and x.device.type == "cpu" and x.dtype == torch.float32


def _mask_key():
    """The key of a counter-based mask: one 64-bit draw from torch's generator, as two 32-bit halves."""
    draw = torch.empty((), dtype=torch.int64).random_(-2**63, None).item()
    return draw & 0xFFFFFFFF, (draw >> 32) & 0xFFFFFFFF


def keep_mask(shape, p, device=None):
    """uint8 mask, each entry 1 with probability 1 - round(p · 65536) / 65536, else 0: the mask `dropout` draws
    from the same generator state.

    models/dropout.c's counter-based hash where it was built; elsewhere 16-bit lanes of torch's generator.
    uint8 rather than bool: torch's CPU kernels write and read bool tensors without vectorising
    (measured here on 786432 entries: the comparison into bool 200 us, into uint8 37 us; torch.where
    on the bool mask 640 us, multiplying the uint8 one 70 us).
    """
    keep = torch.empty(shape, dtype=torch.uint8, device=device)
    threshold = round(p * 65536)
    if _DROPOUT is not None and torch.device(device or "cpu").type == "cpu":
        key0, key1 = _mask_key()
        _DROPOUT.dropout_keep_mask(keep.data_ptr(), keep.numel(), key0, key1, threshold)
        return keep
    n = keep.numel()
    lanes = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None)  # 64 random bits
    return torch.ge(lanes.view(torch.int16)[:n].view(shape), threshold - 32768, out=keep)  # int16 lanes are uniform


class _Dropout(torch.autograd.Function):
    """y = x · m / (1 - p). The C path saves the uint8 mask m; the PyTorch path saves m / (1 - p) in x's dtype,
    which makes its backward one multiply (saving m instead made its forward + backward 1.2 x slower)."""

    @staticmethod
    def forward(ctx, x, p):
        ctx.scale, ctx.native = 1.0 / (1.0 - p), native_dropout(x)
        if not ctx.native:
            scale = keep_mask(x.shape, p, x.device).to(x.dtype).mul_(ctx.scale)  # m / (1 - p)
            ctx.save_for_backward(scale)
            return x * scale
        x = x.contiguous()
        y, keep = torch.empty_like(x), torch.empty(x.shape, dtype=torch.uint8)
        (key0, key1), threshold = _mask_key(), round(p * 65536)
        _DROPOUT.dropout_forward(x.data_ptr(), y.data_ptr(), keep.data_ptr(), x.numel(), key0, key1, threshold, ctx.scale)
        ctx.save_for_backward(keep)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (saved,) = ctx.saved_tensors
        if not ctx.native:
            return grad_y * saved, None
        if torch.is_grad_enabled() or not native_dropout(grad_y):  # create_graph: a product autograd can follow
            return grad_y * saved.to(grad_y.dtype).mul_(ctx.scale), None
        grad_y = grad_y.contiguous()
        grad_x = torch.empty_like(grad_y)
        _DROPOUT.dropout_backward(grad_y.data_ptr(), saved.data_ptr(), grad_x.data_ptr(), grad_y.numel(), ctx.scale)
        return grad_x, None


def dropout(x, p, training=True):
    """F.dropout with the mask drawn from 16-bit random lanes (see the module docstring)."""
    if not training or p == 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    return _Dropout.apply(x, p)


def attention_with_dropout(q, k, v, mask, causal, p, scale=None):
    """dropout(softmax(q kᵀ · scale + mask)) v for q (B, nh, Tq, hs), k, v (B, n_kv, Tk, hs); scale 1 / sqrt(hs)
    unless given.

    mask: boolean, broadcast against (B, nh, Tq, Tk), True = may attend; causal: lower-triangular.
    """
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each kv head serves n_head / n_kv heads
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    scores = (q @ k.transpose(-2, -1)).mul_(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)  # (B, nh, Tq, Tk)
    if causal:
        mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril_(scores.shape[-1] - scores.shape[-2])
    if mask is not None:  # added as 0 / -inf: masked_fill_ on the full scores reads a broadcast bool mask 10 x slower
        scores.add_(torch.zeros(mask.shape, dtype=scores.dtype, device=q.device).masked_fill_(~mask, float("-inf")))
    return dropout(scores.softmax(-1), p) @ v


class Dropout(nn.Dropout):
    """nn.Dropout (same module, same p) whose mask comes from `dropout` above."""

    def forward(self, x):
        return dropout(x, self.p, self.training)
