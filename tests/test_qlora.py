"""QLoRA: quantized loading (models/loading.py, quant=) + LoRA on the quantized base (lora/).

References, all built in the test from the tiny random checkpoints of tests/tiny.py:
  * peft's QLoRA: transformers' own 4-bit NF4 load (BitsAndBytesConfig, bitsandbytes on the CPU)
    + peft.get_peft_model, with our adapter weights copied in (random non-zero B);
  * the fp32 transformers model whose quantized linear weights were replaced by bitsandbytes'
    dequantization of bitsandbytes' own quantization of the checkpoint weight (a reference
    that computes in fp32 whatever the CPU, independent of quant/);
  * for int8 (LLM.int8 quantizes activations too, so a dequantized-weight model is not the same
    function), the fp32 transformers model whose linears compute quant.int8_linear with
    bitsandbytes' int8 weight codes (int8_linear itself is checked against bitsandbytes in
    tests/test_quant.py).
Checked: logits equal peft's QLoRA; every non-head linear is quantized with buffers bit-equal to
quantize_nf4 / vectorwise_quantize (and to bitsandbytes) of the checkpoint weight, heads stay
fp32; only LoRA factors get gradients (equal to the fp32 reference's) and training lowers the
loss without touching the quantized base; merging into the quantized base warns and requantizes
W + ΔW; a QLoRA adapter file equals the fp32 model's; a bad `quant` fails clearly.
"""
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from lora import (AdapterError, LoRALinear, LoraConfig, apply_lora, load_adapter, merge_adapter, merge_and_unload,
                  save_adapter)
from models import load_model, save_model
from models.loading import LoadError
from quant import (Linear4bit, Linear8bit, dequantize_model, int8_linear, quantize_model, quantize_nf4,
                   vectorwise_quantize)
from bnb_reference import bnb_dequantize, fp32_linear4bit
from tiny import NUM_LABELS, PEFT_TASK, load_hf, random_ids, run_ours, write_checkpoint

bnb = pytest.importorskip("bitsandbytes")
bnbF = pytest.importorskip("bitsandbytes.functional")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("quiet_warnings")

QUANTS = ("nf4", "nf4-dq", "int8")
R, ALPHA = 4, 8
PEFT_PREFIX = "base_model.model."
# LoRA targets: all linears for gpt2/qwen2 (as in the QLoRA paper), a mix elsewhere; nn.Linear with and
# without bias, GPT-2's Conv1D
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
           "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "llama": ["q_proj", "v_proj", "down_proj"], "llama-tied": ["q_proj", "v_proj", "down_proj"],
           # not plain "dense": apply_lora would also wrap bert.pooler.dense, inside the pooler that BERT
           # seq-cls trains as a module to save, and such an adapter file does not load back (peft
           # leaves targets inside modules_to_save alone); a lora/adapters.py issue, not a QLoRA one
           "bert": ["query", "value", "attention.output.dense", "intermediate.dense"],
           "distilbert": ["q_lin", "v_lin", "lin1"]}
HEADS = ("lm_head", "score", "classifier", "pooler")  # full-precision modules (and everything inside)
WIDE = {"gpt2": {"n_embd": 64}, "qwen2": {"hidden_size": 64, "intermediate_size": 128}}  # in_features % 64 == 0


# ------------------------------------------------------------------ helpers


def is_head(name):
    return any(f".{h}." in f".{name}." for h in HEADS)


def is_linear(module):
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def checkpoint_weights(folder):
    (file,) = folder.glob("*.safetensors")
    return load_file(str(file))


def weight_out_in(module, tensor):
    """A checkpoint weight as (out, in): GPT-2's Conv1D stores (in, out)."""
    return tensor.t().contiguous() if type(module).__name__ == "Conv1D" else tensor


def bnb_nf4(weight, double_quant):
    return bnbF.quantize_4bit(weight.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=double_quant)


def bnb_dequantized(weight, quant):
    """bitsandbytes' NF4 round trip of `weight` (out, in), float32."""
    return bnb_dequantize(*bnb_nf4(weight, quant == "nf4-dq"))


class Int8Reference(nn.Module):
    """y = LLM.int8(x, W) + b with bitsandbytes' int8 codes of W (of a float16 copy, as its Int8Params takes
    them); replaces a transformers linear."""

    def __init__(self, weight, bias):  # weight (out, in)
        super().__init__()
        self.weight_int8, self.weight_absmax, _ = bnbF.int8_vectorwise_quant(weight.half().contiguous())
        self.bias = bias

    def forward(self, x):
        y = int8_linear(x.reshape(-1, x.shape[-1]), self.weight_int8, self.weight_absmax, self.bias, threshold=6.0)
        return y.view(*x.shape[:-1], -1)


