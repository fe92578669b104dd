"""quant/ against bitsandbytes 0.50.2 on CPU: NF4 (+ double quant), LLM.int8(), quantized linears.

Format-level results must be bit-identical to bitsandbytes (torch.equal); layer outputs are
compared with tolerances measured on the reference, explained where they are used.
"""
import platform
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
from bnb_reference import bnb_dequantize, fp32_linear4bit
from quant import nf4
from quant import (DYNAMIC_CODE, NF4_CODE, Linear4bit, Linear8bit, dequantize_model, dequantize_nf4, int8_matmul,
                   model_bytes, quantize_model, quantize_nf4, vectorwise_quantize)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # all that bitsandbytes accepts
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def weight(shape, dtype=torch.float32, seed=0):
    """Normal weights with a few large values, so block scales vary a lot."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[:: 97] *= 30
    return w.to(dtype)


# NF4 dequantization has a PyTorch path and a C one (quant/nf4_simd.c) at each SIMD width this CPU runs
DEQUANTIZE_PATHS = [0] + [width for width in (256, 512) if width <= nf4.SIMD_WIDTH]


@pytest.fixture(params=DEQUANTIZE_PATHS, ids=lambda width: f"simd{width}" if width else "torch")
def dequantize_path(request, monkeypatch):
    monkeypatch.setattr(nf4, "SIMD_WIDTH", request.param)
    return request.param


def bnb_quantize(w, blocksize, double_quant):
    return bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


# ---- NF4 ---------------------------------------------------------------------------------------

def test_code_tables_equal_bitsandbytes():
    assert torch.equal(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, bnbF.create_dynamic_map(signed=True))


# Both shapes hold a whole number of 4096-blocks. (256, 192) has more than 256 blocks of 32..128,
# so double quantization uses several nested blocks, the last one partial.
@pytest.mark.parametrize("shape", [(256, 192), (2, 4, 512)])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_matches_bitsandbytes(shape, blocksize, dtype, double_quant, dequantize_path):
    w = weight(shape, dtype)
    w.view(-1)[:blocksize] = 0  # an all-zero block (absmax 0)
    ref_packed, ref_state = bnb_quantize(w, blocksize, double_quant)
    packed, state = quantize_nf4(w, blocksize, double_quant)

    assert packed.dtype == ref_packed.dtype and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax)
    if double_quant:
        assert torch.equal(state.nested_absmax, ref_state.state2.absmax)
        assert torch.equal(state.offset, ref_state.offset)
        assert ref_state.state2.blocksize == 256

    dequantized = dequantize_nf4(packed, state)
    assert dequantized.dtype == dtype and dequantized.shape == w.shape
    assert torch.equal(dequantized, bnb_dequantize(ref_packed, ref_state))


def test_nf4_chunks_and_dequantize_into_buffer(monkeypatch):
    """A weight of several quantize/dequantize chunks (a partial last one), each chunk whole lookup rows
    and a remainder, gives bnb's bytes; dequantizing into a larger, dirty buffer and scratch gives
    bnb's values."""
    monkeypatch.setattr(nf4, "SIMD_WIDTH", 0)  # the PyTorch path: the C one has no chunks
    monkeypatch.setattr(nf4, "QUANTIZE_CHUNK", 1 << 12)  # small chunks, so a small weight spans many
    monkeypatch.setattr(nf4, "DEQUANTIZE_CHUNK", 1 << 11)
    monkeypatch.setattr(nf4, "LOOKUP_ROW", 640)  # 2048 = 3 rows + 128, the last chunk's 1536 = 2 rows + 256
    w = weight((300, 256), torch.float32)
    assert w.numel() % nf4.QUANTIZE_CHUNK and (w.numel() // 2) % nf4.DEQUANTIZE_CHUNK
    packed, state = quantize_nf4(w, 128)
    ref_packed, ref_state = bnb_quantize(w, 128, False)
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(dequantize_nf4(packed, state), bnb_dequantize(ref_packed, ref_state))
    buffer = torch.full((w.numel() + 100,), float("nan"))
    assert nf4.dequantize_scratch_size(packed.numel()) == nf4.DEQUANTIZE_CHUNK
    scratch = torch.full((nf4.DEQUANTIZE_CHUNK + 7,), -1, dtype=torch.int64)
    dequantized = dequantize_nf4(packed, state, out=buffer, scratch=scratch)
    assert dequantized.data_ptr() == buffer.data_ptr()
    assert torch.equal(dequantized, bnb_dequantize(ref_packed, ref_state))
    with pytest.raises(ValueError, match="at least 76800 elements"):
        dequantize_nf4(packed, state, out=torch.empty(100))
    with pytest.raises(ValueError, match=f"at least {nf4.DEQUANTIZE_CHUNK} elements"):
        dequantize_nf4(packed, state, scratch=torch.empty(nf4.DEQUANTIZE_CHUNK - 1, dtype=torch.int64))


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or not shutil.which("cc"),
                    reason="the C lookup is built for x86-64 where a C compiler exists")
