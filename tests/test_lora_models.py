"""LoRA / rsLoRA / DoRA on whole models (lora/adapters.py) against peft 0.21.2 (the reference).

Tiny random checkpoints (tests/tiny.py): DistilBERT seq-cls, GPT-2 and Qwen2 causal-lm and seq-cls.
Ours and peft's model get identical weights by a key-for-key state-dict copy (our in-memory names
are peft's `base_model.model.*` names), with B (and m, and the trainable head copies) made random.
Checked: logits and gradients equal peft's (fp32, 1e-5); merging equals peft's merge_and_unload and
unmerging restores the base; adapter files round-trip both ways (ours -> peft, peft -> ours,
with a seq-cls head and the DoRA / rsLoRA flags); several adapters switch and disable like peft's;
bad configs and bad files fail with a clear AdapterError.
"""
import json
import re
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lora import (AdapterError, LoRALinear, LoraConfig, ModulesToSave, apply_lora, delete_adapter, disable_adapters,
                  load_adapter, merge_adapter, merge_and_unload, save_adapter, set_adapter, trainable_parameters,
                  unmerge_adapter)
from models import load_model
from tiny import NUM_LABELS, PEFT_CASES, PEFT_TASK, load_hf, random_ids, run_ours, write_checkpoint

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("quiet_warnings")

ATOL = 1e-5
R, ALPHA = 4, 8  # rsLoRA's scale alpha / sqrt(r) = 4 differs from LoRA's alpha / r = 2
PEFT_PREFIX = "base_model.model."
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}
# more than the defaults: attention and MLP layers, nn.Linear with / without bias and GPT-2's Conv1D
TARGETS = {"distilbert": ["q_lin", "v_lin", "lin2"], "gpt2": ["c_attn", "c_proj"],
           "qwen2": ["q_proj", "v_proj", "down_proj"]}
HEADS = {"distilbert": ["pre_classifier", "classifier"], "gpt2": ["score"], "qwen2": ["score"]}


# ------------------------------------------------------------------ helpers


def heads_for(family, task):
    return list(HEADS[family]) if task == "seq-cls" else None


def our_config(family, task, variant="lora", r=R, alpha=ALPHA, targets=None):
    return LoraConfig(r=r, alpha=alpha, dropout=0.0, target_modules=targets or list(TARGETS[family]),
                      modules_to_save=heads_for(family, task), **VARIANTS[variant])


def ref_config(family, task, variant="lora", r=R, alpha=ALPHA, targets=None, modules_to_save="same"):
    mts = heads_for(family, task) if modules_to_save == "same" else modules_to_save
    return peft.LoraConfig(task_type=PEFT_TASK[task], r=r, lora_alpha=alpha, lora_dropout=0.0,
                           target_modules=targets or list(TARGETS[family]), modules_to_save=mts,
                           **VARIANTS[variant])


def plain_ours(tiny, family, task):
    return load_model(tiny.folder(family, task), task=task, num_labels=NUM_LABELS)[0]


def plain_hf(tiny, family, task):
    return load_hf(tiny.folder(family, task), family, task)


def make_pair(tiny, family, task, variant="lora"):
    """(our model with one LoRA adapter, peft's PeftModel on a private transformers copy), eval mode."""
    ours = apply_lora(plain_ours(tiny, family, task), our_config(family, task, variant))
    ref = peft.get_peft_model(plain_hf(tiny, family, task), ref_config(family, task, variant)).eval()
    return ours.eval(), ref


def ref_inner(ref):
    """peft's wrapped transformers model (its state-dict keys are ours)."""
    return ref.base_model.model


