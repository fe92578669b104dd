"""Frozen quantized linear layers (QLoRA's NF4 base layer, LLM.int8()) and whole-model conversion.

    Linear4bit:  y = x Ŵᵀ + b,  Ŵ = dequantize_nf4(W_nf4)   dequantized on every call, in compute_dtype
    Linear8bit:  y = int8_linear(x, W_i8, c_w, b)            LLM.int8() with outlier decomposition

Both keep only the compact quantized weight (buffers, so state_dict works) and a frozen bias, and
are built from an nn.Linear or a GPT-2 style Conv1D (weight stored (in, out), y = x·W + b).
Backward never needs a full-precision weight to be stored: dL/dx = dL/dy · Ŵ is computed with a
freshly dequantized Ŵ (QLoRA's memory saving: only the adapters hold trainable float weights).

backend="bnb" runs the same format through bitsandbytes' kernels (imported only then), which
makes the two implementations interchangeable for testing.
"""
import dataclasses
import math
import threading
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn

from models.fused import linear_product

from .int8 import int8_linear, vectorwise_dequantize, vectorwise_quantize
from .nf4 import (BLOCKSIZE, DYNAMIC_CODE, NESTED_BLOCKSIZE, NF4_CODE, NF4State, check_blocksize,
                  dequantize_nf4, dequantize_scratch_size, quantize_nf4)

BACKENDS = ("ours", "bnb")


def linear_weight(linear: nn.Module) -> torch.Tensor:
    """The (out, in) weight of an nn.Linear or a GPT-2 Conv1D (which stores it as (in, out))."""
    if type(linear).__name__ == "Conv1D":
        return linear.weight.detach().t()
    if isinstance(linear, nn.Linear):
        return linear.weight.detach()
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(linear).__name__}")


_DEQUANTIZE_BUFFERS = threading.local()  # per thread: device -> (float32 Ŵ buffer, int64 index scratch)


def _dequantize_buffers(packed: torch.Tensor):
    """Scratch tensors for one 4-bit weight's Ŵ and its chunk indices, shared by all layers on that device
    in this thread, grown to the largest weight seen.

    Dequantizing every layer into one reused buffer (rather than a fresh tensor per layer, per
    forward and per backward) keeps weight-sized temporaries out of the allocator altogether.
    Safe because a product with Ŵ finishes before the next layer dequantizes (autograd runs one
    node at a time) and Ŵ is never saved for backward; each thread has its own buffers, so models
    run from several threads do not overwrite each other's Ŵ.
    """
    numel, n_index = packed.numel() * 2, dequantize_scratch_size(packed.numel())
    buffers = _DEQUANTIZE_BUFFERS.__dict__.setdefault("by_device", {})
    weight, index = buffers.get(packed.device, (torch.empty(0), torch.empty(0, dtype=torch.int64)))
    if weight.numel() < numel:
        weight = torch.empty(numel, dtype=torch.float32, device=packed.device)
    if index.numel() < n_index:
        index = torch.empty(n_index, dtype=torch.int64, device=packed.device)
    buffers[packed.device] = weight, index
    return weight[:numel], index