def test_simd_lookup_was_built():
    """pip install builds quant/nf4_simd.c here, so the tests above run the C path and not only the fallback."""
    assert nf4.SIMD_WIDTH in (256, 512), "quant/_nf4_simd was not built or found: reinstall with pip install -e ."


def test_simd_lookup_writes_only_its_weights(dequantize_path):
    """Every code of every block (blocksize 32, the smallest: one step of the AVX512 loop per half block), into a
    larger dirty buffer whose tail stays untouched."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(24)  # each byte once per 16-byte block pair
    w = (NF4_CODE[(codes.long().view(-1, 1) >> torch.tensor([4, 0])) & 15].view(-1) * 0.5).view(96, 128)
    packed, state = quantize_nf4(w, 32)
    ref_packed, ref_state = bnb_quantize(w, 32, False)
    assert torch.equal(packed.view(-1), codes)
    buffer = torch.full((w.numel() + 33,), float("nan"))
    dequantized = dequantize_nf4(packed, state, out=buffer)
    assert torch.equal(dequantized, bnb_dequantize(ref_packed, ref_state)) and torch.equal(dequantized, w)
    assert buffer[w.numel():].isnan().all()


@pytest.mark.skipif(nf4.SIMD_WIDTH == 0, reason="no C lookup on this machine")
def test_simd_lookup_splits_a_large_weight_between_threads(monkeypatch, torch_threads):
    """Above SIMD_PARALLEL_MIN each thread looks up a share of the blocks: 3 shares of 1000 blocks (not a multiple of
    3) give bnb's values, with and without double quantization."""
    monkeypatch.setattr(nf4, "SIMD_PARALLEL_MIN", 1000)
    w = weight((500, 128), torch.float16)
    torch_threads(3)
    for double_quant in (False, True):
        packed, state = quantize_nf4(w, 64, double_quant)
        assert torch.equal(dequantize_nf4(packed, state), bnb_dequantize(*bnb_quantize(w, 64, double_quant)))


def test_nf4_level_lookup_equals_the_nearest_level():
    """nearest_nf4_level (quantize_nf4's cell lookup) gives the number of float32 level midpoints strictly below x (what
    bitsandbytes' comparisons compute: the nearest level, a tie going to the lower one) for a dense
    grid of [-1, 1], every midpoint and the float32 values either side of each."""
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    grid = torch.linspace(-1, 1, 2_000_001)
    x = torch.cat([grid, midpoints, midpoints.nextafter(torch.tensor(2.0)), midpoints.nextafter(torch.tensor(-2.0)),
                   torch.tensor([-1.0, 1.0, 0.0, -0.0])])
    below = (x[:, None] > midpoints[None, :]).sum(dim=1)
    away = (grid[:, None] - midpoints[None, :]).abs().amin(dim=1) > 1e-6  # off the midpoints: the nearest level
    assert torch.equal(below[: grid.numel()][away], (grid[away, None] - NF4_CODE[None, :]).abs().argmin(dim=1))
    assert torch.equal(nf4.nearest_nf4_level(x).long(), below)


def test_linear4bit_layers_share_the_dequantize_buffer_safely():
    """Layers of different sizes dequantize into one scratch buffer; forward and backward stay exact."""
    torch.manual_seed(0)
    small, big = nn.Linear(64, 32), nn.Linear(32, 256)
    q_small, q_big = Linear4bit.from_linear(small), Linear4bit.from_linear(big)
    x = torch.randn(5, 64, requires_grad=True)
    y = q_big(torch.tanh(q_small(x)))
    y.square().sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    w_small, w_big = q_small.dequantized_weight(), q_big.dequantized_weight()
    y_ref = F.linear(torch.tanh(F.linear(x_ref, w_small, q_small.bias)), w_big, q_big.bias)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)