def randomize(model, seed=1):
    """Random B, m off ||W||, head copies off the original: works on ours or on peft's names."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:  # A keeps its (random) kaiming init
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif ".lora_magnitude_vector." in name:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))
            elif ".modules_to_save." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def copy_ours_to_ref(ours, ref):
    ref_inner(ref).load_state_dict(ours.state_dict(), strict=True)


def copy_ref_to_ours(ref, ours):
    ours.load_state_dict(ref_inner(ref).state_dict(), strict=True)


def inputs(family, batch=2, length=9, seed=0):
    ids = random_ids(family, batch, length, seed=seed)
    return ids, torch.ones_like(ids)


def run_ref(model, ids, mask, grad=False):
    with torch.set_grad_enabled(grad):
        return model(input_ids=ids, attention_mask=mask).logits


def check_logits(ours, ref_logits, what=""):
    assert ours.shape == ref_logits.shape, (what, ours.shape, ref_logits.shape)
    torch.testing.assert_close(ours, ref_logits, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def assert_differs(a, b, what):
    assert (a - b).abs().max() > 1e-3, f"{what}: outputs are the same, the test would not see a difference"


def trainable_names(model, prefix=""):
    return {n[len(prefix):] for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ forward and gradients


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family,task", PEFT_CASES)
def test_logits_match_peft(tiny, family, task, variant):
    ours, ref = make_pair(tiny, family, task, variant)
    ids, mask = inputs(family)
    base = run_ours(plain_ours(tiny, family, task), ids, mask)
    # a fresh adapter (B = 0, m = ||W||) is the base model; heads are still the original weights
    check_logits(run_ours(ours, ids, mask), base, "fresh adapter vs base")
    # the same set of modules gets wrapped and trained
    assert trainable_names(ours) == trainable_names(ref, PEFT_PREFIX)
    randomize(ours)
    copy_ours_to_ref(ours, ref)  # ours -> peft
    ours_logits = run_ours(ours, ids, mask)
    check_logits(ours_logits, run_ref(ref, ids, mask), f"{family} {task} {variant}")
    assert_differs(ours_logits, base, "adapter vs base")


def loss_of(logits, seed=3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=g)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family,task", PEFT_CASES)
def test_gradients_match_peft(tiny, family, task, variant):
    ours, ref = make_pair(tiny, family, task, variant)
    randomize(ref_inner(ref), seed=2)
    copy_ref_to_ours(ref, ours)  # peft -> ours
    ids, mask = inputs(family, seed=1)
    loss_of(run_ours(ours, ids, mask, grad=True)).backward()
    loss_of(run_ref(ref, ids, mask, grad=True)).backward()
    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    ref_grads = {n[len(PEFT_PREFIX):]: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert ours_grads.keys() == ref_grads.keys()
    kinds = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if variant == "dora" else set()) \
        | ({"modules_to_save"} if task == "seq-cls" else set())
    assert {k for k in kinds if any(f".{k}." in n for n in ours_grads)} == kinds
    for name, grad in ours_grads.items():
        assert grad is not None, name
        assert grad.abs().max() > 0, f"{name}: zero gradient"
        torch.testing.assert_close(grad, ref_grads[name], atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
    frozen = [n for n, p in ours.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen, f"frozen parameters got gradients: {frozen[:3]}"


def test_regex_targets_match_peft(tiny):
    """A string target is a full-match regex, as in peft: only layer 1's c_attn here."""
    family, task, regex = "gpt2", "causal-lm", r"transformer\.h\.1\.attn\.c_attn"
    ours = apply_lora(plain_ours(tiny, family, task), LoraConfig(r=R, alpha=ALPHA, target_modules=regex))
    ref = peft.get_peft_model(plain_hf(tiny, family, task),
                              peft.LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, target_modules=regex))
    wrapped = [n for n, m in ours.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["transformer.h.1.attn.c_attn"]
    randomize(ours)
    copy_ours_to_ref(ours, ref)
    ids, mask = inputs(family)
    check_logits(run_ours(ours, ids, mask), run_ref(ref.eval(), ids, mask), "regex targets")


def test_trainable_parameter_count(tiny):
    family, task = "qwen2", "seq-cls"
    ours, ref = make_pair(tiny, family, task, "dora")
    trainable, total = trainable_parameters(ours)
    ref_trainable, ref_total = ref.get_nb_trainable_parameters()
    assert (trainable, total) == (ref_trainable, ref_total)


# ------------------------------------------------------------------ merging


MERGE_CASES = [("distilbert", "seq-cls"), ("gpt2", "causal-lm"), ("qwen2", "seq-cls")]


def base_weights(model):
    """Base tensors of a LoRA model under the plain model's names."""
    return {k.replace(".base_layer.", ".").replace(".original_module.", "."): v.clone()
            for k, v in model.state_dict().items()
            if ".lora_" not in k and ".modules_to_save." not in k}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family,task", MERGE_CASES)
def test_merge_matches_peft(tiny, family, task, variant):
    ours, ref = make_pair(tiny, family, task, variant)
    randomize(ours)
    copy_ours_to_ref(ours, ref)
    ids, mask = inputs(family)
    plain = plain_ours(tiny, family, task)
    original = plain.state_dict()
    assert base_weights(ours).keys() == original.keys()
    unmerged = run_ours(ours, ids, mask)

    merge_adapter(ours)
    assert all(layer.merged for _, layer in ours.named_modules() if isinstance(layer, LoRALinear))
    check_logits(run_ours(ours, ids, mask), unmerged, "merged vs unmerged")
    merged_base = base_weights(ours)
    assert any((merged_base[k] - original[k]).abs().max() > 1e-3 for k in original), "merge changed no weight"

    unmerge_adapter(ours)
    for key, value in base_weights(ours).items():
        torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0, msg=lambda m: f"unmerged {key}: {m}")
    check_logits(run_ours(ours, ids, mask), unmerged, "after unmerge")

    ref_merged = ref.merge_and_unload().state_dict()
    ours = merge_and_unload(ours)
    assert not any(isinstance(m, (LoRALinear, ModulesToSave)) for m in ours.modules())
    ours_merged = ours.state_dict()
    assert ours_merged.keys() == ref_merged.keys() == original.keys()
    for key, value in ours_merged.items():
        torch.testing.assert_close(value, ref_merged[key], atol=1e-6, rtol=0, msg=lambda m: f"merged {key}: {m}")
        if not any(key.startswith(head + ".") for head in heads_for(family, task) or []):
            # merge_adapter (kept wrapped) wrote the same weights; heads are the originals there
            torch.testing.assert_close(merged_base[key], ref_merged[key], atol=1e-6, rtol=0)
    check_logits(run_ours(ours, ids, mask), unmerged, "merge_and_unload vs unmerged")


def test_disable_while_merged_gives_base(tiny):
    family, task = "qwen2", "causal-lm"
    ours, _ = make_pair(tiny, family, task, "dora")
    randomize(ours)
    ids, mask = inputs(family)
    base = run_ours(plain_ours(tiny, family, task), ids, mask)
    adapted = run_ours(ours, ids, mask)
    merge_adapter(ours)
    with disable_adapters(ours):
        check_logits(run_ours(ours, ids, mask), base, "disabled while merged")
    check_logits(run_ours(ours, ids, mask), adapted, "enabled again")


# ------------------------------------------------------------------ files, both ways


def read_config(folder):
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family,task", PEFT_CASES)
def test_our_adapter_loads_in_peft(tiny, tmp_path, family, task, variant):
    ours, _ = make_pair(tiny, family, task, variant)
    randomize(ours)
    save_adapter(ours, tmp_path)
    cfg = read_config(tmp_path)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == PEFT_TASK[task]
    assert (cfg["r"], cfg["lora_alpha"]) == (R, ALPHA)
    assert cfg["use_dora"] == (variant == "dora") and cfg["use_rslora"] == (variant == "rslora")
    ref = peft.PeftModel.from_pretrained(plain_hf(tiny, family, task), str(tmp_path)).eval()
    loaded = ref.peft_config["default"]
    assert loaded.use_dora == (variant == "dora") and loaded.use_rslora == (variant == "rslora")
    ref_state = ref_inner(ref).state_dict()
    for key, value in ours.state_dict().items():  # every tensor landed at its place
        torch.testing.assert_close(ref_state[key], value, atol=0, rtol=0, msg=lambda m: f"{key}: {m}")
    ids, mask = inputs(family)
    check_logits(run_ours(ours, ids, mask), run_ref(ref, ids, mask), "ours saved -> peft loaded")
    # our file holds exactly the tensors (names, values) that peft writes for this adapter
    ref.save_pretrained(str(tmp_path / "peft"))
    ours_file, ref_file = (load_file(str(f / "adapter_model.safetensors")) for f in (tmp_path, tmp_path / "peft"))
    assert sorted(ours_file) == sorted(ref_file)
    for key, value in ours_file.items():
        torch.testing.assert_close(value, ref_file[key], atol=0, rtol=0, msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family,task", PEFT_CASES)
def test_peft_adapter_loads_in_ours(tiny, tmp_path, family, task, variant):
    _, ref = make_pair(tiny, family, task, variant)
    randomize(ref_inner(ref), seed=4)
    ref.save_pretrained(str(tmp_path))
    ours = plain_ours(tiny, family, task)
    assert load_adapter(ours, tmp_path) is ours
    config = ours.peft_config["default"]
    assert (config.r, config.alpha, config.use_dora, config.use_rslora) == (R, ALPHA, variant == "dora",
                                                                          variant == "rslora")
    ref_state = ref_inner(ref).state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, ref_state[key], atol=0, rtol=0, msg=lambda m: f"{key}: {m}")
    ids, mask = inputs(family)
    check_logits(run_ours(ours.eval(), ids, mask), run_ref(ref, ids, mask), "peft saved -> ours loaded")


