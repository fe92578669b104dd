"""Prompt tuning (lora/prompt_tuning.py) against peft 0.21.2's PROMPT_TUNING (the reference).

Tiny random checkpoints (tests/tiny.py): DistilBERT seq-cls, GPT-2 causal-lm and seq-cls, Qwen2
causal-lm and seq-cls. The soft prompt (and, for seq-cls, the trained head copies) are copied
between our PromptTuningModel and peft's model both ways. Checked: logits and prompt gradients
equal peft's (our outputs cover the real tokens only: peft's causal-lm logits[:, N:]); text init
equals peft's, sample_vocab rows are embedding rows; adapter files round-trip both ways; greedy
generation with a prompt is the same with and without KV cache, equals a plain token-by-token loop
over [prompt; embeddings] and peft's generate; several prompts switch; disabled = the base model.
"""
import json

import pytest
import torch
import torch.nn.functional as F

from lora import (AdapterError, PromptTuningModel, delete_adapter, disable_adapters, load_adapter, save_adapter,
                  set_adapter)
from models import generate, load_model
from tiny import (HIDDEN, NUM_LABELS, PEFT_CASES, PEFT_TASK, SPECIAL_IDS, _TOKENIZER_KIND, load_hf, random_ids,
                  run_ours)

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("quiet_warnings")

ATOL = 1e-5
N = 5


# ------------------------------------------------------------------ helpers


def ref_config(family, task, n=N, **kw):
    if family == "distilbert":  # peft cannot find DistilBERT's sizes in its config ("dim", "n_heads")
        kw = {"token_dim": HIDDEN, "num_attention_heads": 4, **kw}
    return peft.PromptTuningConfig(task_type=PEFT_TASK[task], num_virtual_tokens=n, **kw)


def plain_ours(tiny, family, task):
    return load_model(tiny.folder(family, task), task=task, num_labels=NUM_LABELS)[0]


def plain_hf(tiny, family, task):
    return load_hf(tiny.folder(family, task), family, task)


def make_ref(tiny, family, task, n=N, name="default", **kw):
    return peft.get_peft_model(plain_hf(tiny, family, task), ref_config(family, task, n, **kw),
                               adapter_name=name).eval()


def ref_prompt(ref, name="default"):
    return ref.prompt_encoder[name].embedding.weight


def perturb_heads(module, seed=1):
    """Move the trainable head copies off the original head, so a test sees which one runs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ".modules_to_save." in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def copy_ours_to_ref(wrapper, ref):
    with torch.no_grad():
        for name, prompt in wrapper.prompt_embeddings.items():
            ref_prompt(ref, name).copy_(prompt)
    ref.base_model.load_state_dict(wrapper.base_model.state_dict(), strict=True)


def copy_ref_to_ours(ref, wrapper):
    with torch.no_grad():
        for name, prompt in wrapper.prompt_embeddings.items():
            prompt.copy_(ref_prompt(ref, name))
    wrapper.base_model.load_state_dict(ref.base_model.state_dict(), strict=True)


def inputs(family, batch=2, length=7, seed=0):
    ids = random_ids(family, batch, length, seed=seed)
    return ids, torch.ones_like(ids)


def run_ref(ref, ids, mask, n_virtual, grad=False):
    """peft's logits for the real tokens (its causal-lm logits include the virtual positions)."""
    with torch.set_grad_enabled(grad):
        logits = ref(input_ids=ids, attention_mask=mask).logits
    return logits[:, n_virtual:] if logits.dim() == 3 else logits


def check(ours, ref, what):
    assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0, msg=lambda m: f"{what}: {m}")


def assert_differs(a, b, what):
    assert (a - b).abs().max() > 1e-3, f"{what}: outputs are the same, the test would not see a difference"


def loss_of(logits, seed=3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=g)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def embedding_matrix(model):
    return model.get_submodule({"distilbert": "distilbert", "gpt2": "transformer", "qwen2": "model"}[
        model.config["model_type"]]).get_input_embeddings().weight


