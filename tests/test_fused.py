"""models/fused.py against the composite PyTorch expressions it replaces (autograd's gradients of
the textbook formula are the reference), and the dropout mask against its distribution."""
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import fused

ROOT = Path(__file__).resolve().parent.parent


def grads(fn, *tensors, seed=0):
    """fn(*tensors) and the gradients of <fn(...), g> for a fixed random g."""
    tensors = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
    out = fn(*tensors)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    (out * g).sum().backward()
    return out.detach(), [t.grad for t in tensors if t.requires_grad]


def close(ours, ref, tol):
    torch.testing.assert_close(ours, ref, atol=tol * max(1.0, ref.abs().max().item()), rtol=0)


# ---- RMSNorm ------------------------------------------------------------------------------------

def rms_norm_reference(x, weight, eps):  # transformers' LlamaRMSNorm
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_rms_norm_forward_and_backward(dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, 48, generator=g) * 3).to(dtype)
    weight = (1 + 0.1 * torch.randn(48, generator=g)).to(dtype)
    ours, ours_grads = grads(lambda x, w: fused.rms_norm(x, w, 1e-5), x, weight)
    ref, ref_grads = grads(lambda x, w: rms_norm_reference(x, w, 1e-5), x, weight)
    assert torch.equal(ours, ref)  # the forward is the reference's arithmetic, op for op
    for a, b in zip(ours_grads, ref_grads):
        assert a.dtype == b.dtype
        close(a.float(), b.float(), tol)


def test_rms_norm_frozen_weight_gets_no_gradient():
    x = torch.randn(4, 16, requires_grad=True)
    weight = torch.ones(16)
    fused.rms_norm(x, weight, 1e-6).sum().backward()
    assert x.grad is not None and weight.grad is None


# ---- RoPE ---------------------------------------------------------------------------------------