def reference_model(folder, family, task, quant):
    """The fp32 transformers model computing what `quant` makes of its non-head linear layers."""
    model = load_hf(folder, family, task)
    for name, module in list(model.named_modules()):
        if not is_linear(module) or is_head(name):
            continue
        weight = weight_out_in(module, module.weight.detach())
        if quant == "int8":
            model.set_submodule(name, Int8Reference(weight, None if module.bias is None else module.bias.detach()))
        else:
            with torch.no_grad():
                module.weight.copy_(weight_out_in(module, bnb_dequantized(weight, quant)))  # transposes back
    return model


def ours_quantized(folder, task, quant):
    return load_model(folder, task=task, num_labels=NUM_LABELS, quant=quant)[0]


def inputs(family, batch=2, length=9, seed=0):
    ids = random_ids(family, batch, length, seed=seed)
    mask = torch.ones_like(ids)
    if family == "bert":
        mask[1, -2:] = 0  # a padded encoder row (decoders stay unpadded)
    return ids, mask


def run_ref(model, ids, mask, grad=False):
    with torch.set_grad_enabled(grad):
        return model(input_ids=ids, attention_mask=mask).logits


def lora_keys(model, prefix=""):
    return sorted(k[len(prefix):] for k in model.state_dict() if ".lora_" in k)


def randomize_lora(model, seed=1):
    """Random non-zero B (A keeps its random kaiming init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def copy_lora(src, dst, dst_prefix=""):
    """Copy the LoRA factors of `src` (our names) into `dst` (ours, or peft's under `dst_prefix`)."""
    src_state, dst_state = src.state_dict(), dst.state_dict()
    keys = lora_keys(src)
    assert keys == lora_keys(dst, dst_prefix) and keys
    with torch.no_grad():
        for key in keys:
            dst_state[dst_prefix + key].copy_(src_state[key])


def our_config(family, task):
    return LoraConfig(r=R, alpha=ALPHA, target_modules=list(TARGETS[family]),
                      modules_to_save=[] if task == "seq-cls" else None)


def peft_config(family, task):
    return peft.LoraConfig(task_type=PEFT_TASK[task], r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                           target_modules=list(TARGETS[family]))


def qlora(folder, family, task, quant="nf4", seed=1):
    """Our QLoRA model: quantized load + LoRA on the targets, random B, eval mode."""
    model = apply_lora(ours_quantized(folder, task, quant), our_config(family, task))
    randomize_lora(model, seed)
    return model.eval()


def bnb_4bit_model(folder):
    """transformers' own QLoRA base: a bitsandbytes NF4 load (fp32 compute) of a causal-LM checkpoint,
    kept on bitsandbytes' fp32 path on every CPU (tests/bnb_reference.py)."""
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=torch.float32)
    return fp32_linear4bit(transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=bnb_config, device_map="cpu", attn_implementation="eager",
        dtype=torch.float32).eval())


def peft_qlora(folder, family, task):
    """peft's QLoRA: the bitsandbytes NF4 model + get_peft_model."""
    return peft.get_peft_model(bnb_4bit_model(folder), peft_config(family, task)).eval()