# ------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("direction", ["ours->peft", "peft->ours"])
@pytest.mark.parametrize("family,task", PEFT_CASES)
def test_logits_and_grads_match_peft(tiny, family, task, direction):
    ref = make_ref(tiny, family, task)
    wrapper = PromptTuningModel(plain_ours(tiny, family, task)).add_prompt("default", N).eval()
    assert wrapper.prompt_embeddings["default"].shape == ref_prompt(ref).shape == (N, HIDDEN)
    # the same parameters train: the prompt and, for seq-cls, the same head copies
    ours_trainable = {n for n, p in wrapper.named_parameters() if p.requires_grad}
    ref_trainable = {n for n, p in ref.named_parameters() if p.requires_grad}
    assert ours_trainable - {"prompt_embeddings.default"} == ref_trainable - {"prompt_encoder.default.embedding.weight"}
    assert "prompt_embeddings.default" in ours_trainable
    if direction == "ours->peft":
        perturb_heads(wrapper)
        copy_ours_to_ref(wrapper, ref)
    else:
        perturb_heads(ref)
        copy_ref_to_ours(ref, wrapper)
    ids, mask = inputs(family)
    if family == "distilbert":  # an encoder: right padding in one row
        mask[1, -2:] = 0
    ours = run_ours(wrapper, ids, mask, grad=True)
    theirs = run_ref(ref, ids, mask, N, grad=True)
    check(ours, theirs, f"{family} {task} logits")
    base = run_ours(plain_ours(tiny, family, task), ids, mask)
    assert ours.shape == base.shape  # the real tokens only
    assert_differs(ours, base, "prompt vs no prompt")
    loss_of(ours).backward()
    loss_of(theirs).backward()
    grad = wrapper.prompt_embeddings["default"].grad
    assert grad is not None and grad.abs().max() > 0
    check(grad, ref_prompt(ref).grad, "prompt gradient")
    ref_grads = dict(ref.base_model.named_parameters())
    for name, p in wrapper.base_model.named_parameters():
        if p.requires_grad:  # head copies
            check(p.grad, ref_grads[name].grad, f"{name} gradient")
        else:
            assert p.grad is None, f"frozen {name} got a gradient"


@pytest.mark.parametrize("n", [3, 13])  # cut and repeated
@pytest.mark.parametrize("family", ["distilbert", "gpt2", "qwen2"])
def test_text_init_matches_peft(tiny, family, n):
    task = "seq-cls" if family == "distilbert" else "causal-lm"
    text = "Classify the sentiment: good or bad?"
    folder = tiny.folder(family, task)
    model, tokenizer = load_model(folder, task=task, num_labels=NUM_LABELS)
    wrapper = PromptTuningModel(model).add_prompt("default", n, init="text", init_text=text, tokenizer=tokenizer)
    ref = make_ref(tiny, family, task, n, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                   tokenizer_name_or_path=str(folder))
    torch.testing.assert_close(wrapper.prompt_embeddings["default"], ref_prompt(ref), atol=0, rtol=0)
    assert wrapper.peft_config["default"]["prompt_tuning_init_text"] == text


def test_text_init_needs_text_and_tokenizer(tiny):
    model, tokenizer = load_model(tiny.folder("gpt2", "causal-lm"))
    with pytest.raises(AdapterError, match="init_text"):
        PromptTuningModel(model).add_prompt("default", N, init="text", tokenizer=tokenizer)
    with pytest.raises(AdapterError, match="tokenizer"):
        PromptTuningModel(model).add_prompt("default", N, init="text", init_text="hello")
    with pytest.raises(AdapterError, match="random"):
        PromptTuningModel(model).add_prompt("default", N, init="zeros")
    with pytest.raises(AdapterError, match="num_virtual_tokens"):
        PromptTuningModel(model).add_prompt("default", 0)