def test_each_thread_dequantizes_into_its_own_buffer():
    """Models run from several threads (a server's pool) must not overwrite each other's Ŵ: each thread
    gets its own buffer, and outputs computed concurrently equal those computed alone."""
    import threading

    from quant.linear import _dequantize_buffers

    torch.manual_seed(0)
    layers = [Linear4bit.from_linear(nn.Linear(256, 256)) for _ in range(2)]
    x = torch.randn(4, 256)
    with torch.no_grad():
        alone = [layer(x) for layer in layers]
    barrier, pointers, wrong = threading.Barrier(2), [None, None], [0, 0]

    def work(i):
        pointers[i] = _dequantize_buffers(layers[i].weight_packed)[0].data_ptr()
        barrier.wait()
        with torch.no_grad():
            wrong[i] = sum(not torch.equal(layers[i](x), alone[i]) for _ in range(100))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert pointers[0] != pointers[1] and wrong == [0, 0]


@pytest.mark.parametrize("layer_cls, backend", [(Linear4bit, "ours"), (Linear8bit, "ours"), (Linear8bit, "bnb")])
def test_quantized_layers_refuse_inputs_of_another_width(layer_cls, backend):
    """As nn.Linear does: (2, 128) into a 64-input layer was a (4, 32) output from the int8 layer."""
    layer = layer_cls.from_linear(nn.Linear(64, 32), backend=backend)
    for shape in ((2, 128), (4, 48), (3, 2, 96)):
        with pytest.raises(ValueError, match="takes inputs of 64 features"):
            layer(torch.randn(shape))


@pytest.mark.parametrize("double_quant", [False, True])
def test_second_order_gradients_through_quantized_layers(double_quant):
    """create_graph=True (a gradient penalty on the input): the second-order gradient through two frozen
    4-bit layers equals the one through their dequantized weights (it was 0 on oneDNN's product). (The
    int8 layers' forward quantizes x too, so no plain product is their reference.)"""
    torch.manual_seed(0)
    layers = [Linear4bit.from_linear(nn.Linear(64, 64), double_quant=double_quant) for _ in range(2)]
    weights = [layer.dequantized_weight().clone() for layer in layers]

    def penalty(forward):
        x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).requires_grad_()
        (g,) = torch.autograd.grad(torch.tanh(forward(torch.tanh(forward(x, 0)), 1)).pow(2).sum(), x, create_graph=True)
        g.pow(2).sum().backward()
        return g.detach(), x.grad

    def reference(x, i):
        return F.linear(x, weights[i], layers[i].bias)

    ours, ref = penalty(lambda x, i: layers[i](x)), penalty(reference)
    assert ref[1].abs().sum() > 1
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_dequantize_model_gives_back_the_weights_dtype():
    """A bf16 model quantized (compute in fp32) and dequantized runs again, in bf16, as transformers'
    dequantize keeps bitsandbytes' quant_state.dtype; it used to build fp32 layers that bf16 inputs broke."""
    torch.manual_seed(0)
    model = MiniModel().to(torch.bfloat16)
    quantize_model(model, bits=4)
    expected = model.blocks[0].dequantized_weight(torch.bfloat16)
    dequantize_model(model)
    assert model.blocks[0].weight.dtype == torch.bfloat16 and torch.equal(model.blocks[0].weight, expected)
    logits, _ = model(torch.randint(0, 50, (2, 5)))
    assert logits.dtype == torch.bfloat16


def test_quantize_model_refuses_a_quantized_model_and_reads_one_skip_name():
    model = MiniModel()
    quantize_model(model, bits=4, skip="lm_head")  # a string is one name, not its characters
    assert type(model.lm_head) is nn.Linear and isinstance(model.pre_classifier, Linear4bit)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, bits=8)  # used to return without a word, the layers still 4-bit