@pytest.mark.parametrize("family", ["llama", "llama-tied"])
def test_peft_adapter_on_lm_head_loads_with_its_base_weight(tiny, tmp_path, family):
    """With lm_head among the targets peft also saves lm_head's base weight, and loads it back."""
    task = "causal-lm"
    ref = peft.get_peft_model(plain_hf(tiny, family, task), ref_config(family, task, targets=["q_proj", "lm_head"])).eval()
    randomize(ref_inner(ref), seed=6)
    with torch.no_grad():  # as after resizing the vocabulary: the saved base weight is not the checkpoint's
        ref_inner(ref).lm_head.base_layer.weight.mul_(1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Setting `save_embedding_layers` to `True` ..."
        ref.save_pretrained(str(tmp_path))
    assert "base_model.model.lm_head.base_layer.weight" in load_file(tmp_path / "adapter_model.safetensors")
    ours = load_adapter(plain_ours(tiny, family, task), tmp_path).eval()
    ids, mask = inputs(family)
    check_logits(run_ours(ours, ids, mask), run_ref(ref, ids, mask), f"{family}: peft adapter on lm_head -> ours")


@pytest.mark.parametrize("family", ["llama", "llama-tied"])
def test_merging_into_a_tied_lm_head_warns(tiny, family):
    """Merged W + ΔW lands in the input embedding too when lm_head is tied to it: a different model."""
    task, targets = "causal-lm", ["q_proj", "lm_head"]
    for merge in (merge_adapter, merge_and_unload):
        ours = apply_lora(plain_ours(tiny, family, task), our_config(family, task, targets=targets)).eval()
        randomize(ours)
        ids, mask = inputs(family)
        unmerged = run_ours(ours, ids, mask)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merge(ours)
        tied = [str(w.message) for w in caught if "tied embeddings" in str(w.message)]
        if family == "llama":
            assert not tied
            check_logits(run_ours(ours, ids, mask), unmerged, "merged, untied")
        else:
            assert tied == ["lm_head shares its weight with model.embed_tokens (tied embeddings): merging changes "
                            "both, so the merged model differs from the unmerged one; keep this adapter unmerged to "
                            "change the output layer alone"]
            assert_differs(run_ours(ours, ids, mask), unmerged, "merged, tied")  # what the warning is about


@pytest.mark.parametrize("family", ["distilbert", "gpt2"])
def test_peft_adapter_with_default_head_config_loads_in_ours(tiny, tmp_path, family):
    """peft's own SEQ_CLS default (modules_to_save None -> ["classifier", "score"]) and base untouched."""
    task = "seq-cls"
    ref = peft.get_peft_model(plain_hf(tiny, family, task), ref_config(family, task, modules_to_save=None)).eval()
    randomize(ref_inner(ref), seed=5)
    ref.save_pretrained(str(tmp_path))
    ours = load_adapter(plain_ours(tiny, family, task), tmp_path).eval()
    ids, mask = inputs(family)
    check_logits(run_ours(ours, ids, mask), run_ref(ref, ids, mask), "peft default heads -> ours")
    # the loaded adapter must not have overwritten the base model: disabled = the plain model
    base = run_ours(plain_ours(tiny, family, task), ids, mask)
    with disable_adapters(ours):
        check_logits(run_ours(ours, ids, mask), base, "disabled after loading")
    with ref.disable_adapter():
        check_logits(run_ref(ref, ids, mask), base, "peft disabled")


def test_round_trip_ours_to_ours(tiny, tmp_path):
    family, task = "qwen2", "seq-cls"
    ours, _ = make_pair(tiny, family, task, "dora")
    randomize(ours)
    save_adapter(ours, tmp_path)
    again = load_adapter(plain_ours(tiny, family, task), tmp_path).eval()
    assert again.state_dict().keys() == ours.state_dict().keys()
    ids, mask = inputs(family)
    check_logits(run_ours(again, ids, mask), run_ours(ours, ids, mask), "ours -> ours")


# ------------------------------------------------------------------ several adapters


@pytest.mark.parametrize("family,task", [("gpt2", "seq-cls"), ("qwen2", "causal-lm"), ("distilbert", "seq-cls")])
def test_two_adapters_switch_like_peft(tiny, tmp_path, family, task):
    targets_b = TARGETS[family][:1]  # the second adapter sits on fewer layers, with DoRA and another rank
    ours = plain_ours(tiny, family, task)
    apply_lora(ours, our_config(family, task, "lora"), "first")
    apply_lora(ours, our_config(family, task, "dora", r=2, alpha=4, targets=targets_b), "second")
    ours.eval()
    ref = peft.get_peft_model(plain_hf(tiny, family, task), ref_config(family, task, "lora"), adapter_name="first")
    ref.add_adapter("second", ref_config(family, task, "dora", r=2, alpha=4, targets=targets_b))
    ref.eval()
    assert ours.active_adapter == ref.active_adapter == "first"  # adding keeps the first one active
    randomize(ours)
    copy_ours_to_ref(ours, ref)
    ids, mask = inputs(family)
    base = run_ours(plain_ours(tiny, family, task), ids, mask)
    outputs = {}
    for name in ["second", "first", "second"]:
        set_adapter(ours, name)
        ref.set_adapter(name)
        assert trainable_names(ours) == trainable_names(ref, PEFT_PREFIX)
        assert all(f".{name}." in n for n in trainable_names(ours)), "only the active adapter trains"
        outputs[name] = run_ours(ours, ids, mask)
        check_logits(outputs[name], run_ref(ref, ids, mask), f"adapter {name}")
    assert_differs(outputs["first"], outputs["second"], "first vs second")
    assert_differs(outputs["first"], base, "first vs base")
    assert_differs(outputs["second"], base, "second vs base")
    with disable_adapters(ours):
        check_logits(run_ours(ours, ids, mask), base, "disabled")
    with ref.disable_adapter():
        check_logits(run_ref(ref, ids, mask), base, "peft disabled")
    check_logits(run_ours(ours, ids, mask), outputs["second"], "enabled again")

    # each adapter saved alone equals a single-adapter model loaded from its file
    for name in ["first", "second"]:
        folder = tmp_path / name
        save_adapter(ours, folder, name)
        single = load_adapter(plain_ours(tiny, family, task), folder).eval()
        check_logits(run_ours(single, ids, mask), outputs[name], f"{name} saved alone")

    delete_adapter(ours, "second")
    ref.delete_adapter("second")
    assert not any(".second." in k for k in ours.state_dict())
    assert ours.active_adapter == "first"
    check_logits(run_ours(ours, ids, mask), outputs["first"], "after deleting second")
    check_logits(run_ours(ours, ids, mask), run_ref(ref, ids, mask), "peft after deleting second")


def test_duplicate_and_unknown_adapter_names(tiny):
    ours = apply_lora(plain_ours(tiny, "gpt2", "causal-lm"), LoraConfig(r=2))
    with pytest.raises(AdapterError, match="default"):
        apply_lora(ours, LoraConfig(r=2))
    with pytest.raises(AdapterError, match="nope") as e:
        set_adapter(ours, "nope")
    assert "default" in str(e.value)


# ------------------------------------------------------------------ bad input


def test_unknown_target_module(tiny):
    model = plain_ours(tiny, "distilbert", "seq-cls")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError) as e:
        apply_lora(model, LoraConfig(r=4, target_modules=["query", "value"]))
    msg = str(e.value)
    assert "query" in msg
    for name in ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2", "pre_classifier", "classifier"]:
        assert name in msg, f"{name} not listed in: {msg}"
    # the model is untouched
    assert not any(isinstance(m, (LoRALinear, ModulesToSave)) for m in model.modules())
    assert not getattr(model, "peft_config", None)
    assert all(p.requires_grad for p in model.parameters())
    assert model.state_dict().keys() == before.keys()