class _QuantizedMatmul(torch.autograd.Function):
    """y = layer.matmul(x), with dL/dx = dL/dy · Ŵ from a re-dequantized Ŵ (nothing is saved)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        y = layer.matmul(x)
        # a view cannot leave a custom Function if the caller then adds to it in place (LoRA does)
        return y.clone() if y._is_view() else y

    @staticmethod
    def backward(ctx, grad_y):
        # with create_graph the product is recorded and keeps Ŵ: a fresh tensor then, not the shared buffer
        layer = ctx.layer
        weight = layer.dequantized_weight() if torch.is_grad_enabled() else layer.transient_weight()
        return linear_product(grad_y, weight.to(grad_y.dtype).t()), None


class _QuantizedLinear(nn.Module):
    """Shared plumbing: frozen bias, compute dtype, forward through _QuantizedMatmul."""

    def __init__(self, in_features, out_features, bias, compute_dtype, backend):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
            raise ValueError(f"compute_dtype must be a floating-point dtype, got {compute_dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype, self.backend = compute_dtype, backend
        self.fan_in_fan_out = False  # set by from_weight: the replaced layer stored (in, out)
        # the dtype of the weight last quantized (bitsandbytes' quant_state.dtype): merging dequantizes into it,
        # so after a merge (W + ΔW in float32) unmerging subtracts in float32, as peft's does
        self.source_dtype = compute_dtype
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Module, compute_dtype=torch.float32, **options):
        """Quantize an nn.Linear or Conv1D; options: blocksize, double_quant (4-bit) or threshold
        (8-bit), and backend ("ours" or "bnb")."""
        bias = None if linear.bias is None else linear.bias.detach().clone()
        fan_in_fan_out = type(linear).__name__ == "Conv1D"
        return cls.from_weight(linear_weight(linear), bias, compute_dtype, fan_in_fan_out, **options)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias=None, compute_dtype=torch.float32, fan_in_fan_out=False,
                    **options):
        """Quantize a (out, in) weight (and keep `bias`, if any, in compute_dtype).

        fan_in_fan_out: the layer being replaced stored its weight (in, out) (GPT-2's Conv1D), so
        dequantize_model gives a Conv1D back and the model's checkpoint layout survives the round trip.
        """
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, compute_dtype, **options)
        layer.fan_in_fan_out = fan_in_fan_out
        layer.requantize_(weight)
        if bias is not None:
            layer.bias.data = bias.to(compute_dtype, copy=True)  # never a view of the caller's memory
        return layer

    def _check_weight(self, weight: torch.Tensor) -> None:
        if not weight.is_floating_point():
            raise ValueError(f"cannot quantize a {weight.dtype} weight: it must be floating-point")
        if weight.shape != (self.out_features, self.in_features):
            raise ValueError(f"expected a ({self.out_features}, {self.in_features}) weight, got {tuple(weight.shape)}")
        if not torch.isfinite(weight).all():  # a block or row scale would be NaN / inf and its codes garbage
            raise ValueError("cannot quantize a weight that holds NaN or inf")

    def _apply(self, fn, recurse=True):
        """As nn.Module's, but the float buffers (the quantization constants) keep float32 when the
        model is cast (.to(torch.bfloat16), .half()), as bitsandbytes' quant state does; device moves
        apply to them."""
        constants = {name: b for name, b in self._buffers.items() if b is not None and b.is_floating_point()}
        super()._apply(fn, recurse)
        for name, before in constants.items():
            if self._buffers[name].dtype != before.dtype:
                self._buffers[name] = before.to(self._buffers[name].device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__} takes inputs of {self.in_features} features (the last "
                             f"dimension), got shape {tuple(x.shape)}")
        y = _QuantizedMatmul.apply(x.to(self.compute_dtype), self)  # (..., out)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class Linear4bit(_QuantizedLinear):
    """NF4 weight, blockwise absmax (optionally double-quantized), dequantized per forward.

    Buffers: weight_packed (out·in / 2, 1) uint8; absmax (n_blocks,) float32, or uint8 codes with
    nested_absmax (ceil(n_blocks / 256),) float32 and absmax_offset () float32 when double_quant.
    """

    def __init__(self, in_features, out_features, bias=True, compute_dtype=torch.float32,
                 blocksize=BLOCKSIZE, double_quant=False, backend="ours"):
        super().__init__(in_features, out_features, bias, compute_dtype, backend)
        numel = in_features * out_features
        check_blocksize(numel, blocksize)
        self.blocksize, self.double_quant = blocksize, double_quant
        n_blocks = numel // blocksize
        self.register_buffer("weight_packed", torch.zeros(numel // 2, 1, dtype=torch.uint8))
        self.register_buffer("absmax", torch.zeros(n_blocks, dtype=torch.uint8 if double_quant else torch.float32))
        nested = torch.zeros(math.ceil(n_blocks / NESTED_BLOCKSIZE)) if double_quant else None
        self.register_buffer("nested_absmax", nested)
        self.register_buffer("absmax_offset", torch.zeros(()) if double_quant else None)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by the NF4 quantization of `weight` (out, in)."""
        self._check_weight(weight)
        if self.backend == "bnb":
            packed, state = _bnb_quantize_4bit(weight, self.blocksize, self.double_quant)
        else:
            packed, state = quantize_nf4(weight, self.blocksize, self.double_quant)
        self.weight_packed, self.absmax, self.source_dtype = packed, state.absmax, weight.dtype
        if self.double_quant:
            self.nested_absmax, self.absmax_offset = state.nested_absmax, state.offset

    @property
    def state(self) -> NF4State:
        shape = torch.Size((self.out_features, self.in_features))
        return NF4State(self.absmax, shape, self.compute_dtype, self.blocksize, self.nested_absmax, self.absmax_offset)

    def dequantized_weight(self, dtype=None) -> torch.Tensor:
        """Ŵ (out, in) in `dtype` (default compute_dtype)."""
        state = self.state if dtype is None else dataclasses.replace(self.state, dtype=dtype)
        if self.backend == "bnb":
            return _bnb_dequantize_4bit(self.weight_packed, state)
        return dequantize_nf4(self.weight_packed, state)

    def transient_weight(self) -> torch.Tensor:
        """Ŵ in the buffer all 4-bit layers share: valid until the next layer dequantizes."""
        if self.backend == "bnb":
            return self.dequantized_weight()
        out, scratch = _dequantize_buffers(self.weight_packed)
        return dequantize_nf4(self.weight_packed, self.state, out=out, scratch=scratch)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        return linear_product(x, self.transient_weight())  # no view: _QuantizedMatmul need not copy it

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}, "
                f"backend={self.backend}")