def check_close(ours, ref, atol, what):
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    torch.testing.assert_close(ours, ref, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


def assert_differs(a, b, what, by=1e-2):
    assert (a - b).abs().max() > by, f"{what}: outputs are the same, the test would not see a difference"


# ------------------------------------------------------------------ 1. logits equal peft's QLoRA


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_qlora_logits_match_peft(tmp_path, family):
    task = "causal-lm"
    # rows a whole number of 64-blocks: bitsandbytes' AVX512 kernels misread blocks that straddle
    # rows (tests/bnb_reference.py), and peft's model runs on them
    folder = tmp_path / "checkpoint"
    write_checkpoint(folder, family, task, **WIDE[family])
    ours = qlora(folder, family, task)
    ref = peft_qlora(folder, family, task)
    inner = ref.base_model.model
    # the base is bitsandbytes 4-bit NF4 on both sides, byte for byte, on the same layers
    ours_quantized = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    ref_quantized = {n: m for n, m in inner.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert ours_quantized.keys() == ref_quantized.keys()
    assert len(ours_quantized) == 2 * {"gpt2": 4, "qwen2": 7}[family]  # every linear of both layers
    for name, layer in ours_quantized.items():
        ref_layer = ref_quantized[name]
        assert torch.equal(layer.weight_packed, ref_layer.weight.data), name
        assert torch.equal(layer.absmax, ref_layer.weight.quant_state.absmax), name
    # our QLoRA layer sits where peft's does; copy our adapter into peft's model
    wrapped = sorted(n for n, m in ours.named_modules() if isinstance(m, LoRALinear))
    assert wrapped == sorted(n[len(PEFT_PREFIX):] for n, m in ref.named_modules()
                             if isinstance(m, peft.tuners.lora.bnb.Linear4bit))
    copy_lora(ours, ref, PEFT_PREFIX)

    ids, mask = inputs(family)
    ours_logits = run_ours(ours, ids, mask)
    atol = 1e-4  # dequantize + fp32 linear on both sides; measured max difference 4.3e-6 on logits up to 6.8
    check_close(ours_logits, run_ref(ref, ids, mask), atol, f"{family} QLoRA vs peft QLoRA")

    # fp32 reference regardless of the CPU: plain peft LoRA on the model with bitsandbytes'
    # dequantized weights; only the summation order differs (measured max difference ~3e-6)
    fp32_ref = peft.get_peft_model(reference_model(folder, family, task, "nf4"), peft_config(family, task)).eval()
    copy_lora(ours, fp32_ref, PEFT_PREFIX)
    check_close(ours_logits, run_ref(fp32_ref, ids, mask), 1e-5, f"{family} QLoRA vs fp32 dequantized + LoRA")

    # the adapter matters, and so does the quantization (else this test would not see either)
    plain_fp32 = run_ref(load_hf(folder, family, task), ids, mask)
    ref.disable_adapter_layers()
    no_adapter = run_ref(ref, ids, mask)
    ref.enable_adapter_layers()
    assert_differs(ours_logits, no_adapter, "adapter vs QLoRA base")
    assert_differs(no_adapter, plain_fp32, "NF4 base vs fp32 base")

    # our saved QLoRA adapter loads into peft's QLoRA model and gives our logits
    save_adapter(ours, tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(bnb_4bit_model(folder), str(tmp_path / "adapter")).eval()
    check_close(run_ref(loaded, ids, mask), ours_logits, atol, f"{family} our file in peft's QLoRA")


@pytest.mark.parametrize("family,skip", [("bert", ["classifier", "pooler.dense"]),
                                         ("distilbert", ["classifier", "pre_classifier"])])
def test_an_encoder_classifiers_qlora_adapter_loads_into_peft_with_its_full_modules_skipped(tmp_path, family, skip):
    """Our default modules to save (the head, and BERT's pooler / DistilBERT's pre_classifier) stay unquantized;
    transformers quantizes them unless told to skip them (README), and peft then failed on them ("only Tensors
    of floating point dtype can require gradients")."""
    folder, task = tmp_path / "checkpoint", "seq-cls"
    width = {"bert": {"hidden_size": 64, "intermediate_size": 128}, "distilbert": {"dim": 64, "hidden_dim": 128}}
    write_checkpoint(folder, family, task, **width[family])
    ours = apply_lora(ours_quantized(folder, task, "nf4"),
                      LoraConfig(r=R, alpha=ALPHA, target_modules=list(TARGETS[family])))
    for name, p in ours.named_parameters():  # trained LoRA factors and head copies
        if ".lora_B." in name or ".modules_to_save." in name:
            with torch.no_grad():
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    save_adapter(ours.eval(), tmp_path / "adapter")
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip)
    base = fp32_linear4bit(transformers.AutoModelForSequenceClassification.from_pretrained(
        str(folder), quantization_config=bnb_config, device_map="cpu", attn_implementation="eager",
        dtype=torch.float32).eval())
    ref = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    ids, mask = inputs(family)
    ours_logits = run_ours(ours, ids, mask)
    check_close(ours_logits, run_ref(ref, ids, mask), 1e-4, f"{family} QLoRA classifier in peft")
    assert_differs(ours_logits, run_ours(ours_quantized(folder, task, "nf4"), ids, mask), "adapter vs base")


# ------------------------------------------------------------------ 2. quantized loading


LOAD_CASES = [("gpt2", "causal-lm"), ("qwen2", "causal-lm"), ("llama", "seq-cls"), ("llama-tied", "causal-lm"),
              ("bert", "seq-cls")]


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("family,task", LOAD_CASES)
def test_quantized_loading(tiny, family, task, quant):
    folder, hf = tiny.get(family, task)
    model = ours_quantized(folder, task, quant)
    ckpt = checkpoint_weights(folder)
    layer_cls = Linear8bit if quant == "int8" else Linear4bit

    hf_linears = {n: m for n, m in hf.named_modules() if is_linear(m)}
    expected_quantized = sorted(n for n in hf_linears if not is_head(n))
    expected_heads = sorted(n for n in hf_linears if is_head(n))
    assert expected_quantized and expected_heads
    assert sorted(n for n, m in model.named_modules() if isinstance(m, layer_cls)) == expected_quantized
    assert sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear)) == expected_heads
    assert not any(is_linear(m) for n, m in model.named_modules() if not is_head(n)), "a linear left unquantized"
    for name in expected_heads:  # heads keep the checkpoint's fp32 weights
        head = model.get_submodule(name)
        assert head.weight.dtype == torch.float32
        if f"{name}.weight" in ckpt:
            assert torch.equal(head.weight, ckpt[f"{name}.weight"]), name
        else:  # a tied LM head (GPT-2, llama-tied): the fp32 input embedding itself
            assert name == "lm_head" and head.weight is model.get_submodule(
                "transformer" if family == "gpt2" else "model").get_input_embeddings().weight

    for name in expected_quantized:
        layer = model.get_submodule(name)
        weight = weight_out_in(hf_linears[name], ckpt[f"{name}.weight"])  # (out, in)
        assert (layer.out_features, layer.in_features) == weight.shape
        assert not list(layer.parameters(recurse=False)) or all(not p.requires_grad for p in layer.parameters())
        assert not hasattr(layer, "weight"), f"{name} keeps a full-precision weight"
        if hf_linears[name].bias is None:
            assert layer.bias is None
        else:
            assert torch.equal(layer.bias, ckpt[f"{name}.bias"]), name
        if quant == "int8":
            codes, absmax, _ = vectorwise_quantize(weight.half())  # bnb's Int8Params quantizes a float16 copy
            assert torch.equal(layer.weight_int8, codes) and torch.equal(layer.weight_absmax, absmax), name
            ref_codes, ref_absmax, _ = bnbF.int8_vectorwise_quant(weight.half().contiguous())
            assert torch.equal(layer.weight_int8, ref_codes) and torch.equal(layer.weight_absmax, ref_absmax), name
        else:
            double_quant = quant == "nf4-dq"
            assert layer.double_quant == double_quant
            packed, state = quantize_nf4(weight, 64, double_quant)
            ref_packed, ref_state = bnb_nf4(weight, double_quant)
            assert torch.equal(layer.weight_packed, packed) and torch.equal(layer.weight_packed, ref_packed), name
            assert torch.equal(layer.absmax, state.absmax) and torch.equal(layer.absmax, ref_state.absmax), name
            if double_quant:
                assert torch.equal(layer.nested_absmax, state.nested_absmax), name
                assert torch.equal(layer.nested_absmax, ref_state.state2.absmax), name
                assert torch.equal(layer.absmax_offset, state.offset), name
            else:
                assert layer.nested_absmax is None and layer.absmax_offset is None

    ids, mask = inputs(family)
    logits = run_ours(model, ids, mask)
    reference = reference_model(folder, family, task, quant)
    # fp32 on both sides, the same quantized weights; measured max difference ~1e-6
    check_close(logits, run_ref(reference, ids, mask), 1e-5, f"{family} {task} {quant}")
    assert_differs(logits, run_ref(hf, ids, mask), "quantized vs fp32", by=1e-3)