EMBEDDINGS_TO_SAVE = [("gpt2", "causal-lm", "c_fc", "wpe"), ("bert", "seq-cls", "query", "position_embeddings"),
                      ("bert", "seq-cls", "query", "token_type_embeddings"),
                      ("distilbert", "seq-cls", "q_lin", "position_embeddings")]


@pytest.mark.parametrize("family,task,target,saved", EMBEDDINGS_TO_SAVE)
def test_embeddings_read_by_weight_train_as_modules_to_save(tiny, family, task, target, saved):
    """The models read these embeddings' .weight directly; as modules_to_save they read the trained copy."""
    to_save = [saved] + ({"bert": ["classifier"]}.get(family) or heads_for(family, task) or [])
    ours = apply_lora(plain_ours(tiny, family, task), LoraConfig(r=R, alpha=ALPHA, target_modules=[target],
                                                                modules_to_save=to_save))
    ref = peft.get_peft_model(plain_hf(tiny, family, task), peft.LoraConfig(
        task_type=PEFT_TASK[task], r=R, lora_alpha=ALPHA, target_modules=[target], modules_to_save=to_save)).eval()
    randomize(ours)
    copy_ours_to_ref(ours, ref)
    ids, mask = inputs(family)
    logits = run_ours(ours.eval(), ids, mask, grad=True)
    check_logits(logits, run_ref(ref, ids, mask), f"{family} {saved}")
    assert_differs(logits.detach(), run_ours(plain_ours(tiny, family, task), ids, mask), "trained copy vs base")
    logits.square().sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if saved in n}
    assert all(g is not None for n, g in grads.items() if ".modules_to_save." in n), grads.keys()
    assert all(g is None for n, g in grads.items() if ".original_module." in n)


def test_targets_only_inside_modules_to_save(tiny):
    model = plain_ours(tiny, "distilbert", "seq-cls")
    message = (r"^target modules \['q_lin'\] match only layers that get no adapter: those inside modules trained in "
               r"full \(modules_to_save \['classifier', 'transformer'\]\)$")
    with pytest.raises(AdapterError, match=message):
        apply_lora(model, LoraConfig(r=4, target_modules=["q_lin"], modules_to_save=["classifier", "transformer"]))
    assert not any(isinstance(m, (LoRALinear, ModulesToSave)) for m in model.modules())
    exclude = r"distilbert\.transformer\.layer\.0\..*"
    message = ("target modules ['q_lin'] match only layers that get no adapter: those inside modules trained in full "
               f"(modules_to_save ['classifier']) or excluded (exclude_modules {exclude!r}) or outside "
               "layers_to_transform 0")
    with pytest.raises(AdapterError, match=f"^{re.escape(message)}$"):
        apply_lora(model, LoraConfig(r=4, target_modules=["q_lin"], modules_to_save=["classifier"],
                                     exclude_modules=exclude, layers_to_transform=0))
    assert not any(isinstance(m, (LoRALinear, ModulesToSave)) for m in model.modules())


def test_config_and_adapter_calls_on_a_model_without_adapters(tiny, tmp_path):
    with pytest.raises(AdapterError, match="LoRA init must be 'kaiming' or 'gaussian', got 'pissa'"):
        LoraConfig(init="pissa")
    for layers in ("1", [0, "1"], 1.0):
        with pytest.raises(AdapterError, match=r"^layers_to_transform must be a layer index or a list of them, got"):
            LoraConfig(layers_to_transform=layers)
    for targets in ("all-linear", r".*\.q_proj"):  # peft refuses these too
        for narrowing in ({"layers_to_transform": [0]}, {"layers_pattern": "layers"}):
            with pytest.raises(AdapterError, match=r"^layers_to_transform / layers_pattern need target_modules as a list"):
                LoraConfig(target_modules=targets, **narrowing)
    model = plain_ours(tiny, "gpt2", "causal-lm")
    message = r"^the model has no adapter \(add one with apply_lora or load_adapter\)$"
    for call in (lambda: save_adapter(model, tmp_path / "adapter"), lambda: set_adapter(model, "default"),
                 lambda: delete_adapter(model, "default")):
        with pytest.raises(AdapterError, match=message):
            call()
    assert not (tmp_path / "adapter").exists()


def test_unknown_target_regex(tiny):
    model = plain_ours(tiny, "qwen2", "causal-lm")
    with pytest.raises(AdapterError) as e:
        apply_lora(model, LoraConfig(r=4, target_modules=r".*\.c_attn"))
    assert "c_attn" in str(e.value) and "q_proj" in str(e.value) and "down_proj" in str(e.value)


@pytest.mark.parametrize("r", [0, -2])
def test_non_positive_rank(tiny, tmp_path, r):
    with pytest.raises(AdapterError, match=rf"\br\b.*{r}"):
        LoraConfig(r=r)
    # the same from an adapter file
    ours = apply_lora(plain_ours(tiny, "gpt2", "causal-lm"), LoraConfig(r=2, target_modules=["c_attn"]))
    save_adapter(ours, tmp_path)
    cfg = read_config(tmp_path)
    cfg["r"] = r
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=str(r)):
        load_adapter(plain_ours(tiny, "gpt2", "causal-lm"), tmp_path)


def assert_unchanged(model, family, task, tiny, ids, mask):
    """After a failed load: no adapter registered, no wrapper left, every parameter trainable as in a fresh
    model, and the base model's outputs."""
    fresh = plain_ours(tiny, family, task)
    assert not hasattr(model, "peft_config") and not hasattr(model, "active_adapter")
    assert list(model.state_dict()) == list(fresh.state_dict())  # a LoRALinear would rename base weights
    assert {n: p.requires_grad for n, p in model.named_parameters()} == {
        n: p.requires_grad for n, p in fresh.named_parameters()}
    check_logits(run_ours(model.eval(), ids, mask), run_ours(plain_ours(tiny, family, task), ids, mask),
                 "after a failed load")