@pytest.mark.parametrize("family,task", [("distilbert", "seq-cls"), ("qwen2", "causal-lm")])
def test_sample_vocab_rows_are_embedding_rows(tiny, family, task):
    model = plain_ours(tiny, family, task)
    torch.manual_seed(0)
    prompt = PromptTuningModel(model).add_prompt("default", 16, init="sample_vocab").prompt_embeddings["default"]
    E = embedding_matrix(model)
    equal = (prompt[:, None, :] == E[None, :, :]).all(-1)  # (16, vocab)
    assert equal.any(-1).all(), "a sampled row is not a row of the embedding matrix"
    assert len({tuple(row.tolist()) for row in prompt}) > 1, "all sampled rows are the same token"
    assert prompt.requires_grad and prompt.data_ptr() != E.data_ptr()  # a trainable copy
    ref = make_ref(tiny, family, task, 16, prompt_tuning_init="SAMPLE_VOCAB")  # peft samples embedding rows too
    assert (ref_prompt(ref)[:, None, :] == E[None, :, :]).all(-1).any(-1).all()


# ------------------------------------------------------------------ files, both ways


@pytest.mark.parametrize("family,task", PEFT_CASES)
def test_peft_prompt_loads_in_ours(tiny, tmp_path, family, task):
    ref = make_ref(tiny, family, task)
    perturb_heads(ref, seed=2)
    ref.save_pretrained(str(tmp_path))
    wrapper = load_adapter(plain_ours(tiny, family, task), tmp_path)
    assert isinstance(wrapper, PromptTuningModel)
    torch.testing.assert_close(wrapper.prompt_embeddings["default"], ref_prompt(ref), atol=0, rtol=0)
    ids, mask = inputs(family)
    check(run_ours(wrapper.eval(), ids, mask), run_ref(ref, ids, mask, N), "peft saved -> ours loaded")


@pytest.mark.parametrize("family,task", PEFT_CASES)
def test_our_prompt_loads_in_peft(tiny, tmp_path, family, task):
    wrapper = PromptTuningModel(plain_ours(tiny, family, task)).add_prompt("default", N).eval()
    perturb_heads(wrapper, seed=3)
    save_adapter(wrapper, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == PEFT_TASK[task]
    assert cfg["num_virtual_tokens"] == N and cfg["token_dim"] == HIDDEN
    ref = peft.PeftModel.from_pretrained(plain_hf(tiny, family, task), str(tmp_path)).eval()
    torch.testing.assert_close(ref_prompt(ref), wrapper.prompt_embeddings["default"], atol=0, rtol=0)
    ids, mask = inputs(family)
    check(run_ours(wrapper, ids, mask), run_ref(ref, ids, mask, N), "ours saved -> peft loaded")
    # and back into ours
    again = load_adapter(plain_ours(tiny, family, task), tmp_path).eval()
    check(run_ours(again, ids, mask), run_ours(wrapper, ids, mask), "ours -> ours")


def test_text_init_prompt_loads_in_peft(tiny, tmp_path):
    family, task = "gpt2", "causal-lm"
    model, tokenizer = load_model(tiny.folder(family, task))
    wrapper = PromptTuningModel(model).add_prompt("default", 6, init="text", init_text="Answer:", tokenizer=tokenizer)
    save_adapter(wrapper, tmp_path)
    ref = peft.PeftModel.from_pretrained(plain_hf(tiny, family, task), str(tmp_path)).eval()
    ids, mask = inputs(family)
    check(run_ours(wrapper.eval(), ids, mask), run_ref(ref, ids, mask, 6), "text-init prompt in peft")


def test_prompt_of_another_width(tiny, tmp_path):
    wrapper = PromptTuningModel(plain_ours(tiny, "gpt2", "causal-lm")).add_prompt("default", N)
    save_adapter(wrapper, tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    tensors["prompt_embeddings"] = torch.zeros(N, HIDDEN + 8)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="prompt_embeddings"):
        load_adapter(plain_ours(tiny, "gpt2", "causal-lm"), tmp_path)


# ------------------------------------------------------------------ generation


def reference_greedy(model, prompt, ids, steps):
    """Plain model on [prompt; E[ids]], full recompute each step: the next token is the argmax."""
    E = embedding_matrix(model)
    out = []
    with torch.no_grad():
        x = torch.cat([prompt.expand(ids.shape[0], -1, -1), E[ids]], dim=1)  # (B, N + T, C)
        for _ in range(steps):
            logits = model(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long))
            nxt = logits[:, -1].argmax(-1)  # (B,)
            out.append(nxt)
            x = torch.cat([x, E[nxt][:, None]], dim=1)
    return torch.cat([ids, torch.stack(out, dim=1)], dim=1)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_generation_with_prompt(tiny, family):
    task, steps = "causal-lm", 8
    ref = make_ref(tiny, family, task)
    wrapper = PromptTuningModel(plain_ours(tiny, family, task)).add_prompt("default", N).eval()
    copy_ref_to_ours(ref, wrapper)
    ids, mask = inputs(family, batch=2, length=5, seed=4)
    cached = generate(wrapper, ids, mask, max_new_tokens=steps, use_cache=True)
    uncached = generate(wrapper, ids, mask, max_new_tokens=steps, use_cache=False)
    expected = reference_greedy(plain_ours(tiny, family, task), wrapper.prompt_embeddings["default"].detach(), ids,
                                steps)
    assert torch.equal(cached, uncached), (cached, uncached)
    assert torch.equal(cached, expected), (cached, expected)
    assert not torch.equal(expected, generate(plain_ours(tiny, family, task), ids, mask, max_new_tokens=steps)), \
        "the prompt does not change the generated tokens: the test would not see it missing"
    eos = SPECIAL_IDS[_TOKENIZER_KIND[family]]["eos"]
    assert not (expected[:, ids.shape[1]:] == eos).any(), "reference hit eos; pick another seed"
    with torch.no_grad():
        theirs = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False)
    assert torch.equal(cached, theirs[:, -cached.shape[1]:]), (cached, theirs)