# ------------------------------------------------------------------ 3. gradients and training


def lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.mark.parametrize("family,quant", [("qwen2", "nf4"), ("gpt2", "nf4-dq"), ("gpt2", "int8"),
                                          ("qwen2", "int8")])
def test_gradients_reach_lora_only_and_training_lowers_loss(tiny, family, quant):
    task = "causal-lm"
    folder = tiny.folder(family, task)
    model = qlora(folder, family, task, quant)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (Linear4bit, Linear8bit))}
    assert quantized and all(isinstance(model.get_submodule(n.rsplit(".", 1)[0]), LoRALinear)
                             for n in quantized if n.endswith(".base_layer"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), sorted(trainable)[:3]
    for name, layer in quantized.items():
        assert not any(p.requires_grad for p in layer.parameters()), name
        assert not any(b.requires_grad for b in layer.buffers()), name

    ids, _ = inputs(family, batch=2, length=12, seed=5)
    mask = torch.ones_like(ids)
    lm_loss(run_ours(model, ids, mask, grad=True), ids).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".lora_")[1][0] for n in grads} == {"A", "B"}
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, name
    leaked = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    leaked += [f"{n}.{b}" for n, m in quantized.items() for b, t in m.named_buffers() if t.grad is not None]
    assert not leaked, f"frozen tensors got gradients: {leaked[:3]}"

    if quant != "int8":  # NF4's backward is exact: dL/dx = dL/dy · Ŵ with the dequantized Ŵ
        ref = peft.get_peft_model(reference_model(folder, family, task, quant), peft_config(family, task))
        copy_lora(model, ref, PEFT_PREFIX)
        lm_loss(run_ref(ref.eval(), ids, mask, grad=True), ids).backward()
        ref_grads = {n[len(PEFT_PREFIX):]: p.grad for n, p in ref.named_parameters() if p.requires_grad}
        assert ref_grads.keys() == grads.keys()
        for name, grad in grads.items():
            check_close(grad, ref_grads[name], 1e-5, f"grad {name}")

    buffers = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    before = lm_loss(run_ours(model.eval(), ids, mask), ids).item()
    model.train()
    for _ in range(5):
        optimizer.zero_grad()
        lm_loss(run_ours(model, ids, mask, grad=True), ids).backward()
        optimizer.step()
    after = lm_loss(run_ours(model.eval(), ids, mask), ids).item()
    assert after < 0.9 * before, (before, after)
    for key, value in model.state_dict().items():  # the quantized base and everything else untouched
        if ".lora_" not in key:
            assert torch.equal(value, buffers[key]), key


# ------------------------------------------------------------------ 4. merging and saving