class Linear8bit(_QuantizedLinear):
    """LLM.int8() weight: weight_int8 (out, in) int8 and weight_absmax (out,) float32 row scales."""

    def __init__(self, in_features, out_features, bias=True, compute_dtype=torch.float32,
                 threshold=6.0, backend="ours"):
        super().__init__(in_features, out_features, bias, compute_dtype, backend)
        self.threshold = threshold
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_absmax", torch.zeros(out_features))

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> None:
        """Replace the stored weight by the vector-wise int8 quantization of `weight` (out, in), taken of a
        float16 copy as bitsandbytes' Int8Params takes it (so a float32 weight gives bnb's codes and scales)."""
        self._check_weight(weight)
        half = weight.to(torch.float16).contiguous()
        if not torch.isfinite(half).all():
            raise ValueError("int8 quantization takes a float16 copy of the weight (as bitsandbytes'); this weight "
                             "has values beyond float16's range (65504)")
        if self.backend == "bnb":
            import bitsandbytes.functional as bnb_functional

            self.weight_int8, self.weight_absmax, _ = bnb_functional.int8_vectorwise_quant(half)
        else:
            self.weight_int8, self.weight_absmax, _ = vectorwise_quantize(half)
        self.source_dtype = weight.dtype

    def dequantized_weight(self, dtype=None) -> torch.Tensor:
        """Ŵ = W_i8 · c_w / 127, (out, in) in `dtype` (default compute_dtype)."""
        return vectorwise_dequantize(self.weight_int8, self.weight_absmax).to(dtype or self.compute_dtype)

    transient_weight = dequantized_weight

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        x_2d = x.reshape(-1, self.in_features)
        if self.backend == "bnb":
            y = _bnb_int8_linear(x_2d, self.weight_int8, self.weight_absmax, self.threshold)
        else:
            y = int8_linear(x_2d, self.weight_int8, self.weight_absmax, threshold=self.threshold)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"threshold={self.threshold}, compute_dtype={self.compute_dtype}, backend={self.backend}")


# ---- bitsandbytes backend: same storage format, bitsandbytes' kernels ---------------------------

def _bnb_quantize_4bit(weight, blocksize, double_quant):
    import bitsandbytes.functional as bnb_functional

    packed, qs = bnb_functional.quantize_4bit(weight.contiguous(), blocksize=blocksize, quant_type="nf4",
                                              compress_statistics=double_quant)
    nested_absmax = qs.state2.absmax if double_quant else None
    return packed, NF4State(qs.absmax, weight.shape, weight.dtype, blocksize, nested_absmax, qs.offset)


def _bnb_dequantize_4bit(packed, state):
    import bitsandbytes.functional as bnb_functional

    nested = None
    if state.double_quant:
        nested = bnb_functional.QuantState(absmax=state.nested_absmax, code=DYNAMIC_CODE, blocksize=NESTED_BLOCKSIZE,
                                           dtype=torch.float32)
    # a flat shape: bitsandbytes 0.50.2's AVX512 CPU kernel walks rows and takes the wrong scale for
    # blocks that straddle two rows (in_features not a multiple of the blocksize); the stream is flat
    qs = bnb_functional.QuantState(absmax=state.absmax, shape=(state.shape.numel(),), code=NF4_CODE,
                                   blocksize=state.blocksize, quant_type="nf4", dtype=state.dtype, offset=state.offset,
                                   state2=nested)
    return bnb_functional.dequantize_4bit(packed, qs).view(state.shape)