def test_multihead_attentions_out_proj_is_not_quantized():
    """nn.MultiheadAttention reads out_proj.weight itself: replacing the layer broke its forward."""
    attention = nn.MultiheadAttention(64, 4, batch_first=True)
    quantize_model(nn.Sequential(attention))
    assert type(attention.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    x = torch.randn(2, 5, 64)
    attention(x, x, x)


def test_nf4_ties_and_rounding():
    """Values exactly on a midpoint between two levels go to the lower level, as in bitsandbytes."""
    midpoints = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    w = torch.cat([midpoints, -midpoints, torch.nextafter(midpoints, torch.ones(15)), torch.tensor([1.0])])
    w = torch.cat([w, torch.zeros(64 - w.numel())])
    packed, state = quantize_nf4(w)
    assert torch.equal(packed, bnb_quantize(w, 64, False)[0])
    # absmax is 1, so every value must land on its nearest level
    distance_to_nearest = (w[:, None] - NF4_CODE).abs().min(dim=1).values
    torch.testing.assert_close((dequantize_nf4(packed, state) - w).abs(), distance_to_nearest, rtol=0, atol=1e-7)


def test_double_quant_constant_block():
    """Equal block scales make every nested block all-zero after the mean is subtracted."""
    w = torch.ones(64 * 300)
    ref_packed, ref_state = bnb_quantize(w, 64, True)
    packed, state = quantize_nf4(w, 64, double_quant=True)
    assert torch.equal(state.absmax, ref_state.absmax) and torch.equal(state.nested_absmax, ref_state.state2.absmax)
    assert torch.equal(dequantize_nf4(packed, state), w)


def test_nf4_bad_inputs():
    with pytest.raises(ValueError, match="blocksize must be one of"):
        quantize_nf4(torch.randn(8, 48), blocksize=48)
    with pytest.raises(ValueError, match="multiple of blocksize"):
        quantize_nf4(torch.randn(10, 10), blocksize=64)  # bitsandbytes would pad the last block
    with pytest.raises(ValueError, match="float32/float16/bfloat16"):
        quantize_nf4(torch.ones(64, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of blocksize"):
        Linear4bit.from_linear(nn.Linear(10, 3))
    with pytest.raises(ValueError, match="non-empty"):
        quantize_nf4(torch.zeros(0, 64))
    with pytest.raises(ValueError, match="floating-point"):
        Linear8bit.from_weight(torch.ones(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="compute_dtype must be a floating-point"):
        Linear4bit.from_linear(nn.Linear(64, 64), compute_dtype=torch.int32)  # gave all zeros
    with pytest.raises(ValueError, match="mean of the block scales overflows"):  # was an IndexError deep inside
        quantize_nf4(torch.full((64 * 64,), 3e37), double_quant=True)


def test_dequantize_nf4_bad_inputs(dequantize_path):
    """Codes and a state that do not belong together are an error, not values off by up to 2.4 (or, in C,
    reads past the nested scales)."""
    import dataclasses

    packed, state = quantize_nf4(torch.randn(64, 128))
    packed_dq, state_dq = quantize_nf4(torch.randn(512, 128), double_quant=True)  # 1024 blocks: 4 nested scales
    with pytest.raises(ValueError, match="4 nested scales of 1024 block scales, got torch.uint8 codes and 3 nested"):
        dequantize_nf4(packed_dq, dataclasses.replace(state_dq, nested_absmax=state_dq.nested_absmax[:3]))
    with pytest.raises(ValueError, match="uint8 codes of its block scales"):
        dequantize_nf4(packed_dq, dataclasses.replace(state_dq, absmax=state_dq.absmax.float()))
    with pytest.raises(ValueError, match="does not fit the codes"):
        dequantize_nf4(packed, dataclasses.replace(state, blocksize=128))
    with pytest.raises(ValueError, match="does not fit the codes"):
        dequantize_nf4(packed[:1024], state)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_nf4(packed.view(torch.int8), state)
    with pytest.raises(ValueError, match="contiguous float32"):
        dequantize_nf4(packed, state, out=torch.empty(2 * 64 * 128, 2)[:, 0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(bad):
    w = torch.randn(64, 128)
    w[3, 70] = bad  # the second block of row 3
    with pytest.raises(ValueError, match="NF4 quantization needs finite weights"):
        quantize_nf4(w)
    linear = nn.Linear(128, 64)
    with torch.no_grad():
        linear.weight.copy_(w)
    for cls in (Linear4bit, Linear8bit):
        with pytest.raises(ValueError, match="cannot quantize a weight that holds NaN or inf"):
            cls.from_linear(linear)


# ---- LLM.int8() ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,))
@pytest.mark.parametrize("threshold", [0.0, 6.0, 1.5])
def test_vectorwise_quantize_matches_bitsandbytes(dtype, threshold):
    x = (torch.randn(33, 80, generator=torch.Generator().manual_seed(1)) * 2).to(dtype)
    x[5] = 0  # an all-zero row
    x_before = x.clone()
    ref = bnbF.int8_vectorwise_quant(x.clone(), threshold)
    ours = vectorwise_quantize(x, threshold)
    assert torch.equal(x, x_before)
    assert torch.equal(ours[0], ref[0]) and ours[0].dtype == torch.int8
    assert torch.equal(ours[1], ref[1]) and ours[1].dtype == torch.float32
    if threshold == 0:
        assert ours[2] is None and ref[2] is None
    else:
        assert ours[2].numel() > 0 and torch.equal(ours[2], ref[2])


def test_int8_matmul_is_exact():
    """K = 4096: partial sums exceed 2^24, where a float32 accumulation would start rounding."""
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-127, 128, (8, 4096), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (16, 4096), dtype=torch.int8, generator=g)
    a[0], b[0] = 127, 127  # sum = 4096 · 127² ≈ 6.6e7
    out = int8_matmul(a, b)
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), a.long() @ b.long().t())


def test_int8_bad_dtype():
    with pytest.raises(ValueError, match="floating-point"):
        vectorwise_quantize(torch.ones(4, 4, dtype=torch.int32))  # bitsandbytes would quantize it
    with pytest.raises(ValueError, match="floating-point"):
        vectorwise_quantize(torch.ones(4, 4, dtype=torch.complex64))


# ---- quantized linear layers ---------------------------------------------------------------------

def fp16_exact_linear(in_features, out_features, seed=0):
    """A linear layer whose weight and bias are exactly representable in float16."""
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    for p in linear.parameters():
        p.data = p.data.half().float()
    return linear


def inputs(shape, seed=3, outlier_column=None):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if outlier_column is not None:
        x[..., outlier_column] *= 12
    return x.half().float()


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("in_features", [256, 96])  # 96: 64-blocks straddle rows
def test_bnb_backend_equals_ours(double_quant, in_features):
    linear = fp16_exact_linear(in_features, 96)
    ours = Linear4bit.from_linear(linear, double_quant=double_quant)
    via_bnb = Linear4bit.from_linear(linear, double_quant=double_quant, backend="bnb")
    for name, buffer in ours.named_buffers():
        assert torch.equal(buffer, getattr(via_bnb, name)), name
    assert torch.equal(ours.dequantized_weight(), via_bnb.dequantized_weight())
    x = inputs((4, 5, in_features))
    assert torch.equal(ours(x), via_bnb(x))


@pytest.mark.parametrize("double_quant", [False, True])
def test_linear4bit_matches_dequantized_linear_and_bitsandbytes(double_quant):
    linear = fp16_exact_linear(256, 96)
    x = inputs((4, 5, 256))
    ours = Linear4bit.from_linear(linear, double_quant=double_quant)

    w = ours.dequantized_weight()
    assert w.shape == (96, 256) and w.dtype == torch.float32
    y = ours(x)
    torch.testing.assert_close(y, F.linear(x, w, linear.bias), rtol=0, atol=1e-5)

    reference = bnb.nn.Linear4bit(256, 96, compute_dtype=torch.float32, compress_statistics=double_quant,
                                  quant_type="nf4")
    reference.load_state_dict(linear.state_dict())
    reference = reference.to("cpu").eval()  # .to(device) is where bitsandbytes quantizes
    with torch.no_grad():
        y_ref = reference(x)
    if bnbF.has_avx512bf16():
        # eval-mode CPU kernel computes in bfloat16 on such CPUs: ~0.3% relative error per output
        tolerance = 1e-2 * y_ref.abs().max().item()
    else:
        # dequantize + F.linear like ours, where our product is oneDNN's (another summation order) and
        # we add the bias after it, bnb inside (measured max difference 1.3e-6 on outputs of size ~1)
        tolerance = 4e-6
    torch.testing.assert_close(y, y_ref, rtol=0, atol=tolerance)

    # bitsandbytes' fp32 path, on every CPU (tests/bnb_reference.py)
    reference = bnb.nn.Linear4bit(256, 96, compute_dtype=torch.float32, compress_statistics=double_quant,
                                  quant_type="nf4")
    reference.load_state_dict(linear.state_dict())
    reference = fp32_linear4bit(reference.to("cpu").eval())
    with torch.no_grad():  # oneDNN's summation order against torch.matmul's: 1.3e-6 measured
        torch.testing.assert_close(y, reference(x), rtol=0, atol=4e-6)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_linear8bit_matches_bitsandbytes(threshold):
    # bitsandbytes casts x and W to float16 before quantizing; fp16-exact inputs make that a no-op
    linear = fp16_exact_linear(256, 96)
    x = inputs((4, 5, 256), outlier_column=7)
    ours = Linear8bit.from_linear(linear, threshold=threshold)
    via_bnb = Linear8bit.from_linear(linear, threshold=threshold, backend="bnb")
    reference = bnb.nn.Linear8bitLt(256, 96, has_fp16_weights=False, threshold=threshold)
    reference.load_state_dict(linear.state_dict())
    reference = reference.to("cpu").eval()  # training mode on CPU would dequantize instead of int8
    with torch.no_grad():
        y_ref = reference(x)
    assert torch.equal(ours.weight_int8, reference.state.CB)
    assert torch.equal(ours.weight_absmax, reference.state.SCB)
    assert torch.equal(via_bnb.weight_int8, ours.weight_int8)

    y = ours(x)
    # bitsandbytes scales the int32 product by the constant 6.200124e-05 where 1/127² is
    # 6.2000124e-05 (1.8e-5 relative); measured max difference 5.7e-5 on outputs up to 3.2.
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y, y_ref, rtol=0, atol=3e-5 * scale)
    # our bnb backend only differs from bnb's module in where the bias is added
    torch.testing.assert_close(via_bnb(x), y_ref, rtol=0, atol=1e-6 * scale)


def test_linear8bit_outlier_decomposition_helps():
    """One input column 12x larger: holding it out of the int8 product cuts the error."""
    linear = fp16_exact_linear(256, 96)
    x = inputs((64, 256), outlier_column=7)
    exact = linear(x)
    errors = {t: (Linear8bit.from_linear(linear, threshold=t)(x) - exact).abs().max().item() for t in (0.0, 6.0)}
    assert errors[6.0] < errors[0.0] / 2


@pytest.mark.parametrize("layer_cls, options", [(Linear4bit, {"double_quant": True}), (Linear8bit, {})])
def test_quantized_linear_backward(layer_cls, options):
    """Frozen base: only x gets a gradient, dL/dx = dL/dy · Ŵ (straight-through for the int8 rounding)."""
    layer = layer_cls.from_linear(nn.Linear(128, 64), **options)
    assert all(not p.requires_grad for p in layer.parameters())
    x = torch.randn(3, 128, requires_grad=True)
    grad_y = torch.randn(3, 64)
    layer(x).backward(grad_y)
    reference = grad_y @ layer.dequantized_weight()
    torch.testing.assert_close(x.grad, reference, rtol=0, atol=1e-6 * reference.abs().max().item())


@pytest.mark.parametrize("layer_cls, options", [(Linear4bit, {}), (Linear4bit, {"double_quant": True}),
                                                (Linear8bit, {})])
@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("cpu", torch.float16)])
def test_casting_the_model_keeps_the_quantization_constants(layer_cls, options, cast):
    """Ŵ does not move when a model is cast to another dtype, as bitsandbytes' does not."""
    linear = nn.Linear(128, 64)
    nn.init.normal_(linear.weight, std=0.02)
    layer = layer_cls.from_linear(linear, **options)
    before = layer.dequantized_weight().clone()
    constants = [name for name, b in layer.named_buffers() if b.is_floating_point()]
    assert constants  # the test would otherwise check nothing
    cast(layer)
    assert all(getattr(layer, name).dtype == torch.float32 for name in constants)
    assert torch.equal(layer.dequantized_weight(), before)