def test_adapter_for_another_hidden_size(tiny, tmp_path):
    family, task = "gpt2", "causal-lm"
    wide = write_checkpoint(tmp_path / "wide", family, task, n_embd=48)
    del wide
    source = apply_lora(load_model(tmp_path / "wide", task=task)[0], LoraConfig(r=R, target_modules=["c_attn"]))
    save_adapter(source, tmp_path / "adapter")
    model = plain_ours(tiny, family, task)
    with pytest.raises(AdapterError) as e:
        load_adapter(model, tmp_path / "adapter")
    msg = str(e.value)
    # names one tensor that does not fit, with both shapes
    expected = {k: tuple(v.shape) for k, v in
                apply_lora(plain_ours(tiny, family, task), LoraConfig(r=R, target_modules=["c_attn"]))
                .state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in source.state_dict().items()}
    named = [k for k in expected if ".lora_" in k and k in msg]
    assert len(named) == 1, msg
    assert expected[named[0]] != saved[named[0]]
    assert str(saved[named[0]]) in msg and str(expected[named[0]]) in msg, msg
    ids, mask = inputs(family)
    assert_unchanged(model, family, task, tiny, ids, mask)


def test_adapter_with_one_edited_tensor(tiny, tmp_path):
    family, task = "qwen2", "causal-lm"
    ours, _ = make_pair(tiny, family, task)
    randomize(ours)
    save_adapter(ours, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(path))
    bad = PEFT_PREFIX + "model.layers.1.self_attn.v_proj.lora_B.weight"
    assert bad in tensors
    tensors[bad] = torch.zeros(tensors[bad].shape[0] + 1, R)
    save_file(tensors, str(path))
    model = plain_ours(tiny, family, task)
    with pytest.raises(AdapterError) as e:
        load_adapter(model, tmp_path)
    msg = str(e.value)
    assert "model.layers.1.self_attn.v_proj.lora_B" in msg, msg
    assert "17" in msg and "16" in msg, msg  # both shapes (Qwen2 v_proj: 2 kv heads x 8 = 16 outputs)
    ids, mask = inputs(family)
    assert_unchanged(model, family, task, tiny, ids, mask)
    # a good adapter still loads afterwards under the same name
    save_adapter(ours, tmp_path / "good")
    check_logits(run_ours(load_adapter(model, tmp_path / "good").eval(), ids, mask), run_ours(ours, ids, mask),
                 "good adapter after a failed one")


def test_adapter_with_another_number_of_labels(tiny, tmp_path):
    family, task = "gpt2", "seq-cls"
    ours, _ = make_pair(tiny, family, task)
    save_adapter(ours, tmp_path)
    # a checkpoint without a head (GPT2Model) gets a fresh 5-label head
    model = load_model(tiny.folder(family, "base"), task=task, num_labels=NUM_LABELS + 2)[0]
    with pytest.raises(AdapterError) as e:
        load_adapter(model, tmp_path)
    assert "score" in str(e.value) and str((NUM_LABELS, 32)) in str(e.value), str(e.value)


def test_adapter_for_another_architecture(tiny, tmp_path):
    ours, _ = make_pair(tiny, "qwen2", "causal-lm")
    save_adapter(ours, tmp_path)
    with pytest.raises(AdapterError) as e:
        load_adapter(plain_ours(tiny, "gpt2", "causal-lm"), tmp_path)
    assert "q_proj" in str(e.value) and "c_attn" in str(e.value), str(e.value)


def test_folder_without_adapter_files(tiny, tmp_path):
    model = plain_ours(tiny, "gpt2", "causal-lm")
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapter(model, tmp_path)  # empty folder
    with pytest.raises(AdapterError, match="adapter_config.json"):
        load_adapter(model, tmp_path / "missing")  # no folder at all
    # a model folder is not an adapter folder
    shutil.copytree(tiny.folder("gpt2", "causal-lm"), tmp_path / "model")
    with pytest.raises(AdapterError, match="adapter"):
        load_adapter(model, tmp_path / "model")
    # config without weights
    ours = apply_lora(plain_ours(tiny, "gpt2", "causal-lm"), LoraConfig(r=2))
    save_adapter(ours, tmp_path / "half")
    (tmp_path / "half" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors"):
        load_adapter(model, tmp_path / "half")
    assert not getattr(model, "peft_config", None)


def test_targets_inside_a_module_to_save_get_no_adapter_and_reload(tiny, tmp_path):
    """BERT seq-cls with `dense` targeted: the pooler (trained in full) keeps a plain dense, as in peft,
    and the saved adapter loads back into a fresh model with the same logits."""
    folder = tiny.folder("bert", "seq-cls")
    model = load_model(folder, task="seq-cls", num_labels=NUM_LABELS)[0]
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=["query", "value", "dense"]))
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert names and not any("pooler" in n for n in names)
    assert any(n.endswith("attention.output.dense") for n in names)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    save_adapter(model, tmp_path)
    fresh = load_adapter(load_model(folder, task="seq-cls", num_labels=NUM_LABELS)[0], tmp_path)
    ids = random_ids("bert", 2, 7)
    torch.testing.assert_close(fresh(ids), model.eval()(ids), atol=1e-6, rtol=0)


ALL_LINEAR_CASES = [("distilbert", "seq-cls"), ("bert", "seq-cls"), ("gpt2", "causal-lm"), ("gpt2", "seq-cls"),
                    ("qwen2", "causal-lm"), ("llama-tied", "causal-lm"), ("llama", "seq-cls")]


@pytest.mark.parametrize("family,task", ALL_LINEAR_CASES)
def test_all_linear_targets_match_peft(tiny, tmp_path, family, task):
    """target_modules="all-linear" wraps the layers peft's shorthand wraps (all linear layers but the LM head
    or the classifier, none inside a module trained in full); the saved adapter loads in peft."""
    ours = apply_lora(plain_ours(tiny, family, task), LoraConfig(r=R, alpha=ALPHA, target_modules="all-linear"))
    heads = ours.peft_config["default"].modules_to_save
    ref = peft.get_peft_model(plain_hf(tiny, family, task),
                              peft.LoraConfig(task_type=PEFT_TASK[task], r=R, lora_alpha=ALPHA,
                                              target_modules="all-linear", modules_to_save=heads or None))
    wrapped = sorted(n for n, m in ours.named_modules() if isinstance(m, LoRALinear))
    ref_wrapped = sorted(n[len(PEFT_PREFIX):] for n, m in ref.named_modules()
                         if isinstance(m, peft.tuners.lora.LoraLayer))
    assert len(wrapped) > 4 and wrapped == ref_wrapped
    randomize(ours)
    save_adapter(ours, tmp_path)
    ref.save_pretrained(str(tmp_path / "peft"))
    assert sorted(read_config(tmp_path)["target_modules"]) == sorted(read_config(tmp_path / "peft")["target_modules"])
    loaded = peft.PeftModel.from_pretrained(plain_hf(tiny, family, task), str(tmp_path)).eval()
    ids, mask = inputs(family)
    check_logits(run_ours(ours.eval(), ids, mask), run_ref(loaded, ids, mask), "all-linear, ours saved -> peft")


