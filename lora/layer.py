"""LoRA and DoRA adapters around a frozen linear layer.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685)
--------------------------------------------------------------------------------------------
Fine-tuning changes a pretrained weight W (out_dim x in_dim) into W + ΔW. LoRA's bet is that
ΔW has low intrinsic rank, so it is trained in factored form:

    ΔW = scale * B @ A,   A: (rank, in_dim),  B: (out_dim, rank),  rank << min(in_dim, out_dim)
    y  = x @ (W + ΔW)^T + b = base(x) + scale * B(A(dropout(x)))

Only A and B are trained: rank * (in_dim + out_dim) parameters instead of in_dim * out_dim.
A starts Kaiming-uniform (a = sqrt(5), nn.Linear's default) and B starts at zero, so ΔW = 0 and
step 0 is exactly the pretrained model, while dL/dB = scale * (dL/dy) (A x)^T is non-zero, so
training moves away from it at once. (Were A zero as well, neither factor would get a gradient.)
`init="gaussian"` draws A ~ N(0, std = 1/rank) instead, as peft's `init_lora_weights="gaussian"`.

scale = alpha / rank keeps the update size roughly fixed when rank changes, so alpha need not be
re-tuned. rsLoRA (Kalajdzievski 2023, arXiv:2312.03732) shows that with alpha / rank the
update vanishes as rank grows (learning stalls at large rank); alpha / sqrt(rank) is the scaling
that keeps it stable, hence `use_rslora=True`.

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353)
--------------------------------------------------------------------------------------
DoRA splits the weight into a magnitude and a direction, per output row (the paper's
"column-wise" norm, taken over in_dim in the (out, in) layout):

    W' = m * (W + ΔW) / ||W + ΔW||,   m: (out_dim,) trainable, initialised to ||W|| (ΔW = 0)

LoRA then only adapts the direction, m the length. Writing f = m / ||W + ΔW|| (one number per
output), and treating the norm as a constant as the paper suggests (section 4.3, saves memory):

    y = f * (W + ΔW) x + b = base(x) + (f - 1) * W x + f * scale * B(A(x))

With dropout active (training, p > 0) the last two terms see dropout(x), as in peft.

Merging
-------
A merged layer folds the adapter into the base weight so inference costs nothing extra:
LoRA W <- W + ΔW, DoRA W <- f * (W + ΔW). Unmerge inverts it: W <- W - ΔW, W <- W / f - ΔW.
Adapters merge one after another; DoRA's norm always uses the unmerged W (as in forward).

State-dict layout (identical to peft 0.21.2's in-memory layout)
-----------------------------------------------------------------
    base_layer.weight, base_layer.bias       the wrapped module (nn.Linear / GPT-2 Conv1D / quantized)
    lora_A.<name>.weight        (rank, in_dim)
    lora_B.<name>.weight        (out_dim, rank)
    lora_magnitude_vector.<name>.weight      (out_dim,)   DoRA only
peft's saved adapter files (adapter_model.safetensors) drop the adapter name and, for the
magnitude, the trailing ".weight" (X = module path, saved with peft's "base_model.model." prefix):
    "X.lora_A.<name>.weight" <-> "X.lora_A.weight"    (likewise lora_B)
    "X.lora_magnitude_vector.<name>.weight" <-> "X.lora_magnitude_vector"
"""

import math
import warnings
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from models.fused import Dropout, Linear, linear_product