def rope_reference(x, cos, sin):  # transformers' apply_rotary_pos_emb for one tensor
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def test_rope_forward_and_backward():
    g = torch.Generator().manual_seed(0)
    B, nh, T, hs = 2, 3, 5, 8
    x = torch.randn(B, T, nh, hs, generator=g).transpose(1, 2)  # (B, nh, T, hs), strided as in attention
    angles = torch.randn(B, 1, T, hs // 2, generator=g)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    ours, (ours_grad,) = grads(lambda x: fused.rope(x, cos, sin), x)
    ref, (ref_grad,) = grads(lambda x: rope_reference(x, cos, sin), x)
    assert torch.equal(ours, ref)  # the reference's roundings, so logits equal transformers' exactly
    close(ours_grad, ref_grad, 1e-6)


# ---- linear + cross-entropy ---------------------------------------------------------------------

def lce_case(n=37, C=24, V=101, dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, C, generator=g).to(dtype)
    weight = (torch.randn(V, C, generator=g) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    targets = torch.randint(0, V, (n,), generator=g)
    return hidden, weight, b, targets


def lce_reference(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")


@pytest.mark.parametrize("rows", [5, 256])  # several chunks with a partial last one; one chunk
@pytest.mark.parametrize("bias", [True, False])
def test_linear_cross_entropy_equals_reference(monkeypatch, rows, bias):
    monkeypatch.setattr(fused, "CROSS_ENTROPY_ROWS", rows)
    hidden, weight, b, targets = lce_case(bias=bias)
    tensors = [hidden, weight] + ([b] if bias else [])
    run = lambda fn: (lambda h, w, *bb: fn(h, w, bb[0] if bb else None, targets))  # noqa: E731
    ours, ours_grads = grads(run(fused.linear_cross_entropy), *tensors)
    ref, ref_grads = grads(run(lce_reference), *tensors)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    assert len(ours_grads) == len(ref_grads) == len(tensors)
    for a, r in zip(ours_grads, ref_grads):
        close(a, r, 1e-6)


def test_linear_cross_entropy_bfloat16_and_frozen_head(monkeypatch):
    monkeypatch.setattr(fused, "CROSS_ENTROPY_ROWS", 8)
    hidden, weight, b, targets = lce_case(dtype=torch.bfloat16)
    h1, h2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    ours = fused.linear_cross_entropy(h1, weight, b, targets)  # weight and bias frozen (LoRA)
    ref = lce_reference(h2, weight, b, targets)
    (ours * 0.5).backward()
    (ref * 0.5).backward()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=0)
    assert h1.grad.dtype == torch.bfloat16
    close(h1.grad.float(), h2.grad.float(), 1e-2)


def test_linear_cross_entropy_without_grad_and_lm_loss_fallback():
    hidden, weight, b, targets = lce_case()
    with torch.no_grad():
        torch.testing.assert_close(fused.linear_cross_entropy(hidden, weight, b, targets),
                                   lce_reference(hidden, weight, b, targets), rtol=1e-6, atol=0)
    head = nn.Linear(24, 101)
    wrapped = nn.Sequential(head)  # not a plain nn.Linear (an adapter, say): the unfused path
    fused_loss = fused.lm_loss(head, hidden, targets)
    plain_loss = fused.lm_loss(wrapped, hidden, targets)
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(plain_loss, lce_reference(hidden, head.weight, head.bias, targets), rtol=1e-6, atol=0)


# ---- frozen linear layers on oneDNN -----------------------------------------------------------------

@pytest.fixture
def onednn_calls(monkeypatch):
    """The weights each call of oneDNN's linear product received."""
    if not fused._ONEDNN:
        pytest.skip("this torch build has no oneDNN (mkldnn)")
    calls, product = [], torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, w, *rest: calls.append(w) or product(x, w, *rest))
    return calls


@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stored_transposed", [False, True])  # GPT-2's Conv1D passes the view Wᵀ of its (in, out) weight
def test_frozen_linear_equals_f_linear(onednn_calls, shape, bias, stored_transposed):
    """A frozen weight: y and dL/dx equal F.linear's, both products on oneDNN; the output is no view,
    so LoRA can add to it in place."""
    weight = torch.randn(24, 16).t() if stored_transposed else torch.randn(16, 24)
    b = torch.randn(16) if bias else None
    x = torch.randn(shape)
    ours, (ours_grad,) = grads(lambda t: fused.linear(t, weight, b), x)
    ref, (ref_grad,) = grads(lambda t: F.linear(t, weight, b), x)
    close(ours, ref, 1e-6)
    close(ours_grad, ref_grad, 1e-6)
    assert len(onednn_calls) == 2 and onednn_calls[0] is weight and torch.equal(onednn_calls[1], weight.t())
    y = fused.linear(x.clone().requires_grad_(), weight, b)
    assert y.shape == (*shape[:-1], 16) and not y._is_view()
    with torch.no_grad():
        close(fused.linear(x, weight, b), ref, 1e-6)
    assert len(onednn_calls) == 4


def test_second_order_gradient_through_a_frozen_linear_equals_f_linears():
    """create_graph=True (a gradient penalty on the input): oneDNN's product has no derivative, so the
    recorded backward product goes through F.linear; the second-order gradient was 0 before."""
    weights = [torch.randn(32, 32) / 6 for _ in range(2)]

    def penalty(linear):
        x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1)).requires_grad_()
        y = torch.tanh(linear(torch.tanh(linear(x, weights[0])), weights[1])).pow(2).sum()
        (g,) = torch.autograd.grad(y, x, create_graph=True)
        g.pow(2).sum().backward()
        return g.detach(), x.grad

    ours, ref = penalty(fused.linear), penalty(F.linear)
    assert ref[1].abs().sum() > 1
    for a, b in zip(ours, ref):
        close(a, b, 1e-5)


def second_order(loss, *tensors):
    """Gradients of |d loss / d t0|² (a gradient penalty, create_graph=True) with respect to every tensor."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    (g,) = torch.autograd.grad(loss(*tensors), tensors[0], create_graph=True)
    g.pow(2).sum().backward()
    return [g.detach()] + [t.grad for t in tensors]


def test_second_order_gradients_of_rms_norm_and_the_lora_layer():
    """Backward passes that save a value of the forward recompute it as a function of the inputs under
    create_graph, so second derivatives equal autograd's of the textbook formula (1/rms and h = x Aᵀ
    were constants of the second derivative before)."""
    from lora.layer import LoRALinear

    torch.manual_seed(0)
    x, w = torch.randn(4, 8), torch.rand(8) + 0.5
    ours = second_order(lambda x, w: fused.rms_norm(x, w, 1e-6).pow(3).sum(), x, w)
    ref = second_order(lambda x, w: rms_norm_reference(x, w, 1e-6).pow(3).sum(), x, w)
    for a, b in zip(ours, ref):
        close(a, b, 1e-5)

    lora = LoRALinear(fused.Linear(8, 6))
    lora.add_adapter("default", rank=2, alpha=4)
    nn.init.normal_(lora.lora_B["default"].weight)
    A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    W, b = lora.base_layer.weight, lora.base_layer.bias
    ours = second_order(lambda x: lora(x).pow(3).sum(), x)
    ours_factors = [A.grad.clone(), B.grad.clone()]
    A.grad = B.grad = None
    ref = second_order(lambda x: (F.linear(x, W, b) + 2.0 * F.linear(F.linear(x, A), B)).pow(3).sum(), x)
    for a, b in zip(ours + ours_factors, ref + [A.grad, B.grad]):
        close(a, b, 1e-5)


def test_chunked_cross_entropy_refuses_a_second_order_gradient():
    hidden = torch.randn(4, 8, requires_grad=True)
    loss = fused.linear_cross_entropy(hidden, torch.randn(5, 8), None, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_linear_with_a_trained_weight_or_autocast_is_f_linear(onednn_calls):
    """A weight or bias that trains gets its gradient from F.linear; autocast keeps its dtype."""
    layer, reference, x = fused.Linear(24, 16), nn.Linear(24, 16), torch.randn(3, 5, 24)
    reference.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)  # the same kernel
    layer.weight.requires_grad_(False)  # the bias still trains
    layer(x).sum().backward()
    torch.testing.assert_close(layer.bias.grad, torch.full((16,), 15.0))
    assert not onednn_calls
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert not onednn_calls


@pytest.mark.parametrize("users_value", [None, "7"])
def test_importing_models_caps_onednns_primitive_cache_unless_the_user_did(users_value):
    """oneDNN's default cache of 1024 primitives (one per product shape) doubled the peak memory of steps
    whose batch length changes (bench/bench_gemm.py); importing models sets a small cap before oneDNN
    reads it."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if users_value:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = users_value
    code = "import os, models; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == (users_value or str(fused.PRIMITIVE_CACHE_CAPACITY))
    assert fused.PRIMITIVE_CACHE_CAPACITY < 1024