LAYER_FILTERS = {  # peft LoraConfig fields that narrow target_modules
    "exclude list": ("qwen2", {"target_modules": ["q_proj", "v_proj", "down_proj"], "exclude_modules": ["down_proj"]}),
    "exclude regex": ("qwen2", {"target_modules": ["q_proj", "v_proj"], "exclude_modules": r"model\.layers\.0\..*"}),
    "one layer by pattern": ("qwen2", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 1,
                                       "layers_pattern": "layers"}),
    "layers without pattern": ("qwen2", {"target_modules": ["q_proj", "o_proj"], "layers_to_transform": [0]}),
    "gpt2 blocks": ("gpt2", {"target_modules": ["c_attn", "c_proj"], "layers_to_transform": [1],
                             "layers_pattern": ["h"]}),
}


@pytest.mark.parametrize("case", LAYER_FILTERS)
def test_layer_filters_match_peft(tiny, tmp_path, case):
    """exclude_modules, layers_to_transform and layers_pattern pick the layers peft picks; adapter files with
    them load both ways with equal logits."""
    family, fields = LAYER_FILTERS[case]
    ours = apply_lora(plain_ours(tiny, family, "causal-lm"), LoraConfig(r=R, alpha=ALPHA, **fields))
    ref = peft.get_peft_model(plain_hf(tiny, family, "causal-lm"),
                              peft.LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, **fields))
    wrapped = sorted(n for n, m in ours.named_modules() if isinstance(m, LoRALinear))
    ref_wrapped = sorted(n[len(PEFT_PREFIX):] for n, m in ref.named_modules()
                         if isinstance(m, peft.tuners.lora.LoraLayer))
    every_target = [n for n in plain_ours(tiny, family, "causal-lm").state_dict()
                    if n.endswith(".weight") and n.split(".")[-2] in fields["target_modules"]]
    assert 0 < len(wrapped) < len(every_target) and wrapped == ref_wrapped
    ids, mask = inputs(family)
    randomize(ours)
    save_adapter(ours, tmp_path / "ours")
    loaded = peft.PeftModel.from_pretrained(plain_hf(tiny, family, "causal-lm"), str(tmp_path / "ours")).eval()
    check_logits(run_ours(ours.eval(), ids, mask), run_ref(loaded, ids, mask), f"{case}: ours saved -> peft")
    randomize(ref_inner(ref), seed=5)
    ref.save_pretrained(str(tmp_path / "peft"))
    mine = load_adapter(plain_ours(tiny, family, "causal-lm"), tmp_path / "peft").eval()
    check_logits(run_ours(mine, ids, mask), run_ref(ref.eval(), ids, mask), f"{case}: peft saved -> ours")


UNSUPPORTED_PEFT_OPTIONS = {  # field -> value, each written by peft itself into a real adapter file
    "lora_bias": True, "bias": "lora_only", "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"q_proj": 4},
    "layer_replication": [[0, 2]], "init_lora_weights": "pissa", "trainable_token_indices": [1, 2],
}


@pytest.mark.parametrize("field", UNSUPPORTED_PEFT_OPTIONS)
def test_peft_adapter_with_unsupported_option_is_refused(tiny, tmp_path, field):
    """An option that changes the adapter's tensors or its layers' math fails with its name; the model is left
    as it was (ignoring it would load a different model without a word)."""
    fields = {"target_modules": ["q_proj"], field: UNSUPPORTED_PEFT_OPTIONS[field]}
    ref = peft.get_peft_model(plain_hf(tiny, "qwen2", "causal-lm"),
                              peft.LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, **fields))
    ref.save_pretrained(str(tmp_path))
    assert read_config(tmp_path)[field] == UNSUPPORTED_PEFT_OPTIONS[field]
    model = plain_ours(tiny, "qwen2", "causal-lm")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=rf"adapter_config\.json (uses {field}|trains biases|has {field}=)"):
        load_adapter(model, tmp_path)
    assert not any(isinstance(m, LoRALinear) for m in model.modules()) and not hasattr(model, "peft_config")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_failed_second_adapter_leaves_the_first(tiny, tmp_path):
    """A second adapter whose file does not fit is taken out again: the first stays active and alone trainable."""
    family, task = "qwen2", "seq-cls"
    ours, _ = make_pair(tiny, family, task)
    randomize(ours)
    save_adapter(ours, tmp_path / "good")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "good", bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = PEFT_PREFIX + "model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.zeros(R + 1, tensors[key].shape[1])
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    model = load_adapter(plain_ours(tiny, family, task), tmp_path / "good")
    names = {n: p.requires_grad for n, p in model.named_parameters()}
    ids, mask = inputs(family)
    before = run_ours(model.eval(), ids, mask)
    with pytest.raises(AdapterError, match="lora_A"):
        load_adapter(model, bad, adapter_name="second")
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == names
    check_logits(run_ours(model, ids, mask), before, "the first adapter after a failed second one")


@pytest.mark.parametrize("name,content,message", [
    ("adapter_config.json", b'{"r": 4,,}', r"adapter_config\.json: not valid JSON \(Expecting property name enclosed "
                                          r"in double quotes, line 1 column 9\)"),
    ("adapter_config.json", b'"LORA"', r"adapter_config\.json: expected a JSON object \(\{\.\.\.\}\), found a str"),
    ("adapter_model.safetensors", b"not safetensors", r"adapter_model\.safetensors: not a readable safetensors file"),
], ids=["config-syntax", "config-not-an-object", "weights"])
def test_a_damaged_adapter_file_is_one_line_naming_it(tiny, tmp_path, name, content, message):
    save_adapter(apply_lora(plain_ours(tiny, "gpt2", "causal-lm"), LoraConfig(r=R)), tmp_path)
    (tmp_path / name).write_bytes(content)
    model = plain_ours(tiny, "gpt2", "causal-lm")
    with pytest.raises(AdapterError, match=f"^{re.escape(str(tmp_path))}/{message}"):
        load_adapter(model, tmp_path)
    assert not hasattr(model, "peft_config")


def test_setting_or_adding_an_adapter_while_merged_unmerges_like_peft(tiny):
    """peft unmerges (with a warning) before it sets an adapter, and adding one sets one; switching used to leave
    the first adapter merged in, so the model computed it while `active_adapter` named the other."""
    family, task = "qwen2", "causal-lm"
    ours, ref = make_pair(tiny, family, task)
    randomize(ours)
    copy_ours_to_ref(ours, ref)
    ids, mask = inputs(family)
    first = run_ours(ours, ids, mask)
    merge_adapter(ours)
    ref.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging it first"):
        apply_lora(ours, our_config(family, task, r=2, alpha=4), "second")
    with pytest.warns(UserWarning, match="Unmerging the model first"):
        ref.add_adapter("second", ref_config(family, task, r=2, alpha=4))
    assert not any(m.merged for m in ours.modules() if isinstance(m, LoRALinear))
    with torch.no_grad():  # the second adapter's B only; the first keeps its weights
        for name, p in ours.named_parameters():
            if ".lora_B.second." in name:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(2))
    copy_ours_to_ref(ours, ref)
    check_logits(run_ours(ours, ids, mask), first, "the first adapter, unmerged, after adding a second")
    merge_adapter(ours)
    ref.merge_adapter()
    with pytest.warns(UserWarning, match="unmerging it first"):
        set_adapter(ours, "second")
    with pytest.warns(UserWarning, match="Unmerging the model first"):
        ref.set_adapter("second")
    second = run_ours(ours, ids, mask)
    check_logits(second, run_ref(ref.eval(), ids, mask), "second adapter set while the first was merged")
    assert_differs(second, first, "second vs first")