@pytest.mark.parametrize("quant", QUANTS)
def test_merge_into_quantized_base_requantizes(tiny, quant):
    family, task = "qwen2", "causal-lm"
    folder = tiny.folder(family, task)
    model = qlora(folder, family, task, quant)
    ids, mask = inputs(family)
    unmerged = run_ours(model, ids, mask)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    expected, before = {}, {}
    with torch.no_grad():
        for name, layer in layers.items():
            base = layer.base_layer
            before[name] = {k: v.clone() for k, v in base.state_dict().items()}
            target = base.dequantized_weight() + layer.scaling["default"] * (layer.lora_B["default"].weight
                                                                               @ layer.lora_A["default"].weight)
            if quant == "int8":
                codes, absmax, _ = vectorwise_quantize(target.half())  # peft's merge makes a new Int8Params
                expected[name] = {"weight_int8": codes, "weight_absmax": absmax}
            else:
                packed, state = quantize_nf4(target, 64, quant == "nf4-dq")
                expected[name] = {"weight_packed": packed, "absmax": state.absmax}
                if quant == "nf4-dq":
                    expected[name].update(nested_absmax=state.nested_absmax, absmax_offset=state.offset)

    with pytest.warns(UserWarning, match="requantize"):
        merge_adapter(model)
    assert all(layer.merged for layer in layers.values())
    for name, layer in layers.items():
        state = layer.base_layer.state_dict()
        for key, value in expected[name].items():
            assert torch.equal(state[key], value), f"{name}.{key}"
        codes = "weight_int8" if quant == "int8" else "weight_packed"
        assert not torch.equal(state[codes], before[name][codes]), f"{name}: the merge changed no code"
        if "bias" in state:  # LoRA does not touch the bias
            assert torch.equal(state["bias"], before[name]["bias"]), name

    merged = run_ours(model, ids, mask)
    # requantizing rounds W + ΔW, so the merged model is only near the unmerged one; it must still
    # be clearly nearer to it than the base model without the adapter is
    with torch.no_grad():
        base_only = run_ours(ours_quantized(folder, task, quant), ids, mask)
    # measured ratios 0.38 (nf4), 0.39 (nf4-dq), 0.04 (int8)
    merge_error = (merged - unmerged).norm()
    assert 0 < merge_error < {"nf4": 0.6, "nf4-dq": 0.6, "int8": 0.1}[quant] * (base_only - unmerged).norm()

    plain = merge_and_unload(model)  # a plain quantized model holding the same merged codes
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    for name in layers:
        state = plain.get_submodule(name).state_dict()
        for key, value in expected[name].items():
            assert torch.equal(state[key], value), f"unloaded {name}.{key}"
    check_close(run_ours(plain, ids, mask), merged, 0, "merge_and_unload vs merged")


@pytest.mark.parametrize("family,task,quant", [("qwen2", "causal-lm", "nf4"), ("gpt2", "causal-lm", "nf4-dq"),
                                               ("llama-tied", "causal-lm", "nf4"), ("bert", "seq-cls", "int8")])
def test_merge_into_full_precision_copy_and_export(tiny, tmp_path, family, task, quant):
    """dequantize_model + merge_and_unload: every layer holds exactly Ŵ + ΔW in fp32 (no requantization),
    GPT-2 gets its Conv1D layout back, and the saved checkpoint loads in ours and in transformers."""
    folder = tiny.folder(family, task)
    model = qlora(folder, family, task, quant)
    ids, mask = inputs(family)
    unmerged = run_ours(model, ids, mask)
    expected = {}
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, LoRALinear):
                delta = layer.scaling["default"] * (layer.lora_B["default"].weight @ layer.lora_A["default"].weight)
                expected[name] = layer.base_layer.dequantized_weight() + delta  # (out, in)
    quantized_names = {name for name, m in model.named_modules() if isinstance(m, (Linear4bit, Linear8bit))}
    types = {name: type(m).__name__ for name, m in load_model(folder, task=task, num_labels=NUM_LABELS)[0].named_modules()}

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no requantization warning: nothing is rounded
        merged = merge_and_unload(dequantize_model(model))
    assert not any(isinstance(m, (LoRALinear, Linear4bit, Linear8bit)) for m in merged.modules())
    for name in quantized_names:  # the original layer type (nn.Linear or Conv1D), fp32
        layer = merged.get_submodule(name.removesuffix(".base_layer"))
        assert type(layer).__name__ == types[name.removesuffix(".base_layer")] and layer.weight.dtype == torch.float32
    for name, weight in expected.items():
        layer = merged.get_submodule(name)
        stored = layer.weight.t() if type(layer).__name__ == "Conv1D" else layer.weight
        assert torch.equal(stored, weight), name
    # int8 computes with quantized activations, so only the weight-only formats are the same function
    exported = run_ours(merged, ids, mask)
    if quant != "int8":
        check_close(exported, unmerged, 2e-5, "merged full-precision copy vs unmerged QLoRA")

    tokenizer = load_model(folder, task=task, num_labels=NUM_LABELS)[1]
    save_model(merged, tmp_path / "export", tokenizer)
    again, _ = load_model(tmp_path / "export", task=task, num_labels=NUM_LABELS)
    again_state = again.state_dict()
    assert merged.state_dict().keys() == again_state.keys()
    assert all(torch.equal(t, again_state[k]) for k, t in merged.state_dict().items())
    # same weights, but MKL's small products depend on operand alignment (the reloaded weights are
    # not 64-byte aligned); measured 4.8e-7
    check_close(run_ours(again, ids, mask), exported, 1e-6, "our reload of the export")
    hf = load_hf(tmp_path / "export", family, task)
    check_close(run_ref(hf, ids, mask), exported, 1e-5, "transformers' load of the export")