def test_generation_with_prompt_left_padded_batch(tiny):
    family, task, steps = "gpt2", "causal-lm", 6
    wrapper = PromptTuningModel(plain_ours(tiny, family, task)).add_prompt("default", N).eval()
    long_row, short_row = random_ids(family, 1, 6, seed=5)[0], random_ids(family, 1, 3, seed=6)[0]
    ids = torch.stack([long_row, torch.cat([torch.zeros(3, dtype=torch.long), short_row])])
    mask = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    for use_cache in (True, False):
        batched = generate(wrapper, ids, mask, max_new_tokens=steps, use_cache=use_cache)
        for row, alone in ((0, long_row), (1, short_row)):
            single = generate(wrapper, alone[None], max_new_tokens=steps, use_cache=use_cache)
            assert torch.equal(batched[row, -steps:], single[0, -steps:]), (use_cache, row)


# ------------------------------------------------------------------ several prompts


@pytest.mark.parametrize("family,task", [("gpt2", "seq-cls"), ("qwen2", "causal-lm"), ("distilbert", "seq-cls")])
def test_two_prompts_switch_like_peft(tiny, family, task):
    wrapper = PromptTuningModel(plain_ours(tiny, family, task))
    wrapper.add_prompt("first", N).add_prompt("second", 3)
    wrapper.eval()
    assert wrapper.active_adapter == "first"
    ref = make_ref(tiny, family, task, N, name="first")
    ref.add_adapter("second", ref_config(family, task, 3))
    ref.eval()
    perturb_heads(wrapper)
    copy_ours_to_ref(wrapper, ref)
    ids, mask = inputs(family)
    base = run_ours(plain_ours(tiny, family, task), ids, mask)
    outputs = {}
    for i, (name, n) in enumerate([("second", 3), ("first", N), ("second", 3), ("first", N), ("second", 3)]):
        if i < 3:
            wrapper.set_adapter(name)
        else:  # lora's function hands off to the method, as save_adapter and disable_adapters do
            set_adapter(wrapper, name)
        ref.set_adapter(name)
        trainable = {k for k, p in wrapper.named_parameters() if p.requires_grad}
        assert f"prompt_embeddings.{name}" in trainable
        assert all(name in k for k in trainable), f"only {name!r} trains: {trainable}"
        outputs[name] = run_ours(wrapper, ids, mask)
        check(outputs[name], run_ref(ref, ids, mask, n), f"prompt {name}")
    assert_differs(outputs["first"], outputs["second"], "first vs second")
    for disabled in (wrapper.disable_adapters(), disable_adapters(wrapper)):  # the method, and lora's function
        with disabled:
            check(run_ours(wrapper, ids, mask), base, "disabled")
        check(run_ours(wrapper, ids, mask), outputs["second"], "enabled again")
    delete_adapter(wrapper, "second")
    assert wrapper.active_adapter == "first" and list(wrapper.prompt_embeddings) == ["first"]
    assert list(wrapper.peft_config) == ["first"]
    check(run_ours(wrapper, ids, mask), outputs["first"], "after deleting second")
    with pytest.raises(AdapterError, match="second"):
        wrapper.set_adapter("second")