def test_deleting_the_active_adapter_activates_the_first_by_name_as_peft(tiny):
    names = ["zeta", "beta", "alpha"]
    ours, ref = plain_ours(tiny, "qwen2", "causal-lm"), None
    for name in names:
        apply_lora(ours, LoraConfig(r=R, alpha=ALPHA, target_modules=["q_proj", "v_proj"]), name)
        config = peft.LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"])
        if ref is None:
            ref = peft.get_peft_model(plain_hf(tiny, "qwen2", "causal-lm"), config, adapter_name=name)
        else:
            ref.add_adapter(name, config)
    ours.eval(), ref.eval()
    randomize(ours)
    copy_ours_to_ref(ours, ref)
    delete_adapter(ours, "zeta")
    ref.delete_adapter("zeta")
    assert ours.active_adapter == ref.active_adapter == "alpha"  # was "beta", the next one added
    ids, mask = inputs("qwen2")
    check_logits(run_ours(ours, ids, mask), run_ref(ref, ids, mask), "after deleting the active adapter")
    assert trainable_names(ours) == trainable_names(ref, PEFT_PREFIX)


def test_a_layer_with_lora_cannot_be_trained_in_full_by_another_adapter(tiny, tmp_path):
    """peft refuses modules_to_save on a LoRA layer; ours used to copy the LoRA layer, so the first adapter's file
    then held tensors that neither peft nor load_adapter could place."""
    ours = apply_lora(plain_ours(tiny, "gpt2", "causal-lm"), LoraConfig(r=R, alpha=ALPHA, target_modules=["c_attn", "lm_head"]), "a")
    ref = peft.get_peft_model(plain_hf(tiny, "gpt2", "causal-lm"),
                              peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["c_attn", "lm_head"]), adapter_name="a")
    second = dict(r=2, target_modules=["c_attn"], modules_to_save=["lm_head"])
    with pytest.raises(TypeError, match="modules_to_save cannot be applied"):
        ref.add_adapter("b", peft.LoraConfig(lora_alpha=4, **second))
    with pytest.raises(AdapterError, match=r"^modules_to_save selects lm_head, which holds a LoRALinear; a layer with "
                                           r"LoRA or a quantized layer cannot also be trained in full$"):
        apply_lora(ours, LoraConfig(alpha=4, **second), "b")
    assert list(ours.peft_config) == ["a"] and not any(isinstance(m, ModulesToSave) for m in ours.modules())
    save_adapter(ours, tmp_path / "a", "a")
    load_adapter(plain_ours(tiny, "gpt2", "causal-lm"), tmp_path / "a")


@pytest.mark.parametrize("modules_to_save", [[], ["ln_f"]])
def test_a_classifier_always_trains_its_head_as_in_peft(tiny, tmp_path, modules_to_save):
    """peft's sequence-classification model adds classifier / score to any modules_to_save (and trains a
    LoRA-targeted head in full); ours left the head random and frozen, and peft could not load the adapter."""
    config = dict(r=R, target_modules=["c_attn", "score"], modules_to_save=modules_to_save)
    ours = apply_lora(plain_ours(tiny, "gpt2", "seq-cls"), LoraConfig(alpha=ALPHA, **config))
    ref = peft.get_peft_model(plain_hf(tiny, "gpt2", "seq-cls"), peft.LoraConfig(task_type="SEQ_CLS", lora_alpha=ALPHA,
                                                                                **config))
    trained = sorted(n for n, p in ours.named_parameters() if p.requires_grad and "lora_" not in n)
    assert trained == sorted(n.removeprefix("base_model.model.") for n, p in ref.named_parameters()
                             if p.requires_grad and "lora_" not in n)
    assert "score.modules_to_save.default.weight" in trained
    save_adapter(ours, tmp_path / "a")
    peft.PeftModel.from_pretrained(plain_hf(tiny, "gpt2", "seq-cls"), str(tmp_path / "a"))  # KeyError before


@pytest.mark.parametrize("targets,peft_error", [
    (["c_attn", "ln_1"], "is not supported"),  # peft: Target module LayerNorm(...) is not supported
    ("transformer.h.0.(attn.c_attn|ln_1)", "is not supported"),
    (["c_attn", "wte"], None),  # peft adapts the embedding; this project has no LoRA embedding
])
def test_targets_that_name_other_layers_are_refused(tiny, targets, peft_error):
    """A non-linear module among the targets used to be skipped without a word (and kept in the saved config)."""
    if peft_error:
        with pytest.raises(ValueError, match=peft_error):
            peft.get_peft_model(plain_hf(tiny, "gpt2", "causal-lm"),
                                peft.LoraConfig(task_type="CAUSAL_LM", r=R, target_modules=targets))
    model = plain_ours(tiny, "gpt2", "causal-lm")
    with pytest.raises(AdapterError, match=r"match transformer\.(h\.0\.ln_1 \(LayerNorm\)|wte \(Embedding\)), which is "
                                           r"not a linear layer: LoRA here adapts nn\.Linear and GPT-2's Conv1D only$"):
        apply_lora(model, LoraConfig(r=R, target_modules=targets))
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


@pytest.mark.parametrize("fields,message", [
    (dict(target_modules=[]), r"target_modules is empty"),  # it used to fall back to the default targets
    (dict(target_modules=["q_proj"], layers_pattern="layers"), r"layers_pattern needs layers_to_transform"),
])
def test_configs_peft_refuses_are_refused(tiny, fields, message):
    with pytest.raises(ValueError):
        peft.get_peft_model(plain_hf(tiny, "qwen2", "causal-lm"), peft.LoraConfig(task_type="CAUSAL_LM", r=R, **fields))
    with pytest.raises(AdapterError, match=message):
        apply_lora(plain_ours(tiny, "qwen2", "causal-lm"), LoraConfig(r=R, **fields))