def test_save_model_refuses_wrapped_layers(tiny, tmp_path):
    model = qlora(tiny.folder("qwen2", "causal-lm"), "qwen2", "causal-lm")
    with pytest.raises(ValueError, match="merge_and_unload / dequantize_model"):
        save_model(model, tmp_path / "out")
    with pytest.raises(ValueError, match="merge_and_unload / dequantize_model"):
        save_model(merge_and_unload(model), tmp_path / "out")  # merged into the 4-bit base: still quantized


@pytest.mark.parametrize("family,task,quant", [("qwen2", "causal-lm", "nf4"), ("gpt2", "causal-lm", "nf4-dq"),
                                               ("bert", "seq-cls", "int8")])
def test_saved_qlora_adapter_equals_fp32_adapter(tiny, tmp_path, family, task, quant):
    folder = tiny.folder(family, task)
    config = LoraConfig(r=R, alpha=ALPHA, target_modules=list(TARGETS[family]))  # seq-cls: head saved too
    quantized = apply_lora(ours_quantized(folder, task, quant), config)
    randomize_lora(quantized)
    fp32 = apply_lora(load_model(folder, task=task, num_labels=NUM_LABELS)[0], config)
    fp32_state, q_state = fp32.state_dict(), quantized.state_dict()
    trained = sorted(k for k in q_state if ".lora_" in k or ".modules_to_save." in k)
    assert trained == sorted(k for k in fp32_state if ".lora_" in k or ".modules_to_save." in k)
    with torch.no_grad():
        for key in trained:
            fp32_state[key].copy_(q_state[key])
    save_adapter(quantized, tmp_path / "qlora")
    save_adapter(fp32, tmp_path / "fp32")

    q_file, fp32_file = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("qlora", "fp32"))
    assert sorted(q_file) == sorted(fp32_file)
    assert not any(k.endswith(("weight_packed", "absmax", "weight_int8", "absmax_offset")) for k in q_file)
    assert any(".lora_B." in k for k in q_file) and (task != "seq-cls" or any(".classifier." in k for k in q_file))
    for key, value in q_file.items():
        assert value.dtype == torch.float32, key
        assert torch.equal(value, fp32_file[key]), key
    q_config, fp32_config = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("qlora", "fp32"))
    assert q_config == fp32_config

    # and it loads back into a freshly quantized model, giving the same outputs
    again = load_adapter(ours_quantized(folder, task, quant), tmp_path / "qlora").eval()
    ids, mask = inputs(family)
    check_close(run_ours(again, ids, mask), run_ours(quantized.eval(), ids, mask), 0, "reloaded QLoRA adapter")


def test_quantizing_a_lora_model_keeps_its_adapters(tiny):
    """quantize_model after apply_lora quantizes the base layers only: the same model as QLoRA built
    the usual way round (quantize, then add LoRA)."""
    folder, config = tiny.folder("qwen2", "causal-lm"), LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    after = quantize_model(apply_lora(load_model(folder, task="causal-lm")[0], config), bits=4)
    before = apply_lora(quantize_model(load_model(folder, task="causal-lm")[0], bits=4), config)
    lora = [m for m in after.modules() if isinstance(m, LoRALinear)]
    assert len(lora) == 4 and all(isinstance(m.base_layer, Linear4bit) for m in lora)
    assert all(type(m.lora_A["default"]) is nn.Linear and type(m.lora_B["default"]) is nn.Linear for m in lora)
    with torch.no_grad():
        for name, p in after.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    before.load_state_dict(after.state_dict())
    ids = random_ids("qwen2", 2, 7)
    torch.testing.assert_close(run_ours(after, ids, torch.ones_like(ids)), run_ours(before, ids, torch.ones_like(ids)),
                               atol=0, rtol=0)


# ------------------------------------------------------------------ 5. bad input


def test_unknown_quantization_names_the_choices(tiny):
    folder = tiny.folder("qwen2", "causal-lm")
    with pytest.raises(LoadError, match=r"'nf3'.*nf4, nf4-dq, int8"):
        load_model(folder, task="causal-lm", quant="nf3")