class DoRAMagnitude(nn.Module):
    """Holds DoRA's magnitude m as `weight`, the module layout peft's state dicts expect."""

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def is_linear_base(module: nn.Module) -> bool:
    """Whether LoRALinear can wrap `module`: nn.Linear, GPT-2's Conv1D or a quantized linear."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D" or hasattr(module, "dequantized_weight")


class LoRALinear(nn.Module):
    """A frozen linear layer plus named LoRA/DoRA adapters; `active_adapters` are applied in forward.

    The base may be nn.Linear, GPT-2's Conv1D (weight stored (in, out), i.e. peft's
    fan_in_fan_out=True) or a quantized linear exposing `dequantized_weight()` -> (out, in),
    `bias`, `in_features`, `out_features` and, for merging, `requantize_(weight)`.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        if not is_linear_base(base_layer):
            raise TypeError(f"LoRALinear wraps nn.Linear, GPT-2's Conv1D or a quantized linear, got "
                            f"{type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.out_features, self.in_features = self._base_weight().shape
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self._dora_merge_factor: dict[str, torch.Tensor] = {}  # f used at merge time, for unmerge

    @property
    def fan_in_fan_out(self) -> bool:
        """Whether the base stores its weight (in, out), as GPT-2's Conv1D (peft's fan_in_fan_out)."""
        return type(self.base_layer).__name__ == "Conv1D"

    # ---- adapter management -------------------------------------------------------------------

    @torch.no_grad()
    def add_adapter(self, name: str, rank: int, alpha: float, dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False, init: str = "kaiming") -> None:
        """Add a fresh adapter (B = 0, so the output is unchanged); the first one added becomes active."""
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists")
        if init not in ("kaiming", "gaussian"):
            raise ValueError(f"init must be 'kaiming' or 'gaussian', got {init!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        weight = self._unmerged_weight(self._base_weight())  # (out, in)
        # fp32 factors also on a bf16/fp16 base (peft's autocast_adapter_dtype): AdamW's small updates
        # would round away in bf16.
        factory = dict(device=weight.device, dtype=torch.promote_types(weight.dtype, torch.float32))
        # Same creation order as peft (A, then B, then re-init A) so a seeded RNG gives peft's A.
        self.lora_A[name] = nn.Linear(self.in_features, rank, bias=False, **factory)
        self.lora_B[name] = nn.Linear(rank, self.out_features, bias=False, **factory)
        A = self.lora_A[name].weight
        if init == "kaiming":
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        else:
            nn.init.normal_(A, std=1 / rank)
        A.copy_(A.to(weight.dtype))  # peft's A went through the base's dtype once, so ours too
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r[name], self.lora_alpha[name] = rank, alpha
        self.scaling[name] = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        if use_dora:  # ||W|| in the base's dtype, as peft
            magnitude = torch.linalg.norm(weight + self._delta_weight(name).to(weight.dtype), dim=1)  # (out,)
            self.lora_magnitude_vector[name] = DoRAMagnitude(magnitude.to(factory["dtype"]))
        self.set_adapter(self.active_adapters or [name])  # also freezes the new one if inactive

    def set_adapter(self, names: str | list[str]) -> None:
        """Make `names` the active adapter(s); only active adapters are trainable (as in peft)."""
        names = [names] if isinstance(names, str) else list(names)
        for name in names:
            self._check_exists(name)
        for modules in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            for name, module in modules.items():
                module.requires_grad_(name in names)
        self.active_adapters = names

    def delete_adapter(self, name: str) -> None:
        self._check_exists(name)
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged; call unmerge() before deleting it")
        for modules in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in modules:
                del modules[name]
        for table in (self.r, self.lora_alpha, self.scaling):
            del table[name]
        self.active_adapters = [n for n in self.active_adapters if n != name]

    @contextmanager
    def disable_adapters(self):
        """Run the base layer alone (flag `disabled`); a merged layer is unmerged first."""
        previous, self.disabled = self.disabled, True
        try:
            yield self
        finally:
            self.disabled = previous

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        if self.disabled and self.merged:
            self.unmerge()
        if self.disabled or self.merged:
            return self.base_layer(x)
        shape = (*x.shape[:-1], self.out_features)
        # in 2-D, so the base output is a tensor of its own, not a view: adding the adapter into a
        # view in place would make autograd copy the whole output back in backward (CopySlices)
        x = x.reshape(-1, self.in_features)  # (N, in)
        if self._one_lora_on_frozen_weight(x):
            name, base = self.active_adapters[0], self.base_layer
            dropout = self.lora_dropout[name]
            x_lora = dropout(x) if self.training and isinstance(dropout, nn.Dropout) else None
            return _FrozenLinearWithLoRA.apply(x, x_lora, self._base_weight(), base.bias, self.lora_A[name].weight,
                                               self.lora_B[name].weight, self.scaling[name]).view(shape)
        result = self.base_layer(x)  # (N, out)
        result_dtype, quantized = result.dtype, hasattr(self.base_layer, "dequantized_weight")
        for name in self.active_adapters:
            A, B = self.lora_A[name].weight, self.lora_B[name].weight
            scale, dropout = self.scaling[name], self.lora_dropout[name]
            use_dropout = self.training and isinstance(dropout, nn.Dropout)
            x_lora = x.to(A.dtype)  # before dropout, as peft: its 1 / (1 - p) scale is not rounded to bf16
            x_lora = dropout(x_lora) if use_dropout else x_lora
            h = F.linear(x_lora, A)  # (N, rank); under autocast in its dtype
            if name not in self.lora_magnitude_vector:
                if h.dtype != result.dtype:  # fp32 factors on a bf16 base: add in fp32 and round once, as peft's
                    term = scale * F.linear(h, B)  # layers; its bitsandbytes layers round the term, then add
                    result = result + (term.to(result.dtype) if quantized else term)
                    continue
                # result += scale * h @ B^T as one fused in-place GEMM; linear's backward never needs
                # its own output, so modifying it in place is safe for autograd.
                result.addmm_(h, B.t().to(result.dtype), alpha=scale)
                continue
            weight = self._base_weight()  # (out, in)
            with torch.no_grad():  # the norm is a constant for backprop (DoRA section 4.3)
                weight_norm = torch.linalg.norm(weight + scale * (B @ A), dim=1)  # (out,)
            f = self.lora_magnitude_vector[name].weight / weight_norm  # (out,)
            if use_dropout:
                base_no_bias = F.linear(x_lora, weight.to(x_lora.dtype))  # peft's DoRA: in the factors' dtype
            else:  # reuse the running result (peft does the same with several active adapters)
                bias = self.base_layer.bias
                base_no_bias = result if bias is None else result - bias
            result = result + (f - 1) * base_no_bias + f * scale * F.linear(h, B)
        return result.to(result_dtype).view(shape)

    def _one_lora_on_frozen_weight(self, x: torch.Tensor) -> bool:
        """Whether forward may take _FrozenLinearWithLoRA: training one plain LoRA adapter on a frozen,
        unquantized weight of x's dtype, autocast off."""
        if len(self.active_adapters) != 1 or self.lora_magnitude_vector or not torch.is_grad_enabled():
            return False
        base, A = self.base_layer, self.lora_A[self.active_adapters[0]].weight
        if not (type(base) in (nn.Linear, Linear) or self.fan_in_fan_out):  # quantized, or a forward of its own
            return False
        frozen = not (base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad))
        return frozen and x.dtype == base.weight.dtype == A.dtype and not torch.is_autocast_enabled(x.device.type)

    # ---- merging ---------------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @torch.no_grad()
    def merge(self, adapter_names: list[str] | None = None, safe: bool = False) -> None:
        """Fold adapters (default: the active ones) into the base weight; forward is then base(x).

        The merged weight is always built out of place and written once, so with `safe=True` a
        non-finite result raises ValueError and leaves the layer untouched.
        """
        names = self.active_adapters if adapter_names is None else adapter_names
        names = [n for n in names if n not in self.merged_adapters]
        for name in names:
            self._check_exists(name)
        if not names:
            return
        if len(names) > 1 and hasattr(self.base_layer, "requantize_"):  # peft requantizes after each adapter
            for name in names:
                self.merge([name], safe)
            return
        weight = self._weight_to_merge()  # (out, in), may already hold merged adapters
        unmerged_weight = self._unmerged_weight(weight)
        factors = {}
        for name in names:
            delta = self._delta_weight(name)
            weight = weight + delta
            if name in self.lora_magnitude_vector:
                magnitude = self.lora_magnitude_vector[name].weight
                factors[name] = (magnitude / torch.linalg.norm(unmerged_weight + delta, dim=1)).unsqueeze(1)
                weight = factors[name] * weight
        if safe and not torch.isfinite(weight).all():
            raise ValueError(f"merging adapters {names} gives NaN/inf weights; the layer was left unchanged")
        self._set_base_weight(weight)
        self._dora_merge_factor.update(factors)
        self.merged_adapters += names

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take all merged adapters back out of the base weight."""
        if self.merged:
            self._set_base_weight(self._unmerged_weight(self._weight_to_merge()))
            self.merged_adapters.clear()
            self._dora_merge_factor.clear()

    # ---- helpers ---------------------------------------------------------------------------------

    def _delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = scale * B @ A, shape (out, in)."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def _unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Undo the merged adapters on `weight`, newest first."""
        for name in reversed(self.merged_adapters):
            if name in self._dora_merge_factor:
                weight = weight / self._dora_merge_factor[name]
            weight = weight - self._delta_weight(name)
        return weight

    def _base_weight(self) -> torch.Tensor:
        """The base weight as (out, in), whatever the base layer's storage."""
        base = self.base_layer
        if hasattr(base, "dequantized_weight"):
            return base.dequantized_weight()
        return base.weight.t() if self.fan_in_fan_out else base.weight

    def _weight_to_merge(self) -> torch.Tensor:
        """The base weight (out, in) that merging adds ΔW to: a quantized one dequantized into the dtype it was
        quantized from (bitsandbytes' quant_state.dtype; float32 once W + ΔW has been requantized), as peft's."""
        base = self.base_layer
        return base.dequantized_weight(base.source_dtype) if hasattr(base, "source_dtype") else self._base_weight()

    def _set_base_weight(self, weight: torch.Tensor) -> None:  # weight: (out, in)
        base = self.base_layer
        if hasattr(base, "dequantized_weight"):
            if not hasattr(base, "requantize_"):
                raise NotImplementedError(f"{type(base).__name__} has no requantize_(weight); cannot merge into it")
            warnings.warn("merging into a quantized base layer: W + ΔW is requantized, which rounds it; "
                          "outputs will differ slightly from the unmerged model", UserWarning, stacklevel=3)
            base.requantize_(weight)
        else:
            base.weight.data.copy_(weight.t() if self.fan_in_fan_out else weight)

    def _check_exists(self, name: str) -> None:
        if name not in self.lora_A:
            raise ValueError(f"no adapter named {name!r}; have {list(self.lora_A)}")

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}, merged={self.merged_adapters}, scaling={self.scaling}"