def test_second_prompt_loaded_from_file(tiny, tmp_path):
    family, task = "gpt2", "causal-lm"
    ref = make_ref(tiny, family, task, 4, name="a")
    ref.add_adapter("b", ref_config(family, task, 2))
    for name in ("a", "b"):
        ref.set_adapter(name)
        ref.save_pretrained(str(tmp_path), selected_adapters=[name])  # -> tmp_path/<name>
    ref.eval()
    wrapper = load_adapter(plain_ours(tiny, family, task), tmp_path / "b", "b")
    assert load_adapter(wrapper, tmp_path / "a", "a") is wrapper
    ids, mask = inputs(family)
    for name, n in (("a", 4), ("b", 2)):
        wrapper.set_adapter(name)
        ref.set_adapter(name)
        check(run_ours(wrapper.eval(), ids, mask), run_ref(ref, ids, mask, n), f"loaded prompt {name}")


def test_failed_prompt_load_leaves_the_model_as_it_was(tiny, tmp_path):
    """A prompt adapter whose head does not fit: a plain model keeps its modules and trainable flags, and a
    PromptTuningModel keeps only its own prompts, the first one active."""
    family, task = "gpt2", "seq-cls"
    # the causal-lm checkpoint has no score layer: a fresh head with one label more
    source = PromptTuningModel(load_model(tiny.folder(family, "causal-lm"), task=task, num_labels=NUM_LABELS + 1)[0])
    save_adapter(source.add_prompt("default", N), tmp_path)
    model = plain_ours(tiny, family, task)
    keys = list(model.state_dict())
    with pytest.raises(AdapterError, match="score"):
        load_adapter(model, tmp_path)
    assert list(model.state_dict()) == keys and all(p.requires_grad for p in model.parameters())
    wrapper = PromptTuningModel(plain_ours(tiny, family, task)).add_prompt("a", N)
    flags = {n: p.requires_grad for n, p in wrapper.named_parameters()}
    with pytest.raises(AdapterError, match="score"):
        load_adapter(wrapper, tmp_path, adapter_name="b")
    assert list(wrapper.prompt_embeddings) == list(wrapper.peft_config) == ["a"] and wrapper.active_adapter == "a"
    assert {n: p.requires_grad for n, p in wrapper.named_parameters()} == flags


