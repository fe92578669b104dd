"""LoRALinear against peft 0.21.2's lora.Linear (the reference), with identical weights."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora.layer import LoRALinear

peft_lora = pytest.importorskip("peft.tuners.lora")
Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D

IN_DIM, OUT_DIM, RANK, ALPHA = 16, 12, 4, 8
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def make_base(kind: str, bias: bool = True) -> nn.Module:
    if kind == "conv1d":  # GPT-2 layout: weight (in, out); transformers' Conv1D always has a bias
        base = Conv1D(OUT_DIM, IN_DIM)
        nn.init.normal_(base.bias)
        return base
    return nn.Linear(IN_DIM, OUT_DIM, bias=bias)


def make_pair(kind="linear", bias=True, variant="lora", dropout=0.0, rank=RANK, init="kaiming", seed=0,
              name="default"):
    """(ours, peft's) wrapping equal copies of one base layer, one adapter, RNG seeded alike."""
    base = make_base(kind, bias)
    opts = VARIANTS[variant]
    config = peft_lora.LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=dropout, fan_in_fan_out=kind == "conv1d",
                                  init_lora_weights=True if init == "kaiming" else init, **opts)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft_lora.Linear(copy.deepcopy(base), name, config=config, r=rank, lora_alpha=ALPHA)
    ref.base_layer.requires_grad_(False)  # peft's LoraModel freezes the base, the bare layer does not
    torch.manual_seed(seed)
    ours = LoRALinear(base)
    ours.add_adapter(name, rank, ALPHA, dropout=dropout, init=init, **opts)
    return ours, ref