class _FrozenLinearWithLoRA(torch.autograd.Function):
    """y = x Wᵀ + b + s · h Bᵀ,  h = x' Aᵀ,  x' = dropout(x) (x_lora) or x itself (x_lora None);
    W and b frozen. The backward, written out:

        g = s · dL/dy B (N, r);   dL/dB = s · dL/dyᵀ h;   dL/dA = gᵀ x';   dL/dx = dL/dy W (+ g A when x' = x)

    Autograd would compute the same products, but as torch's matmuls, which are slow for a rank-r side
    (dL/dy B took 590 us against 185 through oneDNN for a MiniLM layer, 2048 x 384 x 8), and g A is
    added into dL/dx in place instead of into a tensor of its own.
    """

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, A, B, scale):  # x, x_lora (N, in); weight (out, in)
        lora_in = x if x_lora is None else x_lora
        y = linear_product(x, weight, bias)  # (N, out)
        h = linear_product(lora_in, A)  # (N, r)
        y.addmm_(h, B.t(), alpha=scale)
        ctx.save_for_backward(lora_in, h, weight, A, B)
        ctx.scale, ctx.separate_lora_input = scale, x_lora is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):  # (N, out)
        lora_in, h, weight, A, B = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: h as a function of x' and A, so a second derivative sees it
            h = linear_product(lora_in, A)
        need_x, need_x_lora, _, _, need_A, need_B, _ = ctx.needs_input_grad
        g = linear_product(grad_y, B.t()).mul_(ctx.scale)  # (N, r)
        grad_B = linear_product(h.t(), grad_y.t()).mul_(ctx.scale).t() if need_B else None  # (out, r)
        grad_A = linear_product(g.t(), lora_in.t()) if need_A else None  # (r, in)
        grad_x = linear_product(grad_y, weight.t()) if need_x else None  # (N, in)
        grad_x_lora = None
        if ctx.separate_lora_input:
            grad_x_lora = g @ A if need_x_lora else None
        elif need_x:
            grad_x.addmm_(g, A)
        return grad_x, grad_x_lora, None, None, grad_A, grad_B, None