# ---- dropout ------------------------------------------------------------------------------------

# dropout has a C path (models/dropout.c) and a PyTorch one; each test below runs on both
@pytest.fixture(params=["c", "torch"])
def dropout_path(request, monkeypatch):
    if request.param == "c" and fused._DROPOUT is None:
        pytest.skip("models/dropout.c was not built here")
    if request.param == "torch":
        monkeypatch.setattr(fused, "_DROPOUT", None)
    return request.param


def mix32(x):
    """lowbias32 on int64 tensors holding uint32 values: the hash models/dropout.c documents."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def reference_keep_mask(n, p, key0, key1):
    """Element i kept when the top 16 bits of mix32(mix32(lo32(i) ^ key0) + (key1 ^ hi32(i))) reach round(p * 65536)."""
    i = torch.arange(n, dtype=torch.int64)
    lane = mix32((mix32((i & 0xFFFFFFFF) ^ key0) + (key1 ^ (i >> 32))) & 0xFFFFFFFF) >> 16
    return (lane >= round(p * 65536)).to(torch.uint8)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not shutil.which("cc"),
                    reason="the C kernels are built where a C compiler exists")
def test_dropout_library_was_built():
    """pip install builds models/dropout.c here, so the C path is what the tests and training run."""
    assert fused._DROPOUT is not None, "models/_dropout was not built or found: reinstall with pip install -e ."


@pytest.mark.skipif(fused._DROPOUT is None or not sys.platform.startswith("linux"),
                    reason="models/dropout.c was not built here, or no /proc/self/maps")
def test_c_kernels_run_on_torchs_openmp_runtime():
    """The C libraries link libgomp.so.1 and are loaded after torch, so the loader gives them torch's copy: one
    OpenMP runtime in the process, and their loops run on torch's threads. A second runtime would bring a second
    pool of spinning threads competing with torch's for the cores."""
    from quant import nf4  # noqa: F401  (loads quant/nf4_simd.c)

    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if Path(line.split()[-1]).name.startswith(("libgomp", "libomp",
                                                                                                  "libiomp"))}
    assert len(runtimes) == 1, runtimes


@pytest.mark.skipif(fused._DROPOUT is None, reason="models/dropout.c was not built here")
@pytest.mark.parametrize("threads", [1, 3])
def test_c_keep_mask_is_the_documented_hash(threads, torch_threads):
    """The C mask equals the hash written out in PyTorch for the key drawn from torch's generator, and dropout's
    product and its backward use that mask; on 3 threads (OpenMP splits from 65536 elements on) as on one."""
    torch_threads(threads)
    n, p = 200_003, 0.3
    torch.manual_seed(5)
    keep = fused.keep_mask((n,), p)
    torch.manual_seed(5)
    key0, key1 = fused._mask_key()
    assert torch.equal(keep, reference_keep_mask(n, p, key0, key1))
    x = torch.randn(n, requires_grad=True)
    torch.manual_seed(5)
    y = fused.dropout(x, p)
    scale = keep.float() * (1 / (1 - p))
    assert torch.equal(y, x.detach() * scale)
    g = torch.randn(n)
    y.backward(g)
    assert torch.equal(x.grad, g * scale)