def randomize(ours: LoRALinear, ref: nn.Module | None = None, seed=1) -> None:
    """Non-zero B (and m off its init value), then copy ours -> peft's by state dict (keys must match)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ours.lora_B:
            ours.lora_B[name].weight.copy_(torch.randn(ours.lora_B[name].weight.shape, generator=gen))
        for m in ours.lora_magnitude_vector.values():
            m.weight.mul_(1 + 0.5 * torch.rand(m.weight.shape, generator=gen))
    if ref is not None:
        ref.load_state_dict(ours.state_dict(), strict=True)


def x_input(requires_grad=False):
    return torch.randn(3, 5, IN_DIM, generator=torch.Generator().manual_seed(2), requires_grad=requires_grad)


def base_out_weight(layer) -> torch.Tensor:
    """Base weight as (out, in), for either wrapper."""
    w = layer.base_layer.weight
    return w.t() if isinstance(layer.base_layer, Conv1D) else w


CASES = [("linear", True), ("linear", False), ("conv1d", True)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind,bias", CASES)
def test_forward_and_grads_match_peft(kind, bias, variant):
    ours, ref = make_pair(kind, bias, variant)
    randomize(ours, ref)
    x_ours, x_ref = x_input(True), x_input(True)
    y_ours, y_ref = ours(x_ours), ref(x_ref)
    torch.testing.assert_close(y_ours, y_ref, atol=1e-5, rtol=0)
    assert not torch.allclose(y_ours, ours.base_layer(x_ours), atol=1e-3)  # the adapter really contributes
    if variant != "dora":  # one plain adapter on a frozen weight: the hand-written backward is what is checked
        assert y_ours.grad_fn.next_functions[0][0].name() == "_FrozenLinearWithLoRABackward"

    g = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(3))
    (y_ours * g).sum().backward()
    (y_ref * g).sum().backward()
    grads_ours = {k: p.grad for k, p in ours.named_parameters() if p.requires_grad}
    grads_ref = {k: p.grad for k, p in ref.named_parameters() if p.requires_grad}
    expected = {"lora_A.default.weight", "lora_B.default.weight"} | (
        {"lora_magnitude_vector.default.weight"} if variant == "dora" else set())
    assert grads_ours.keys() == grads_ref.keys() == expected  # base frozen, adapter trainable
    for k in expected:
        torch.testing.assert_close(grads_ours[k], grads_ref[k], atol=1e-5, rtol=0)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_dropout_in_training_matches_peft(kind, variant):
    # Our mask generator is not torch's (models/fused.py, tested in test_fused.py), so both sides get
    # one fixed mask: what is compared is where dropout acts (on the adapter branch's input only).
    ours, ref = make_pair(kind, True, variant, dropout=0.3)
    randomize(ours, ref)
    x = x_input()
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) >= 0.3

    class FixedMask(nn.Dropout):
        def forward(self, t):
            return t * mask.reshape(t.shape) / (1 - self.p) if self.training else t

    ours.lora_dropout["default"] = FixedMask(0.3)
    ref.lora_dropout["default"] = FixedMask(0.3)
    ours.train(), ref.train()
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_ref = ours(x_ours), ref(x_ref)
    torch.testing.assert_close(y_ours, y_ref, atol=1e-5, rtol=0)
    g = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(3))
    (y_ours * g).sum().backward()
    (y_ref * g).sum().backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=0)  # through both branches
    ours.eval(), ref.eval()
    assert (y_ours - ours(x)).abs().max() > 1e-3  # the mask changed the output
    ours.eval(), ref.eval()  # eval: dropout off
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_init_matches_peft_and_keeps_base_output(init, variant):
    ours, ref = make_pair("linear", True, variant, rank=8, init=init)
    # Same RNG call order as peft, so A is bit-identical, not just equally distributed.
    assert torch.equal(ours.lora_A["default"].weight, ref.lora_A["default"].weight)
    assert not torch.equal(ours.lora_A["default"].weight, torch.zeros_like(ours.lora_A["default"].weight))
    assert torch.equal(ours.lora_B["default"].weight, torch.zeros(OUT_DIM, 8))
    assert ours.state_dict().keys() == ref.state_dict().keys()
    if variant == "dora":  # m = ||W|| per output row
        m = ours.lora_magnitude_vector["default"].weight
        torch.testing.assert_close(m, ref.lora_magnitude_vector["default"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(m, base_out_weight(ours).norm(dim=1), atol=1e-6, rtol=0)
    x = x_input()
    torch.testing.assert_close(ours(x), ours.base_layer(x), atol=1e-6, rtol=0)  # step 0 == base model


def test_peft_state_dict_loads_into_ours_and_scaling_matches():
    ours, ref = make_pair("linear", True, "dora")
    randomize(ref, seed=9)  # peft's layer has the same layout, so randomize() works on it too
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = x_input()
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
    assert ours.scaling["default"] == ref.scaling["default"] == ALPHA / RANK
    rs, rs_ref = make_pair("linear", True, "rslora")
    assert rs.scaling["default"] == rs_ref.scaling["default"] == ALPHA / RANK**0.5


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_matches_peft(kind, variant):
    ours, ref = make_pair(kind, True, variant)
    randomize(ours, ref)
    x = x_input()
    w0 = base_out_weight(ours).clone()
    y_unmerged = ours(x)

    ours.merge()
    ref.merge()
    assert ours.merged and ours.merged_adapters == ["default"]
    torch.testing.assert_close(base_out_weight(ours), base_out_weight(ref), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(x), y_unmerged, atol=1e-5, rtol=0)
    assert torch.equal(ours(x), ours.base_layer(x))  # merged forward is the base layer alone

    ours.unmerge()
    assert not ours.merged
    torch.testing.assert_close(base_out_weight(ours), w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(x), y_unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_safe_merge_rejects_nan_and_leaves_layer_unchanged(variant):
    ours, _ = make_pair("linear", True, variant)
    randomize(ours)
    with torch.no_grad():
        ours.lora_B["default"].weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        ours.merge(safe=True)
    assert not ours.merged
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, before[k], atol=0, rtol=0, equal_nan=True)


def two_adapter_pair():
    """Adapters "a" (LoRA, r=4) and "b" (DoRA, r=2) in both layers, with equal random weights."""
    ours, ref = make_pair("linear", True, "lora", name="a")
    ours.add_adapter("b", 2, 3.0, use_dora=True)
    ref.update_layer("b", 2, 3.0, config=peft_lora.LoraConfig(r=2, lora_alpha=3.0, use_dora=True))
    assert ours.active_adapters == ["a"]  # adding does not activate
    randomize(ours, ref)
    return ours, ref


def test_two_adapters_switch_disable_merge_one_and_delete():
    ours, ref = two_adapter_pair()
    pristine_base = copy.deepcopy(ours.base_layer)
    x = x_input()
    outputs = {}
    for name in ("a", "b"):
        ours.set_adapter(name)
        ref.set_adapter(name)
        outputs[name] = ours(x)
        torch.testing.assert_close(outputs[name], ref(x), atol=1e-5, rtol=0)
        trainable = {k for k, p in ours.named_parameters() if p.requires_grad}
        assert trainable and all(f".{name}." in k for k in trainable)  # only the active adapter trains
    assert not torch.allclose(outputs["a"], outputs["b"], atol=1e-3)

    with ours.disable_adapters():
        assert torch.equal(ours(x), pristine_base(x))
    assert torch.equal(ours(x), outputs["b"])  # flag restored

    ours.merge(["a"])  # merge one adapter, not the active one
    ref.merge(adapter_names=["a"])
    torch.testing.assert_close(ours.base_layer.weight, ref.base_layer.weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=0)
    with ours.disable_adapters():  # disabling a merged layer unmerges it: base output again
        torch.testing.assert_close(ours(x), pristine_base(x), atol=1e-5, rtol=0)
    assert not ours.merged

    ours.merge(["a"])
    with pytest.raises(ValueError, match="merged"):
        ours.delete_adapter("a")
    ours.unmerge()
    ours.delete_adapter("a")
    assert "a" not in ours.lora_A and "a" not in ours.lora_B and "a" not in ours.lora_dropout
    assert "a" not in ours.scaling and "a" not in ours.r
    assert not any(".a." in k for k in ours.state_dict())
    assert ours.active_adapters == ["b"]
    torch.testing.assert_close(ours(x), outputs["b"], atol=1e-6, rtol=0)
    ours.delete_adapter("b")
    assert ours.active_adapters == []
    torch.testing.assert_close(ours(x), pristine_base(x), atol=1e-6, rtol=0)  # merge/unmerge round trip
    with pytest.raises(ValueError, match="no adapter"):
        ours.delete_adapter("b")
    with pytest.raises(ValueError, match="no adapter"):
        ours.set_adapter("zzz")


def test_sequential_merge_of_lora_then_dora_matches_peft():
    # DoRA's norm must use the unmerged weight even though "a" is already folded in.
    ours, ref = two_adapter_pair()
    w0 = ours.base_layer.weight.clone()
    ours.merge(["a"]); ours.merge(["b"])  # noqa: E702
    ref.merge(adapter_names=["a"]); ref.merge(adapter_names=["b"])  # noqa: E702
    torch.testing.assert_close(ours.base_layer.weight, ref.base_layer.weight, atol=1e-6, rtol=0)
    assert ours.merged_adapters == ["a", "b"]
    ours.unmerge()
    torch.testing.assert_close(ours.base_layer.weight, w0, atol=1e-6, rtol=0)


@pytest.mark.parametrize("rank", [0, -1])
def test_non_positive_rank_raises(rank):
    layer = LoRALinear(nn.Linear(IN_DIM, OUT_DIM))
    with pytest.raises(ValueError, match="rank"):
        layer.add_adapter("x", rank, ALPHA)
    assert "x" not in layer.lora_A


@pytest.mark.parametrize("base", [nn.Conv2d(2, 2, 1), nn.Embedding(4, 4), nn.LayerNorm(4)])
def test_only_linear_layers_can_be_wrapped(base):
    with pytest.raises(TypeError, match=f"LoRALinear wraps nn.Linear, GPT-2's Conv1D or a quantized linear, got "
                                        f"{type(base).__name__}"):
        LoRALinear(base)


class FakeQuantLinear(nn.Module):
    """Stands in for a quantized linear: stores its weight opaquely, exposes the merge hooks."""

    def __init__(self, linear: nn.Linear, with_requantize: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", linear.weight.detach().clone())
        self.bias = linear.bias
        if with_requantize:
            self.requantize_ = lambda weight: self.packed.copy_(weight)

    def dequantized_weight(self):
        return self.packed

    def forward(self, x):
        return F.linear(x, self.dequantized_weight(), self.bias)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_quantized_base_goes_through_hooks(variant):
    linear = nn.Linear(IN_DIM, OUT_DIM)
    plain, quant = LoRALinear(copy.deepcopy(linear)), LoRALinear(FakeQuantLinear(linear, with_requantize=True))
    for layer in (plain, quant):
        layer.add_adapter("default", RANK, ALPHA, **VARIANTS[variant])
    randomize(plain)
    quant.load_state_dict(plain.state_dict(), strict=False)
    x = x_input()
    torch.testing.assert_close(quant(x), plain(x), atol=1e-6, rtol=0)
    plain.merge(), quant.merge()
    torch.testing.assert_close(quant.base_layer.packed, plain.base_layer.weight, atol=0, rtol=0)
    no_hook = LoRALinear(FakeQuantLinear(linear, with_requantize=False))
    no_hook.add_adapter("default", RANK, ALPHA)
    with pytest.raises(NotImplementedError, match="requantize_"):
        no_hook.merge()


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_gets_fp32_adapters_like_peft(variant, dtype):
    # peft (autocast_adapter_dtype, on by default in get_peft_model) keeps the factors in fp32 on a
    # bf16/fp16 base; in bf16 most of AdamW's small updates would round away.
    peft = pytest.importorskip("peft")
    base = make_base("linear").to(dtype)
    torch.manual_seed(0)
    ref = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)),
                              peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["0"], **VARIANTS[variant]))
    ref_layer = ref.base_model.model[0]
    torch.manual_seed(0)
    ours = LoRALinear(base)
    ours.add_adapter("default", RANK, ALPHA, **VARIANTS[variant])
    ref_state = ref_layer.state_dict()
    for key, value in ours.state_dict().items():  # A drawn as peft draws it, then rounded through dtype
        assert value.dtype == ref_state[key].dtype == (torch.float32 if "lora_" in key else dtype), key
        assert torch.equal(value, ref_state[key]), key
    randomize(ours, ref_layer)
    x = x_input().to(dtype)
    y = ours(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, ref_layer(x), atol=0, rtol=0)
    A = ours.lora_A["default"].weight
    before = A.detach().clone()
    y.float().square().sum().backward()
    torch.optim.AdamW([A], lr=1e-4).step()
    assert (A != before).all()  # every entry moved by ~1e-4 (most would not in bf16)


@pytest.mark.parametrize("variant", ["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_with_dropout_trains_like_peft(variant, dtype):
    """peft casts the input to the fp32 factors' dtype before dropout; ours dropped out in bf16, rounding the
    1 / (1 - p) scale (kept entries x 1.1094 on average instead of 1.1111)."""
    peft = pytest.importorskip("peft")
    base = make_base("linear").to(dtype)
    torch.manual_seed(0)
    ref = peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.1, target_modules=["0"], **VARIANTS[variant]))
    ref_layer = ref.base_model.model[0]
    torch.manual_seed(0)
    ours = LoRALinear(base)
    ours.add_adapter("default", RANK, ALPHA, dropout=0.1, **VARIANTS[variant])
    randomize(ours, ref_layer)
    x = x_input().to(dtype)
    mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(5)) >= 0.1

    class FixedMask(nn.Dropout):  # one mask on both sides (ours draws its own, models/fused.py)
        def forward(self, t):
            return t * mask.reshape(t.shape) / (1 - self.p) if self.training else t

    ours.lora_dropout["default"], ref_layer.lora_dropout["default"] = FixedMask(0.1), FixedMask(0.1)
    ours.train(), ref_layer.train()
    torch.testing.assert_close(ours(x), ref_layer(x), atol=0, rtol=0)