def test_layer_not_a_whole_number_of_nf4_blocks_is_named(tmp_path):
    # hidden 40, 4 heads, 2 kv heads: k_proj and v_proj hold 40 x 20 = 800 weights, 12.5 blocks of 64
    write_checkpoint(tmp_path, "qwen2", "causal-lm", hidden_size=40)
    for quant in ("nf4", "nf4-dq"):
        with pytest.raises(LoadError, match=r"^model\.layers\.0\.self_attn\.k_proj has 800 weights, not a multiple of "
                                            r"NF4's block of 64 \(4 such layer\(s\)\); load this model with "
                                            r"quant='int8' or without quant$"):
            load_model(tmp_path, task="causal-lm", quant=quant)
    model, _ = load_model(tmp_path, task="causal-lm", quant="int8")
    assert isinstance(model.model.layers[0].self_attn.k_proj, Linear8bit)


# ------------------------------------------------------------------ 6. allocator policy (train.py --quant)

ALLOCATOR_CHILD = r"""
import resource, sys, torch
from quant.allocator import keep_freed_memory, map_large_allocations
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
policy = {"mapped": map_large_allocations, "kept": keep_freed_memory}.get(sys.argv[1])
if policy is not None and not policy():
    print("unavailable"); sys.exit()
big_released, quiet = 0, 0
for cycle in range(12):  # as in a training step: the same large tensors allocated and freed over and over
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    big = torch.ones(64 << 20, dtype=torch.uint8)  # above glibc's largest dynamic threshold (32 MiB)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    before = rss()
    del big
    big_released = max(big_released, before - rss())
    quiet += cycle >= 2 and faults < 100  # the memory was there already: reused, not faulted in again
# then small blocks (after the large ones, so no freed small blocks were there to serve those)
del_me = torch.ones(16 << 20, dtype=torch.uint8); del del_me  # glibc now keeps blocks < 16 MiB in its heap
blocks = [torch.ones(1 << 20, dtype=torch.uint8) for _ in range(100)]  # 100 MiB of 1 MiB tensors
before = rss()
del blocks[:-1]  # the last one pins the top of the heap
print(before - rss(), big_released, quiet)
"""


@pytest.mark.parametrize("policy", ["default", "mapped", "kept"])
def test_allocator_policies(policy):
    """What each policy does with freed tensors: a 64 MiB block allocated and freed twelve times
    (released to the OS? faulted in anew?), then 100 freed 1 MiB blocks (released?)."""
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/statm").exists():
        pytest.skip("needs /proc to read the resident set size")
    out = subprocess.run([sys.executable, "-c", ALLOCATOR_CHILD, policy], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    if out == "unavailable":
        pytest.skip("mallopt needs glibc")
    small, big, quiet = (int(v) for v in out.split())
    small, big = small / 2**20, big / 2**20
    if policy == "mapped":  # everything freed goes back to the OS
        assert small > 90 and big > 60 and quiet == 0, (small, big, quiet)
    elif policy == "kept":  # nothing goes back; the memory is reused without page faults (in most cycles:
        assert small < 1 and big < 1 and quiet >= 5, (small, big, quiet)  # glibc now and then places it anew)
    else:  # what the settings exist for: small blocks stay in the heap, large ones are mapped anew each time
        assert small < 10 and big > 60 and quiet == 0, (small, big, quiet)


# ------------------------------------------------------------------ against peft's bitsandbytes LoRA layer

class _Holder(nn.Module):
    """The smallest model peft wraps around one bitsandbytes layer."""

    def __init__(self, layer):
        super().__init__()
        self.lin, self.is_loaded_in_4bit = layer, True

    def forward(self, x):
        return self.lin(x)


def lora_on_4bit_pair(dtype, adapters=("default",), out_features=96, in_features=128, rank=4, seed=0):
    """(our LoRALinear on Linear4bit, peft's LoRA layer on bnb.nn.Linear4bit) from one weight, in `dtype`,
    each adapter's random A and B copied into both."""
    g = torch.Generator().manual_seed(seed)
    weight = (0.2 * torch.randn(out_features, in_features, generator=g)).to(dtype)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, quant_type="nf4",
                              compress_statistics=False)
    layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                     compress_statistics=False)
    ref = peft.get_peft_model(_Holder(fp32_linear4bit(layer.to("cpu"))),
                              peft.LoraConfig(r=rank, lora_alpha=8, target_modules=["lin"]), adapter_name=adapters[0])
    for name in adapters[1:]:
        ref.add_adapter(name, peft.LoraConfig(r=rank, lora_alpha=8, target_modules=["lin"]))
    theirs = ref.base_model.model.lin
    ours = LoRALinear(Linear4bit.from_weight(weight, None, dtype))
    for name in adapters:
        ours.add_adapter(name, rank, 8)
        with torch.no_grad():
            A, B = 0.1 * torch.randn(rank, in_features, generator=g), 0.5 * torch.randn(out_features, rank, generator=g)
            for side in (ours, theirs):
                side.lora_A[name].weight.copy_(A)
                side.lora_B[name].weight.copy_(B)
    return ours.eval(), theirs.eval()