def test_keep_mask_distribution(dropout_path):
    torch.manual_seed(0)
    p, n = 0.1, 1 << 20
    keep = fused.keep_mask((n,), p)
    assert keep.dtype == torch.uint8 and set(keep.unique().tolist()) == {0, 1}
    dropped = keep == 0
    p_rounded = round(p * 65536) / 65536
    sigma = math.sqrt(p_rounded * (1 - p_rounded) / n)
    assert abs(dropped.float().mean().item() - p_rounded) < 5 * sigma
    for lane in range(4):  # every fourth element (the torch path's 16-bit lanes of one 64-bit draw) on its own
        assert abs(dropped[lane::4].float().mean().item() - p_rounded) < 5 * 2 * sigma
    # neighbouring elements and rows of a MiniLM attention mask (64 apart) are independent: P(both dropped) = p²
    for gap in (1, 64):
        both = (dropped[:-gap] & dropped[gap:]).float().mean().item()
        assert abs(both - p_rounded**2) < 5 * math.sqrt(p_rounded**2 / n)
    # two draws are independent masks
    again = fused.keep_mask((n,), p) == 0
    assert abs((dropped & again).float().mean().item() - p_rounded**2) < 5 * math.sqrt(p_rounded**2 / n)
    assert fused.keep_mask((4, 5), 0.0).all()


def test_dropout_scales_kept_values_and_backward_uses_the_same_mask(dropout_path):
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(0), requires_grad=True)
    p = 0.3
    torch.manual_seed(1)
    y = fused.dropout(x, p, training=True)
    torch.manual_seed(1)
    keep = fused.keep_mask(x.shape, p)  # the mask dropout drew from the same generator state
    kept = keep.bool()
    assert 0.2 < 1 - kept.float().mean().item() < 0.4
    assert torch.equal(y, x.detach() * (keep.float() * (1.0 / (1 - p))))  # exactly F.dropout's product
    g = torch.randn(64, 33)
    y.backward(g)
    assert torch.equal(x.grad, g * (keep.float() * (1.0 / (1 - p))))
    torch.manual_seed(1)
    assert torch.equal(fused.dropout(x, p, training=True), y)  # torch's generator: seeds reproduce it
    assert fused.dropout(x, p, training=False) is x
    assert torch.equal(fused.Dropout(p).eval()(x), x)
    assert isinstance(fused.Dropout(p), nn.Dropout)
    # a dropped -1 is -0 and a dropped inf NaN, as x times the mask gives; a strided input
    special = torch.tensor([[-1.0, float("inf"), 2.0, -3.0]]).expand(50, 4).t()
    torch.manual_seed(2)
    out = fused.dropout(special, 0.5)
    torch.manual_seed(2)
    keep = fused.keep_mask(special.shape, 0.5).float()
    assert torch.equal(out.isnan(), (special * keep).isnan())
    assert torch.equal(out.nan_to_num().signbit(), (special * keep).nan_to_num().signbit())
    # second-order gradients: the backward is itself differentiable
    x2 = torch.randn(10, 7, requires_grad=True)
    torch.manual_seed(3)
    grad, = torch.autograd.grad(fused.dropout(x2, 0.2).pow(2).sum(), x2, create_graph=True)
    second, = torch.autograd.grad(grad.sum(), x2)
    torch.manual_seed(3)
    m = fused.keep_mask(x2.shape, 0.2).float() / 0.8
    torch.testing.assert_close(second, 2 * m * m, rtol=1e-6, atol=0)


@pytest.mark.parametrize("gqa", [False, True])
@pytest.mark.parametrize("masking", ["none", "padding", "causal"])
def test_attention_with_dropout(gqa, masking, dropout_path):
    g = torch.Generator().manual_seed(2)
    B, nh, T, hs = 2, 4, 6, 8
    q = torch.randn(B, nh, T, hs, generator=g)
    k, v = (torch.randn(B, 2 if gqa else nh, T, hs, generator=g) for _ in range(2))
    mask = None
    if masking == "padding":
        mask = torch.ones(B, 1, 1, T, dtype=torch.bool)
        mask[1, ..., -2:] = False
    causal = masking == "causal"
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    # p so small it rounds to 0 / 65536: nothing is dropped, so this is plain attention
    close(fused.attention_with_dropout(q, k, v, mask, causal, 1e-9), reference, 1e-6)

    # with dropout: the probabilities times the mask drawn from the same generator state
    p = 0.25
    torch.manual_seed(3)
    keep = fused.keep_mask((B, nh, T, T), p)
    torch.manual_seed(3)
    ours = fused.attention_with_dropout(q, k, v, mask, causal, p)
    if gqa:
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hs)
    allowed = torch.ones(T, T, dtype=torch.bool).tril() if causal else mask
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    close(ours, (scores.softmax(-1) * keep / (1 - p)) @ v, 1e-6)