def test_generation_counts_the_virtual_tokens(tiny):
    wrapper = PromptTuningModel(plain_ours(tiny, "gpt2", "causal-lm")).add_prompt("default", N).eval()
    ids, mask = inputs("gpt2", batch=1, length=10)
    fits = 64 - N - 10 + 1
    assert generate(wrapper, ids, mask, max_new_tokens=fits, eos_token_id=-1).shape[1] == 10 + fits
    with pytest.raises(ValueError, match=rf"^10 prompt tokens \+ {N} virtual tokens \+ {fits + 1} new tokens exceed"):
        generate(wrapper, ids, mask, max_new_tokens=fits + 1)
    with disable_adapters(wrapper):  # switched off, the prompt takes no positions
        assert generate(wrapper, ids, mask, max_new_tokens=fits + N, eos_token_id=-1).shape[1] == 10 + fits + N


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_causal_lm_loss_scores_the_first_token_as_peft(tiny, family):
    """peft pads the labels with N x -100 and then shifts them, so its last virtual position predicts the first real
    token; our loss left that token out (one token fewer, and another prompt gradient)."""
    from evaluation import next_token_nll

    ref = make_ref(tiny, family, "causal-lm")
    wrapper = PromptTuningModel(plain_ours(tiny, family, "causal-lm")).add_prompt("default", N).eval()
    copy_ours_to_ref(wrapper, ref)
    ids, mask = inputs(family, batch=3)
    mask[1, -3:] = 0  # right padding, unlabelled
    labels = ids.masked_fill(mask == 0, -100)
    labels[2, :2] = -100  # a row whose first tokens are a prompt (not scored)
    nll, count = next_token_nll(wrapper, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    theirs = ref(input_ids=ids, attention_mask=mask, labels=labels).loss  # the mean over its scored tokens
    assert count == int((labels != -100).sum())  # every labelled token, the first ones included
    torch.testing.assert_close(nll / count, theirs, atol=ATOL, rtol=0)
    (nll / count).backward()
    theirs.backward()
    check(wrapper.prompt_embeddings["default"].grad, ref_prompt(ref).grad, "prompt gradient")


def test_deleting_prompts_keeps_the_active_one_and_the_base_model_runs(tiny):
    """Deleting an inactive prompt made the first one active (peft keeps the active one), and deleting the last
    one left the heads pointing at its deleted copy (a KeyError in forward instead of the base model)."""
    family, task = "gpt2", "seq-cls"
    wrapper = PromptTuningModel(plain_ours(tiny, family, task)).add_prompt("a", N).add_prompt("b", 3)
    wrapper.add_prompt("c", 2).set_adapter("c")
    wrapper.delete_adapter("a")
    assert wrapper.active_adapter == "c"
    assert {n for n, p in wrapper.named_parameters() if p.requires_grad} == {
        "prompt_embeddings.c", "base_model.score.modules_to_save.c.weight"}
    wrapper.delete_adapter("b")
    wrapper.delete_adapter("c")
    ids, mask = inputs(family)
    check(run_ours(wrapper.eval(), ids, mask), run_ours(plain_ours(tiny, family, task), ids, mask), "no prompt left")


def test_a_second_prompts_head_copy_is_frozen_until_it_is_active(tiny):
    wrapper = PromptTuningModel(plain_ours(tiny, "gpt2", "seq-cls")).add_prompt("first", N).add_prompt("second", 3)
    assert {n for n, p in wrapper.named_parameters() if p.requires_grad} == {
        "prompt_embeddings.first", "base_model.score.modules_to_save.first.weight"}


def test_a_prompt_on_a_base_model_loads_in_peft(tiny, tmp_path):
    """peft's plain PeftModel (task_type None, what we wrote) runs the base model without the soft prompt;
    FEATURE_EXTRACTION applies it, as peft writes for a base model."""
    family = "qwen2"
    wrapper = PromptTuningModel(plain_ours(tiny, family, "base")).add_prompt("default", N).eval()
    save_adapter(wrapper, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    ids, mask = inputs(family)
    ref = peft.PeftModel.from_pretrained(load_hf(tiny.folder(family, "base"), family, "base"), str(tmp_path)).eval()
    with torch.no_grad():
        theirs = ref(input_ids=ids, attention_mask=mask).last_hidden_state[:, N:]
    check(run_ours(wrapper, ids, mask), theirs, "hidden states")


def test_a_prompt_whose_config_disagrees_with_its_tensor_is_refused(tiny, tmp_path):
    """peft refuses it too; ours used the tensor's rows while eval.py checked the config's count."""
    wrapper = PromptTuningModel(plain_ours(tiny, "gpt2", "causal-lm")).add_prompt("default", N)
    save_adapter(wrapper, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "num_virtual_tokens": 1}))
    with pytest.raises(AdapterError, match=rf"adapter_config.json says num_virtual_tokens 1, tensor prompt_embeddings "
                                           rf"has {N} rows$"):
        load_adapter(plain_ours(tiny, "gpt2", "causal-lm"), tmp_path)