def _bnb_int8_linear(x, weight_int8, weight_absmax, threshold):
    import bitsandbytes.functional as bnb_functional

    x_int8, x_absmax, outlier_cols = bnb_functional.int8_vectorwise_quant(x.contiguous(), threshold)
    if threshold > 0:
        y, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(x, x_int8, weight_int8, x_absmax, weight_absmax, outlier_cols)
        return y
    return torch.ops.bitsandbytes.int8_scaled_mm(x_int8, weight_int8, x_absmax, weight_absmax, dtype=x.dtype)


# ---- whole models ----------------------------------------------------------------------------

HEADS = ("lm_head", "score", "classifier", "pre_classifier", "pooler")  # kept in full precision
FORMATS = {"nf4": (Linear4bit, {}), "nf4-dq": (Linear4bit, {"double_quant": True}), "int8": (Linear8bit, {})}


def is_linear(module: nn.Module) -> bool:
    """An nn.Linear or Conv1D that computes its own product: not nn.MultiheadAttention's out_proj, whose
    weight the attention module reads directly."""
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return False
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def is_skipped(name: str, skip=HEADS) -> bool:
    """Whether an entry of `skip` is a dotted part of `name` ("classifier" matches "classifier.out_proj")."""
    return any(f".{s}." in f".{name}." for s in skip)


def quantize_model(model: nn.Module, bits: int = 4, skip=HEADS, **config) -> nn.Module:
    """Replace every nn.Linear / Conv1D by Linear4bit (bits=4) or Linear8bit (bits=8), in place.

    A module is skipped when an entry of `skip` is a dotted part of its name ("classifier"
    matches "classifier" and "classifier.out_proj"): task heads stay full precision. LoRA factors
    (lora_A, lora_B) always are; the base layer under them is quantized.
    `config` goes to from_linear (compute_dtype, blocksize, double_quant, threshold, backend).
    """
    layer_cls = {4: Linear4bit, 8: Linear8bit}.get(bits)
    if layer_cls is None:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    quantized = [name for name, m in model.named_modules() if isinstance(m, _QuantizedLinear)]
    if quantized:
        raise ValueError(f"the model is already quantized ({len(quantized)} layers, e.g. {quantized[0]}); "
                         "dequantize_model first to quantize it another way")
    replacements = []  # all layers are quantized before any is replaced: an error leaves the model as it was
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if is_linear(child) and not is_skipped(name, (*skip, "lora_A", "lora_B")):
                try:
                    replacements.append((parent, child_name, layer_cls.from_linear(child, **config)))
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
    for parent, child_name, layer in replacements:
        setattr(parent, child_name, layer)
    return model


@torch.no_grad()
def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by a full-precision one holding Ŵ, in place (the inverse of
    quantize_model up to quantization error): nn.Linear, or Conv1D where the original was one.

    With LoRA on top, `dequantize_model` then `merge_and_unload` merges into a full-precision copy,
    W = Ŵ + ΔW exactly, instead of requantizing Ŵ + ΔW (which rounds it): the way to export a
    QLoRA fine-tune as a plain checkpoint.
    """
    from models.gpt2 import Conv1D  # imported here: models depends on quant, not the reverse

    for name, layer in list(model.named_modules()):
        if not isinstance(layer, _QuantizedLinear):
            continue
        # in the dtype the weight had (bitsandbytes' quant_state.dtype, which transformers' dequantize keeps)
        weight = layer.dequantized_weight(layer.source_dtype)  # (out, in)
        if layer.fan_in_fan_out:
            full = Conv1D(layer.in_features, layer.out_features).to(weight.dtype)
            full.weight.copy_(weight.t())
            full.bias.copy_(layer.bias)  # GPT-2's Conv1D always has a bias
        else:
            full = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=weight.dtype)
            full.weight.copy_(weight)
            if layer.bias is not None:
                full.bias.copy_(layer.bias)
        model.set_submodule(name, full.requires_grad_(False).to(weight.device))
    return model


def model_bytes(model: nn.Module) -> dict:
    """Bytes held by the model: quantized weights, their scales, and everything else."""
    quantized = {name for name, m in model.named_modules() if isinstance(m, _QuantizedLinear)}
    sizes = {"quantized_weights": 0, "quant_constants": 0, "other_params": 0}
    for name, tensor in chain(model.named_parameters(), model.named_buffers()):
        owner, _, attr = name.rpartition(".")
        if owner not in quantized or attr == "bias":
            kind = "other_params"
        else:
            kind = "quantized_weights" if attr in ("weight_packed", "weight_int8") else "quant_constants"
        sizes[kind] += tensor.numel() * tensor.element_size()
    sizes["total"] = sum(sizes.values())
    return sizes