def test_targets_given_as_a_set_save_as_peft_saves_them(tiny, tmp_path):
    """peft's LoraConfig holds target_modules as a set; saving ours failed after the weights were written, leaving
    an adapter_config.json cut off mid-way."""
    ours = apply_lora(plain_ours(tiny, "qwen2", "causal-lm"), LoraConfig(r=R, target_modules={"v_proj", "q_proj"}))
    randomize(ours)
    save_adapter(ours, tmp_path / "a")
    assert read_config(tmp_path / "a")["target_modules"] == ["q_proj", "v_proj"]
    ref = peft.PeftModel.from_pretrained(plain_hf(tiny, "qwen2", "causal-lm"), str(tmp_path / "a")).eval()
    ids, mask = inputs("qwen2")
    check_logits(run_ours(ours.eval(), ids, mask), run_ref(ref, ids, mask), "set targets through peft")
    ours.peft_config["default"].extra["note"] = object()  # a config JSON cannot hold
    with pytest.raises(TypeError):
        save_adapter(ours, tmp_path / "b")
    assert not (tmp_path / "b").exists()


def test_a_mica_adapter_is_refused(tiny, tmp_path):
    """MiCA trains lora_A only; loaded here its lora_B trained too, and a re-save dropped "mica"."""
    ref = peft.get_peft_model(plain_hf(tiny, "qwen2", "causal-lm"), peft.LoraConfig(
        task_type="CAUSAL_LM", r=R, target_modules=["q_proj"], init_lora_weights="mica"))
    ref.save_pretrained(str(tmp_path))
    with pytest.raises(AdapterError, match=r"init_lora_weights='mica', which trains lora_A only"):
        load_adapter(plain_ours(tiny, "qwen2", "causal-lm"), tmp_path)


def test_an_adapter_loaded_without_its_head_saves_a_file_peft_loads(tiny, tmp_path):
    """peft without task_type on a classifier saves no head; ours loaded it, then saved modules_to_save ["score"]
    and SEQ_CLS without the tensor, which peft failed on (KeyError score.weight)."""
    family, task = "gpt2", "seq-cls"
    ref = peft.get_peft_model(plain_hf(tiny, family, task),
                              peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["c_attn"])).eval()
    randomize(ref_inner(ref), seed=7)
    ref.save_pretrained(str(tmp_path / "peft"))
    assert read_config(tmp_path / "peft")["task_type"] is None
    ours = load_adapter(plain_ours(tiny, family, task), tmp_path / "peft").eval()
    save_adapter(ours, tmp_path / "ours")
    config = read_config(tmp_path / "ours")
    assert config["modules_to_save"] is None and config["task_type"] is None
    again = peft.PeftModel.from_pretrained(plain_hf(tiny, family, task), str(tmp_path / "ours")).eval()
    ids, mask = inputs(family)
    check_logits(run_ours(ours, ids, mask), run_ref(again, ids, mask), "ours re-saved -> peft")
    check_logits(run_ref(again, ids, mask), run_ref(ref, ids, mask), "the same adapter as peft's")


def test_a_re_saved_distilbert_adapter_without_its_classifier_loads_in_peft(tiny, tmp_path):
    """peft's suffix rule: "classifier" also names DistilBERT's pre_classifier. A file holding pre_classifier only was
    re-saved as SEQ_CLS with modules_to_save [pre_classifier, classifier] (peft: KeyError classifier.weight)."""
    family, task = "distilbert", "seq-cls"
    ref = peft.get_peft_model(plain_hf(tiny, family, task), peft.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["q_lin"], modules_to_save=["pre_classifier"])).eval()
    randomize(ref_inner(ref), seed=9)
    ref.save_pretrained(str(tmp_path / "peft"))
    ours = load_adapter(plain_ours(tiny, family, task), tmp_path / "peft").eval()
    save_adapter(ours, tmp_path / "ours")
    config = read_config(tmp_path / "ours")
    assert config["modules_to_save"] == ["pre_classifier"] and config["task_type"] is None
    again = peft.PeftModel.from_pretrained(plain_hf(tiny, family, task), str(tmp_path / "ours")).eval()
    ids, mask = inputs(family)
    check_logits(run_ours(ours, ids, mask), run_ref(again, ids, mask), "ours re-saved -> peft")
    check_logits(run_ref(again, ids, mask), run_ref(ref, ids, mask), "the same adapter as peft's")


def test_lora_on_a_prompt_tuning_model_is_refused_and_leaves_it(tiny, tmp_path):
    """As peft ("Cannot combine adapters with different peft types"); before, the LoRA load failed half-way and the
    rollback's own error hid the first, leaving LoRA wrappers and a mixed peft_config behind."""
    from lora import PromptTuningModel

    family, task = "qwen2", "causal-lm"
    save_adapter(apply_lora(plain_ours(tiny, family, task), our_config(family, task)), tmp_path / "lora")
    wrapped = PromptTuningModel(plain_ours(tiny, family, task))
    wrapped.add_prompt("default", num_virtual_tokens=3)
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    for attempt in (lambda: load_adapter(wrapped, tmp_path / "lora", "lora"),
                    lambda: apply_lora(wrapped, our_config(family, task), "lora")):
        with pytest.raises(AdapterError, match="LoRA and prompt tuning do not combine"):
            attempt()
        assert list(wrapped.peft_config) == ["default"] and not any(isinstance(m, LoRALinear) for m in wrapped.modules())
        assert wrapped.state_dict().keys() == before.keys()


@pytest.mark.parametrize("name", ["v1.2", "", "default.x"])
def test_an_adapter_name_torch_cannot_hold_is_refused_before_any_change(tiny, name):
    """peft raises torch's KeyError and leaves the model; ours left a LoRA wrapper and every weight frozen."""
    model = plain_ours(tiny, "gpt2", "seq-cls")
    with pytest.raises(AdapterError, match="adapter name must be a non-empty string without '.'"):
        apply_lora(model, our_config("gpt2", "seq-cls"), name)
    assert not any(isinstance(m, LoRALinear) for m in model.modules()) and not hasattr(model, "peft_config")
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("edit,message", [
    ({"velora_config": {"rank": 4}}, "uses velora_config"),
    ({"ensure_weight_tying": True}, "uses ensure_weight_tying"),
    ({"lora_alpha": "8"}, "LoRA alpha must be a number, got '8'"),
    ({"lora_dropout": None, "r": 4.0}, "rank r must be a positive integer"),
])
def test_peft_config_fields_we_do_not_read_are_named(tiny, tmp_path, edit, message):
    """Each was refused by an unrelated message (a tensor 'has no place', a TypeError)."""
    family, task = "qwen2", "causal-lm"
    save_adapter(apply_lora(plain_ours(tiny, family, task), our_config(family, task)), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**read_config(tmp_path), **edit}))
    with pytest.raises(AdapterError, match=re.escape(message)):
        load_adapter(plain_ours(tiny, family, task), tmp_path)


def test_a_pickled_peft_adapter_is_named_as_such(tiny, tmp_path):
    ref = peft.get_peft_model(plain_hf(tiny, "qwen2", "causal-lm"), ref_config("qwen2", "causal-lm"))
    ref.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    with pytest.raises(AdapterError, match="it holds adapter_model.bin, a pickle, which is not loaded for safety"):
        load_adapter(plain_ours(tiny, "qwen2", "causal-lm"), tmp_path)