def assert_same_4bit_weight(ours, theirs):
    state = theirs.base_layer.weight.quant_state
    assert torch.equal(ours.base_layer.weight_packed.view(-1), theirs.base_layer.weight.data.view(-1))
    assert torch.equal(ours.base_layer.absmax, state.absmax)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_qlora_layer_rounds_as_peft(dtype):
    """peft's bitsandbytes layers round the LoRA term to the compute dtype and then add (ours added in fp32 and
    rounded once, peft's rule for unquantized layers: 2481 of 8192 bf16 outputs differed)."""
    ours, theirs = lora_on_4bit_pair(dtype, out_features=128, rank=8)
    x = torch.randn(64, 128).to(dtype)
    with torch.no_grad():
        assert torch.equal(ours.base_layer(x), theirs.base_layer(x))
        assert torch.equal(ours(x), theirs(x))


def test_two_adapters_merged_at_once_into_4bit_equal_peft():
    """peft requantizes after each adapter; ours requantized W + ΔW1 + ΔW2 once (2734 of 12288 codes differed)."""
    ours, theirs = lora_on_4bit_pair(torch.float32, adapters=("default", "b"))
    with pytest.warns(UserWarning):
        ours.merge(["default", "b"])
    theirs.merge(adapter_names=["default", "b"])
    assert_same_4bit_weight(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_and_unmerge_on_4bit_equal_peft(dtype):
    """After a merge the weight was quantized from float32 (bitsandbytes' quant_state.dtype), so unmerging
    subtracts in float32; ours subtracted from the weight dequantized in bf16 (59 codes differed)."""
    ours, theirs = lora_on_4bit_pair(dtype)
    with pytest.warns(UserWarning):
        ours.merge()
    theirs.merge()
    assert_same_4bit_weight(ours, theirs)
    with pytest.warns(UserWarning):
        ours.unmerge()
    theirs.unmerge()
    assert_same_4bit_weight(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_load_equals_transformers_bitsandbytes_load(tiny, dtype):
    """bitsandbytes' Int8Params quantizes a float16 copy of the weight; ours quantized float32 weights directly
    (613 of 73728 codes and every row scale differed)."""
    folder = tiny.folder("qwen2", "causal-lm")
    ours = load_model(folder, task="causal-lm", quant="int8", dtype=dtype)[0]
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(folder), quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu",
        dtype=dtype)
    theirs = dict(ref.named_modules())
    layers = [(name, m) for name, m in ours.named_modules() if isinstance(m, Linear8bit)]
    assert layers
    for name, layer in layers:
        assert torch.equal(layer.weight_int8, theirs[name].weight.data), name
        assert torch.equal(layer.weight_absmax, theirs[name].weight.SCB), name


def test_a_checkpoint_saved_quantized_is_refused(tiny, tmp_path):
    """Its int8 tensors have the weights' shapes, so it used to load as weights of up to 127."""
    folder = tiny.copy("qwen2", "causal-lm", tmp_path / "ck")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    for quant in (None, "int8"):
        with pytest.raises(LoadError, match=r"the checkpoint was saved quantized \(quantization_config, quant_method "
                                            r"'bitsandbytes'\)"):
            load_model(folder, task="causal-lm", quant=quant)


def test_quantize_model_leaves_the_model_as_it_was_on_error(tiny):
    model = load_model(tiny.folder("qwen2", "causal-lm"), task="causal-lm")[0]
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.self_attn\.q_proj: NF4 needs"):
        quantize_model(model, 4, blocksize=4096)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())


def test_a_quantized_layer_cannot_be_a_module_to_save(tiny):
    """peft: "only Tensors of floating point dtype can require gradients"; ours trained nothing in it and saved
    its packed codes in the adapter file."""
    folder = tiny.folder("qwen2", "causal-lm")
    with pytest.raises(RuntimeError, match="floating point"):
        peft.get_peft_model(bnb_4bit_model(folder), peft.LoraConfig(task_type="CAUSAL_LM", r=R, target_modules=[
            "v_proj"], modules_to_save=["down_proj"]))
    with pytest.raises(AdapterError, match=r"modules_to_save selects model\.layers\.0\.mlp\.down_proj, which holds a "
                                           r"Linear4bit"):
        apply_lora(ours_quantized(folder, "causal-lm", "nf4"),
                   LoraConfig(r=R, target_modules=["v_proj"], modules_to_save=["down_proj"]))


def test_int8_refuses_a_weight_beyond_float16():
    """bitsandbytes quantizes a float16 copy, where 1e5 is inf: its codes would be garbage."""
    weight = torch.randn(8, 16)
    weight[3, 5] = 1e5
    with pytest.raises(ValueError, match=r"beyond float16's range"):
        Linear8bit.from_weight(weight)