@pytest.mark.parametrize("layer_cls", [Linear4bit, Linear8bit])
def test_conv1d_input(layer_cls):
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(96, 128)  # weight (in=128, out=96)
    nn.init.normal_(conv.weight, std=0.02)
    nn.init.normal_(conv.bias, std=0.02)
    linear = nn.Linear(128, 96)
    linear.weight.data, linear.bias.data = conv.weight.data.t().clone(), conv.bias.data.clone()
    from_conv, from_linear = layer_cls.from_linear(conv), layer_cls.from_linear(linear)
    assert (from_conv.in_features, from_conv.out_features) == (128, 96)
    assert torch.equal(from_conv.dequantized_weight(), from_linear.dequantized_weight())
    x = torch.randn(2, 7, 128)
    assert torch.equal(from_conv(x), from_linear(x))
    torch.testing.assert_close(from_conv(x), conv(x), rtol=0, atol=0.1 * conv(x).abs().max().item())


def test_state_dict_roundtrip_and_requantize():
    linear = nn.Linear(128, 64)
    layer = Linear4bit.from_linear(linear, double_quant=True)
    state = layer.state_dict()
    assert set(state) == {"weight_packed", "absmax", "nested_absmax", "absmax_offset", "bias"}
    assert not any(t.is_floating_point() and t.numel() >= 64 * 128 for t in state.values())
    fresh = Linear4bit(128, 64, double_quant=True)
    fresh.load_state_dict(state)
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), layer(x))

    new_weight = torch.randn(64, 128)
    fresh.requantize_(new_weight)
    packed, nf4_state = quantize_nf4(new_weight, 64, double_quant=True)
    assert torch.equal(fresh.dequantized_weight(), dequantize_nf4(packed, nf4_state))
    with pytest.raises(ValueError, match=r"expected a \(64, 128\) weight"):
        fresh.requantize_(new_weight.t())


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense, self.out_proj = nn.Linear(64, 64), nn.Linear(64, 2)

    def forward(self, h):
        return self.out_proj(torch.tanh(self.dense(h)))


class MiniModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 64)
        self.blocks = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        self.norm = nn.LayerNorm(64)
        self.pre_classifier = nn.Linear(64, 64)
        self.classifier = Head()
        self.lm_head = nn.Linear(64, 50, bias=False)

    def forward(self, ids):
        h = self.norm(self.blocks(self.embed(ids)))
        return self.lm_head(h), self.classifier(self.pre_classifier(h))


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_model_skips_heads_and_counts_bytes(bits):
    torch.manual_seed(0)
    model = MiniModel()
    ids = torch.randint(0, 50, (2, 9))
    reference = [y.detach() for y in model(ids)]
    sizes_before = model_bytes(model)

    quantize_model(model, bits=bits)
    layer_cls = Linear4bit if bits == 4 else Linear8bit
    assert isinstance(model.blocks[0], layer_cls) and isinstance(model.blocks[2], layer_cls)
    for name in ("pre_classifier", "classifier.dense", "classifier.out_proj", "lm_head"):
        assert type(model.get_submodule(name)) is nn.Linear, name
    # measured relative errors: ~0.14 for NF4 (uniform-initialised weights, two layers), ~0.013 for int8
    for y, y_ref in zip(model(ids), reference):
        assert (y - y_ref).norm() / y_ref.norm() < {4: 0.25, 8: 0.03}[bits]

    sizes = model_bytes(model)
    n = 64 * 128 * 2  # quantized weights
    if bits == 4:
        assert sizes["quantized_weights"] == n // 2
        assert sizes["quant_constants"] == 4 * n // 64  # one float32 absmax per 64 weights
    else:
        assert sizes["quantized_weights"] == n
        assert sizes["quant_constants"] == 4 * (128 + 64)  # one float32 scale per output row
    assert sizes["other_params"] == sizes_before["total"] - 4 * n
    assert sizes["total"] == sum(v for k, v in sizes.items() if k != "total")


def test_double_quant_shrinks_constants_and_bad_options():
    sizes = {dq: model_bytes(quantize_model(nn.Sequential(nn.Linear(512, 512)), double_quant=dq)) for dq in (False, True)}
    assert sizes[True]["quant_constants"] < sizes[False]["quant_constants"] / 3
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), bits=3)
    with pytest.raises(ValueError, match="backend"):
        Linear4bit.from_linear(nn.Linear(64, 64), backend="cuda")
    with pytest.raises(TypeError, match="nn.Linear or Conv1D"):
        Linear8bit.from_linear(nn.Conv2d(3, 3, 1))
