"""models/: our hand-written DistilBERT, BERT, GPT-2, Qwen2 and Llama against transformers.

Tiny random checkpoints (tests/tiny.py) for every family and task head: outputs equal
transformers' (fp32, atol 1e-5) with and without padding; greedy generation token-identical to
transformers' generate (with / without KV cache, batched with left padding, EOS handling);
tokenizers give transformers' ids. Real checkpoints from $PEFT_MODELS_DIR (minilm-l6,
smollm2-135m) at atol 1e-4, skipped when absent. Name resolution and loading errors.
"""
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import real_model_dir
from models import LoadError, generate, load_model
from tiny import (CASES, DECODERS, ENCODERS, HF_CLASSES, HIDDEN, MAX_POS, NUM_LABELS, TASKS, load_hf, random_ids,
                  special_ids, write_checkpoint)

ATOL = 1e-5


# ------------------------------------------------------------------ helpers


def special(family, name):
    return special_ids(family)[name]


def positions(mask):
    """Position ids derived from the attention mask (what our decoders use)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def run_hf(hf, family, task, ids, mask=None, token_type_ids=None):
    if mask is None:
        mask = torch.ones_like(ids)
    kw = dict(input_ids=ids, attention_mask=mask)
    if family in DECODERS:
        kw["position_ids"] = positions(mask)
    if token_type_ids is not None:
        kw["token_type_ids"] = token_type_ids
    with torch.no_grad():
        out = hf(**kw)
    return out.last_hidden_state if task == "base" else out.logits


def run_ours(model, ids, mask=None, **kw):
    with torch.no_grad():
        out = model(ids, attention_mask=mask, **kw)
    assert isinstance(out, torch.Tensor), type(out)
    return out


def padded_batch(rows, pad_id, side):
    """Pad a list of 1-D LongTensors to one batch; returns (input_ids, attention_mask)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
        ids[i, sl] = r
        mask[i, sl] = 1
    return ids, mask


def ragged_rows(family, lengths, seed):
    full = random_ids(family, len(lengths), max(lengths), seed=seed)
    return [full[i, :n] for i, n in enumerate(lengths)]


def assert_same_output(ours, ref, task, mask):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    if task == "seq-cls":
        torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    else:  # per-token outputs: only where there is a real token
        keep = mask.bool()
        torch.testing.assert_close(ours[keep], ref[keep], atol=ATOL, rtol=0)


def num_labels_for(task):
    return NUM_LABELS if task == "seq-cls" else 2


@pytest.fixture(scope="module")
def ours(tiny):
    """ours(family, task) -> (model, tokenizer), loaded once per module with load_model."""
    cache = {}

    def get(family, task):
        if (family, task) not in cache:
            folder = tiny.folder(family, task)
            cache[(family, task)] = load_model(str(folder), task=task, num_labels=num_labels_for(task))
        return cache[(family, task)]

    return get


# -------------------------------------------------- outputs equal transformers'


@pytest.mark.parametrize("family,task", CASES)
def test_logits_no_padding(tiny, ours, family, task):
    model, _ = ours(family, task)
    assert not model.training, "load_model must return the model in eval mode"
    ids = random_ids(family, 2, 11, seed=1)
    out = run_ours(model, ids)
    ref = run_hf(tiny.hf(family, task), family, task, ids)
    expected = {"base": (2, 11, HIDDEN), "seq-cls": (2, NUM_LABELS)}.get(task, (2, 11, ref.shape[-1]))
    assert tuple(out.shape) == expected
    assert_same_output(out, ref, task, torch.ones_like(ids))
    # attention_mask of all ones is the same as no mask
    torch.testing.assert_close(run_ours(model, ids, torch.ones_like(ids)), out, atol=ATOL, rtol=0)


PADDED_CASES = [(f, t, "right") for f, t in CASES] + [(f, t, "left") for f, t in CASES if f in DECODERS]


@pytest.mark.parametrize("family,task,side", PADDED_CASES)
def test_logits_with_padding(tiny, ours, family, task, side):
    model, _ = ours(family, task)
    rows = ragged_rows(family, [10, 6, 1, 8], seed=2)
    ids, mask = padded_batch(rows, special(family, "pad"), side)
    out = run_ours(model, ids, mask)
    assert_same_output(out, run_hf(tiny.hf(family, task), family, task, ids, mask), task, mask)
    # a padded row gives what the row gives alone
    for i, r in enumerate(rows):
        alone = run_ours(model, r[None])
        mine = out[i][mask[i].bool()] if task != "seq-cls" else out[i]
        torch.testing.assert_close(mine, alone[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("task", TASKS["bert"])
def test_bert_token_type_ids(tiny, ours, task):
    model, _ = ours("bert", task)
    ids = random_ids("bert", 2, 9, seed=3)
    tt = torch.zeros_like(ids)
    tt[:, 5:] = 1
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    out = run_ours(model, ids, mask, token_type_ids=tt)
    ref = run_hf(tiny.hf("bert", task), "bert", task, ids, mask, token_type_ids=tt)
    assert_same_output(out, ref, task, mask)
    # and token_type_ids=None means all zeros
    torch.testing.assert_close(run_ours(model, ids, mask),
                               run_ours(model, ids, mask, token_type_ids=torch.zeros_like(ids)),
                               atol=0, rtol=0)


@pytest.mark.parametrize("family", ENCODERS)
def test_encoders_have_no_causal_lm(tiny, family):
    with pytest.raises(LoadError):
        load_model(str(tiny.folder(family, "base")), task="causal-lm")


def test_base_task_from_a_causal_lm_checkpoint(tiny):
    """task='base' on a *ForCausalLM checkpoint gives the decoder's last hidden state."""
    folder = tiny.folder("llama", "causal-lm")
    model, _ = load_model(str(folder), task="base")
    hf = load_hf(folder, "llama", "causal-lm")
    ids = random_ids("llama", 2, 7, seed=4)
    with torch.no_grad():
        ref = hf.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(run_ours(model, ids), ref, atol=ATOL, rtol=0)


def test_bfloat16_load(tiny):
    model, _ = load_model(str(tiny.folder("llama", "causal-lm")), task="causal-lm", dtype=torch.bfloat16)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    assert dtypes == {torch.bfloat16}, dtypes
    ids = random_ids("llama", 1, 6)
    out = run_ours(model, ids)
    ref = run_hf(tiny.hf("llama", "causal-lm"), "llama", "causal-lm", ids)
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref, atol=0.2, rtol=0.05)


# ------------------------------------------------------------ greedy generation


def hf_generate(hf, ids, mask, **kw):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, do_sample=False, **kw)


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("batched", [False, True], ids=["single", "left-padded-batch"])
@pytest.mark.parametrize("family", DECODERS)
def test_greedy_generation(tiny, ours, family, batched, use_cache):
    model, _ = ours(family, "causal-lm")
    hf = tiny.hf(family, "causal-lm")
    pad, eos = special(family, "pad"), special(family, "eos")
    if batched:
        ids, mask = padded_batch(ragged_rows(family, [7, 3, 5], seed=5), pad, "left")
    else:
        ids = random_ids(family, 1, 6, seed=6)
        mask = torch.ones_like(ids)
    kw = dict(max_new_tokens=20, eos_token_id=eos, pad_token_id=pad, use_cache=use_cache)
    ref = hf_generate(hf, ids, mask, **kw)
    with torch.no_grad():
        out = generate(model, ids, attention_mask=mask, do_sample=False, **kw)
    assert out.dtype == torch.long
    assert torch.equal(out, ref), f"\nours {out.tolist()}\nhf   {ref.tolist()}"
    assert ref.shape[1] == ids.shape[1] + 20 or (ref[:, ids.shape[1]:] == eos).any()


@pytest.mark.parametrize("family", DECODERS)
def test_generation_eos_handling(tiny, ours, family):
    """Pick a token the model is known to generate as 'eos': rows stop, get padded, and the
    loop ends once every row has finished, exactly as in transformers."""
    model, _ = ours(family, "causal-lm")
    hf = tiny.hf(family, "causal-lm")
    pad = special(family, "pad")
    ids, mask = padded_batch(ragged_rows(family, [6, 4], seed=7), pad, "left")
    T = ids.shape[1]
    seq = ids[:1]  # row 0 has no padding: its plain greedy continuation, 4 steps
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, hf(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    stop = int(seq[0, T + 3])  # so row 0 produces `stop` after at most 4 new tokens
    for batch_ids, batch_mask in ((ids, mask), (ids[:1], mask[:1])):
        kw = dict(max_new_tokens=20, eos_token_id=stop, pad_token_id=pad)
        ref = hf_generate(hf, batch_ids, batch_mask, **kw)
        with torch.no_grad():
            out = generate(model, batch_ids, attention_mask=batch_mask, do_sample=False, **kw)
        assert torch.equal(out, ref), f"\nours {out.tolist()}\nhf   {ref.tolist()}"
    assert out.shape[1] <= T + 4  # the single row stopped early


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_sampling(tiny, ours, family):
    model, _ = ours(family, "causal-lm")
    ids = random_ids(family, 2, 5, seed=8)
    pad = special(family, "pad")
    kw = dict(max_new_tokens=8, eos_token_id=None, pad_token_id=pad)
    greedy = generate(model, ids, do_sample=False, **kw)
    # top_p so small that only the most likely token survives == greedy
    nucleus = generate(model, ids, do_sample=True, top_p=1e-6, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(nucleus, greedy)
    a = generate(model, ids, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(model, ids, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(3), **kw)
    assert torch.equal(a, b), "same generator seed must give the same sample"
    assert torch.equal(a[:, :5], ids) and a.shape[0] == 2 and a.shape[1] <= 13


# ------------------------------------------------------------------- tokenizers

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "In 1969, Apollo 11 landed; it cost $25.4 billion (≈ €200B today)!",
         "Café naïve — 東京 🙂 ok?",
         "a"]


@pytest.mark.parametrize("family", ["bert", "gpt2", "qwen2", "llama"])
def test_tiny_tokenizer_matches_transformers(tiny, ours, family):
    from transformers import AutoTokenizer

    task = TASKS[family][0]
    _, tok = ours(family, task)
    hf = AutoTokenizer.from_pretrained(str(tiny.folder(family, task)))
    check_tokenizer(tok, hf, TEXTS)


PAIRS = (["The quick brown fox jumps over the lazy dog.", "bad", "a b c d e f g h i j k l m n o p"],
         ["It was good.", "a terrible film with a long and winding plot that never ends at all", "q r s t u v"])


def check_pair_tokenizer(tok, hf):
    """Sentence pairs (GLUE's MRPC, MNLI, ...) as transformers encodes them: the pair template, truncation of the
    longer text first, and the second text's token type 1 where the model embeds token types (BERT)."""
    for max_length in (None, 12):
        ours = tok(PAIRS[0], text_pairs=PAIRS[1], padding=False, truncation=max_length is not None,
                   max_length=max_length, return_tensors=None)
        ref = hf(PAIRS[0], PAIRS[1], truncation=max_length is not None, max_length=max_length)
        assert ours["input_ids"] == ref["input_ids"], max_length
        assert ours["attention_mask"] == ref["attention_mask"], max_length
        if "token_type_ids" in tok.model_input_names:
            assert ours["token_type_ids"] == ref["token_type_ids"] and any(1 in t for t in ref["token_type_ids"])


@pytest.mark.parametrize("family", ["distilbert", "bert", "gpt2", "llama"])
def test_tiny_pair_tokenizer_matches_transformers(tiny, family):
    from transformers import AutoTokenizer, BertTokenizerFast

    folder = tiny.folder(family, "seq-cls")
    tok = load_model(str(folder), task="seq-cls", num_labels=NUM_LABELS)[1]
    assert ("token_type_ids" in tok.model_input_names) == (family == "bert")
    # the tiny checkpoints' tokenizer_config names no tokenizer class; BERT's own gives token types
    hf = (BertTokenizerFast(tokenizer_file=str(folder / "tokenizer.json")) if family == "bert"
          else AutoTokenizer.from_pretrained(str(folder)))
    check_pair_tokenizer(tok, hf)


def test_minilm_pair_tokenizer(minilm):
    from transformers import AutoTokenizer

    check_pair_tokenizer(load_model(str(minilm), task="base")[1], AutoTokenizer.from_pretrained(str(minilm)))


def check_tokenizer(tok, hf, texts):
    for t in texts:
        assert tok.encode(t) == hf(t)["input_ids"], t
    for side in ("right", "left"):
        tok.padding_side = hf.padding_side = side
        if hf.pad_token is None:
            hf.pad_token = hf.eos_token
        ours_b = tok(texts, padding=True, return_tensors="pt")
        ref_b = hf(texts, padding=True, return_tensors="pt")
        assert torch.equal(ours_b["input_ids"], ref_b["input_ids"]), side
        assert torch.equal(ours_b["attention_mask"], ref_b["attention_mask"]), side
        assert ours_b["input_ids"].dtype == torch.long and ours_b["attention_mask"].dtype == torch.long
    tok.padding_side = hf.padding_side = "right"
    ours_t = tok(texts, padding=True, truncation=True, max_length=7, return_tensors="pt")
    ref_t = hf(texts, padding=True, truncation=True, max_length=7, return_tensors="pt")
    assert torch.equal(ours_t["input_ids"], ref_t["input_ids"])
    single = tok(texts[1], return_tensors="pt")["input_ids"]
    assert single.shape == (1, len(hf(texts[1])["input_ids"]))
    for t in texts:
        ids = hf(t)["input_ids"]
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), t
    assert tok.eos_token_id == hf.eos_token_id
    assert tok.bos_token_id == hf.bos_token_id
    assert tok.pad_token_id == hf.pad_token_id  # for decoders without a pad token: eos on both sides
    assert tok.model_max_length == hf.model_max_length


# --------------------------------------------------------------- real checkpoints

PARAGRAPH = ("Hugging Face was founded in 2016 in New York City. By March 2024, its hub hosted over "
             "500,000 models (and 100k+ datasets)! Prices: $3.99, €4.50 or ¥600 — naïve café owners "
             "in Zürich & 東京 said: \"it's 100% fine\"; see https://huggingface.co/docs. 🚀\n"
             "Line two:\tTABS, CAPS, and numbers like 3.14159 or 1,000,000.")
SHORT = ["The capital of France is", "Parameter-efficient fine-tuning of 2 models, quickly."]


@pytest.fixture(scope="module")
def minilm():
    return real_model_dir("minilm-l6")


@pytest.fixture(scope="module")
def smollm():
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = real_model_dir("smollm2-135m")
    model, tok = load_model(str(folder), task="causal-lm")
    hf = LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager").eval()
    return model, tok, hf, AutoTokenizer.from_pretrained(str(folder))


def test_minilm_base(minilm):
    from transformers import AutoTokenizer, BertModel

    model, tok = load_model(str(minilm), task="base")
    hf = BertModel.from_pretrained(str(minilm), dtype=torch.float32, attn_implementation="eager").eval()
    batch = AutoTokenizer.from_pretrained(str(minilm))(SHORT, padding=True, return_tensors="pt")
    out = run_ours(model, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = hf(**batch).last_hidden_state
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-4, rtol=0)


def test_minilm_seq_cls_uses_pooler(minilm):
    from transformers import AutoTokenizer, BertForSequenceClassification

    model, _ = load_model(str(minilm), task="seq-cls", num_labels=3)
    hf = BertForSequenceClassification.from_pretrained(str(minilm), num_labels=3, dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    # the classifier is new in both: give transformers' the weights of ours (found by shape)
    new = {tuple(p.shape): p for n, p in model.named_parameters() if p.shape in ((3, 384), (3,))}
    assert set(new) == {(3, 384), (3,)}, "expected one (3, 384) classifier weight and its bias"
    with torch.no_grad():
        hf.classifier.weight.copy_(new[(3, 384)])
        hf.classifier.bias.copy_(new[(3,)])
    batch = AutoTokenizer.from_pretrained(str(minilm))(SHORT, padding=True, return_tensors="pt")
    out = run_ours(model, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = hf(**batch).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_minilm_tokenizer(minilm):
    from transformers import AutoTokenizer

    _, tok = load_model(str(minilm), task="base")
    check_tokenizer(tok, AutoTokenizer.from_pretrained(str(minilm)), [PARAGRAPH] + SHORT)


def test_minilm_by_short_name(minilm, monkeypatch, tmp_path):
    """A folder name in $PEFT_MODELS_DIR resolves (fetch_models.py's layout)."""
    monkeypatch.setenv("PEFT_MODELS_DIR", str(minilm.parent))
    monkeypatch.chdir(tmp_path)
    model, _ = load_model("minilm-l6", task="base")
    ref, _ = load_model(str(minilm), task="base")
    ids = torch.tensor([[101, 7592, 2088, 102]])
    torch.testing.assert_close(run_ours(model, ids), run_ours(ref, ids), atol=0, rtol=0)


def test_smollm_logits(smollm):
    model, _, hf, hf_tok = smollm
    batch = hf_tok(SHORT, padding=True, return_tensors="pt")
    out = run_ours(model, batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        ref = hf(**batch).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-4, rtol=0)


def test_smollm_tokenizer(smollm):
    _, tok, _, hf_tok = smollm
    check_tokenizer(tok, hf_tok, [PARAGRAPH] + SHORT)
    assert tok.decode(tok.encode(PARAGRAPH)) == PARAGRAPH


def test_smollm_greedy(smollm):
    model, _, hf, hf_tok = smollm
    hf_tok.padding_side = "left"
    batch = hf_tok(SHORT, padding=True, return_tensors="pt")
    hf_tok.padding_side = "right"
    kw = dict(max_new_tokens=10, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
    ref = hf_generate(hf, batch["input_ids"], batch["attention_mask"], **kw)
    with torch.no_grad():
        out = generate(model, batch["input_ids"], attention_mask=batch["attention_mask"], do_sample=False, **kw)
    assert torch.equal(out, ref), f"\nours {out.tolist()}\nhf   {ref.tolist()}"


# -------------------------------------------------------------- name resolution


def test_local_folder(tiny):
    folder = tiny.folder("gpt2", "causal-lm")
    model, tok = load_model(str(folder), task="causal-lm")
    ids = random_ids("gpt2", 1, 5)
    torch.testing.assert_close(run_ours(model, ids), run_hf(tiny.hf("gpt2", "causal-lm"), "gpt2", "causal-lm", ids),
                               atol=ATOL, rtol=0)


def one_line_error(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg.strip(), f"LoadError message should be one line: {msg!r}"
    return msg


@pytest.mark.parametrize("dtype", [torch.int8, "int8", "complex64", "nonsense"])
def test_a_dtype_that_is_not_a_float_type_is_refused(tiny, dtype):
    with pytest.raises(LoadError) as e:
        load_model(str(tiny.folder("gpt2", "causal-lm")), task="causal-lm", dtype=dtype)
    message = one_line_error(e)
    assert message.startswith("unsupported dtype") and message.endswith("use float32, bfloat16, float16 or float64")


def test_hub_is_offline():
    import huggingface_hub.constants as c

    assert c.HF_HUB_OFFLINE, "conftest must set HF_HUB_OFFLINE=1 before huggingface_hub is imported"


def test_unknown_name_offline(tmp_path, monkeypatch):
    assert issubclass(LoadError, ValueError)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PEFT_MODELS_DIR", str(tmp_path / "none"))
    name = "no-such-org/no-such-model-4f2a"
    with pytest.raises(LoadError) as e:
        load_model(name, cache_dir=str(tmp_path / "hf-cache"))
    msg = one_line_error(e)
    assert name in msg
    assert "cache" in msg.lower() and "folder" in msg.lower(), msg
    with pytest.raises(LoadError) as e:
        load_model(str(tmp_path / "does" / "not" / "exist"))
    assert "exist" in one_line_error(e)


def fake_hf_cache(cache, repo_id, src):
    """Lay out `src` as huggingface_hub's cache does: models--org--name/{refs/main, snapshots/<hash>/}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(src, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hf_cache_layout(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PEFT_MODELS_DIR", str(tmp_path / "none"))
    cache = tmp_path / "hf-cache"
    fake_hf_cache(cache, "tiny-org/tiny-llama", tiny.folder("llama", "causal-lm"))
    model, tok = load_model("tiny-org/tiny-llama", task="causal-lm", cache_dir=str(cache))
    ids = random_ids("llama", 2, 6)
    torch.testing.assert_close(run_ours(model, ids), run_hf(tiny.hf("llama", "causal-lm"), "llama", "causal-lm", ids),
                               atol=ATOL, rtol=0)
    assert tok.eos_token_id == special("llama", "eos")


ALIAS_CASES = [  # alias, family, Hub ids it may stand for
    ("distilbert", "distilbert", ["distilbert-base-uncased", "distilbert/distilbert-base-uncased"]),
    ("distilgpt2", "gpt2", ["distilgpt2", "distilbert/distilgpt2"]),
    ("gpt2", "gpt2", ["gpt2", "openai-community/gpt2"]),
    ("qwen2.5-0.5b", "qwen2", ["Qwen/Qwen2.5-0.5B"]),
    ("qwen2.5-0.5b-instruct", "qwen2", ["Qwen/Qwen2.5-0.5B-Instruct"]),
]


@pytest.mark.parametrize("alias,family,repo_ids", ALIAS_CASES, ids=[a[0] for a in ALIAS_CASES])
def test_alias_through_hf_cache(tiny, tmp_path, monkeypatch, alias, family, repo_ids):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PEFT_MODELS_DIR", str(tmp_path / "none"))
    cache = tmp_path / "hf-cache"
    for repo_id in repo_ids:
        fake_hf_cache(cache, repo_id, tiny.folder(family, "base"))
    model, _ = load_model(alias, task="base", cache_dir=str(cache))
    ids = random_ids(family, 1, 5)
    torch.testing.assert_close(run_ours(model, ids), run_hf(tiny.hf(family, "base"), family, "base", ids),
                               atol=ATOL, rtol=0)


# -------------------------------------------------------------- loading errors


@pytest.mark.parametrize("family,task,config", [
    ("gpt2", "causal-lm", {"scale_attn_by_inverse_layer_idx": True}),  # scale / (layer + 1)
    ("gpt2", "causal-lm", {"scale_attn_weights": False}),  # no 1 / sqrt(hs)
    ("gpt2", "causal-lm", {"scale_attn_weights": False, "scale_attn_by_inverse_layer_idx": True}),
], ids=["gpt2-by-layer", "gpt2-unscaled", "gpt2-both"])
def test_config_flags_that_change_the_math(tmp_path, family, task, config):
    """Config keys we used to ignore, which change transformers' logits (by 0.7 and 4.1 for these two)."""
    hf = write_checkpoint(tmp_path / "ck", family, task, seed=5, **config)
    ids = random_ids(family, 2, 9)
    ours = load_model(tmp_path / "ck", task=task)[0]
    torch.testing.assert_close(run_ours(ours, ids), run_hf(hf, family, task, ids), atol=ATOL, rtol=0)
    ours.train()  # training's attention (dropout on the probabilities: its own path) takes the scale too
    for module in ours.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for block in ours.transformer.h:
        block.attn_dropout = 1e-9  # rounds to keeping everything: plain attention, by the other path
    torch.testing.assert_close(run_ours(ours, ids), run_hf(hf, family, task, ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family,task,config,message", [
    ("qwen2", "causal-lm", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0, "layer_types": None},
     "sliding-window attention"),
    ("bert", "base", {"is_decoder": True}, "BERT as a decoder"),
    ("llama", "causal-lm", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
                            "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling 'linear'"),
], ids=["qwen2-sliding-window", "bert-decoder", "llama-rope-scaling-beside-default-parameters"])
def test_configs_we_cannot_compute_are_errors(tmp_path, family, task, config, message):
    """Each changed transformers' logits by 1-5 while ours stayed those of the plain architecture."""
    write_checkpoint(tmp_path / "ck", family, task)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**cfg, **config}))
    with pytest.raises(LoadError, match=f"^.*ck: {re.escape(message)}.* not supported"):
        load_model(tmp_path / "ck", task=task)


def test_tied_checkpoint_that_stores_another_head(tiny, tmp_path):
    folder = tiny.copy("llama-tied", "causal-lm", tmp_path / "ck")
    state = load_file(folder / "model.safetensors")
    embedding = state["model.embed_tokens.weight"]
    save_file({**state, "lm_head.weight": embedding.clone()}, folder / "model.safetensors")
    load_model(folder, task="causal-lm")  # the same head stored twice is fine
    save_file({**state, "lm_head.weight": embedding * 2}, folder / "model.safetensors")
    with pytest.raises(LoadError, match=r"ties lm_head to the input embedding \(tie_word_embeddings\), but the "
                                        r"checkpoint stores a different lm_head\.weight"):
        load_model(folder, task="causal-lm")


def test_layer_norm_gamma_and_beta_names(tiny, tmp_path):
    """Early BERT conversions name LayerNorm's weight and bias gamma and beta; transformers reads them."""
    folder = tiny.copy("bert", "base", tmp_path / "ck")
    state = load_file(folder / "model.safetensors")
    renamed = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v
               for k, v in state.items()}
    assert sum(k.endswith(".gamma") for k in renamed) > 2
    save_file(renamed, folder / "model.safetensors")
    ids = random_ids("bert", 2, 9)
    torch.testing.assert_close(run_ours(load_model(folder, task="base")[0], ids),
                               run_ours(load_model(tiny.folder("bert", "base"), task="base")[0], ids), atol=0, rtol=0)


def test_tokenizer_config_sides(tiny, tmp_path):
    """padding_side and truncation_side in tokenizer_config.json, as transformers' tokenizer reads them."""
    from transformers import AutoTokenizer

    folder = tiny.copy("llama", "causal-lm", tmp_path / "ck")
    path = folder / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "padding_side": "left", "truncation_side": "left"}))
    tok, hf = load_model(folder, task="causal-lm")[1], AutoTokenizer.from_pretrained(str(folder))
    hf.pad_token = hf.pad_token or hf.eos_token  # ours pads with eos when the files name no pad token
    texts = ["a b", "the quick brown fox jumps over the lazy dog"]
    assert tok(texts)["input_ids"].tolist() == hf(texts, padding=True)["input_ids"]
    assert tok(texts, truncation=True, max_length=4)["input_ids"].tolist() == \
        hf(texts, padding=True, truncation=True, max_length=4)["input_ids"]


def edit_json(path, change):
    data = json.loads(path.read_text()) if path.exists() else {}
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("added_tokens_decoder", [False, True])
def test_special_tokens_map_wins_only_in_the_older_layout(tiny, tmp_path, added_tokens_decoder):
    """transformers reads special_tokens_map.json over tokenizer_config.json, unless the config holds
    added_tokens_decoder (the newer layout), and then ignores the map; ours read the config over the map."""
    from transformers import AutoTokenizer

    folder = tiny.copy("llama", "causal-lm", tmp_path / "ck")
    edit_json(folder / "tokenizer_config.json", lambda c: c.update(
        eos_token={"__type": "AddedToken", "content": "<unk>", "special": True}, pad_token="<s>",
        **({"added_tokens_decoder": {"0": {"content": "<unk>", "special": True}}} if added_tokens_decoder else {})))
    edit_json(folder / "special_tokens_map.json", lambda m: m.update(eos_token="</s>", pad_token="</s>"))
    tok, hf = load_model(folder, task="causal-lm")[1], AutoTokenizer.from_pretrained(str(folder))
    assert (tok.eos_token_id, tok.pad_token_id) == (hf.eos_token_id, hf.pad_token_id)
    assert tok.eos_token_id == (0 if added_tokens_decoder else 2)


def test_named_special_tokens_are_skipped_when_decoding(tiny, tmp_path):
    """eos named in tokenizer_config.json but not flagged special in tokenizer.json: transformers still
    skips it (its text leaked into generations and ROUGE before)."""
    from transformers import AutoTokenizer

    folder = tiny.copy("qwen2", "causal-lm", tmp_path / "ck")
    edit_json(folder / "tokenizer.json", lambda t: [a.update(special=False) for a in t["added_tokens"]])
    tok, hf = load_model(folder, task="causal-lm")[1], AutoTokenizer.from_pretrained(str(folder))
    ids = hf("Hi there")["input_ids"] + [tok.eos_token_id] + hf(" you")["input_ids"]
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "Hi there you"
    assert tok.encode("a<|endoftext|>b") == hf("a<|endoftext|>b")["input_ids"]


def test_padding_and_truncation_stored_in_tokenizer_json_are_defaults(tiny, tmp_path):
    """tokenizer.json's stored padding (pad token, side) and truncation side apply where tokenizer_config.json
    says nothing, as transformers takes them; they were ignored (right padding with eos)."""
    from transformers import AutoTokenizer

    folder = tiny.copy("llama", "causal-lm", tmp_path / "ck")
    edit_json(folder / "tokenizer.json", lambda t: t.update(
        padding={"strategy": "BatchLongest", "direction": "Left", "pad_to_multiple_of": None, "pad_id": 0,
                 "pad_type_id": 0, "pad_token": "<unk>"},
        truncation={"direction": "Left", "max_length": 512, "strategy": "LongestFirst", "stride": 0}))
    tok, hf = load_model(folder, task="causal-lm")[1], AutoTokenizer.from_pretrained(str(folder))
    assert (tok.padding_side, tok.truncation_side, tok.pad_token_id) == (hf.padding_side, hf.truncation_side,
                                                                         hf.pad_token_id) == ("left", "left", 0)
    texts = ["a b", "the quick brown fox jumps over the lazy dog"]
    assert tok(texts, truncation=True, max_length=5)["input_ids"].tolist() == \
        hf(texts, padding=True, truncation=True, max_length=5)["input_ids"]
    edit_json(folder / "tokenizer_config.json", lambda c: c.update(padding_side="right", truncation_side="right"))
    tok, hf = load_model(folder, task="causal-lm")[1], AutoTokenizer.from_pretrained(str(folder))
    assert (tok.padding_side, tok.truncation_side) == (hf.padding_side, hf.truncation_side) == ("right", "right")


def test_clean_up_tokenization_spaces(minilm, tmp_path):
    """A WordPiece tokenizer with clean_up_tokenization_spaces decodes "do n't" as "don't", as transformers does."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path / "minilm"
    shutil.copytree(minilm, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    shutil.copy(next(minilm.glob("*.safetensors")), folder)
    edit_json(folder / "tokenizer_config.json", lambda c: c.update(clean_up_tokenization_spaces=True))
    tok, hf = load_model(folder, task="base")[1], AutoTokenizer.from_pretrained(str(folder))
    ids = hf("Hello, world. I don't know, he's here!")["input_ids"]
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == "hello, world. i don't know, he's here!"


def test_saved_folders_keep_the_chat_template_and_stop_ids(tiny, tmp_path):
    """A merged or adapter folder is self-contained: transformers 5 keeps a chat template only in
    chat_template.jinja, and generation_config.json's eos ids stop generation; both were left behind."""
    from lora import LoraConfig, apply_lora, merge_and_unload
    from models import save_model
    from transformers import AutoTokenizer

    folder = tiny.copy("qwen2", "causal-lm", tmp_path / "ck")
    (folder / "chat_template.jinja").write_text("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}")
    edit_json(folder / "generation_config.json", lambda g: g.update(eos_token_id=[0, 5]))
    model, tok = load_model(folder, task="causal-lm")
    apply_lora(model, LoraConfig(r=2, target_modules=["q_proj"]))
    save_model(merge_and_unload(model), tmp_path / "merged", tok)
    assert load_model(tmp_path / "merged", task="causal-lm")[1].stop_token_ids == tok.stop_token_ids == [0, 5]
    messages = [{"role": "user", "content": "hi"}]
    assert AutoTokenizer.from_pretrained(str(tmp_path / "merged")).apply_chat_template(messages, tokenize=False) == \
        AutoTokenizer.from_pretrained(str(folder)).apply_chat_template(messages, tokenize=False) == "<|user|>hi"


@pytest.mark.parametrize("config", [{}, {"legacy": True}, {"add_prefix_space": False}, {"tokenizer_class": "LlamaTokenizerFast"}])
def test_llama_tokenizer_class_gets_its_metaspace_pipeline(tiny, tmp_path, config):
    """Llama-2 / Mistral / TinyLlama files: tokenizer.json's normaliser prepends "▁" always; transformers 5
    builds LlamaTokenizer around a Metaspace that prepends one only where the text has none, so " negative"
    (a label word, an answer) got a token "▁" of its own in front."""
    import data
    from models.loading import read_config
    from models.tokenizer import Tokenizer
    from tiny import CORPUS
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer

    folder = tiny.copy("llama", "causal-lm", tmp_path / "ck")
    rust = RustTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    rust.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme="first")
    rust.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    rust.pre_tokenizer = None  # the layout converted SentencePiece files have
    rust.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    rust.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    rust.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    rust.save(str(folder / "tokenizer.json"))
    edit_json(folder / "tokenizer_config.json", lambda c: c.update({"tokenizer_class": "LlamaTokenizer", **config}))
    tok, hf = Tokenizer.from_folder(folder, read_config(folder)), AutoTokenizer.from_pretrained(str(folder))
    assert type(hf).__name__ == "LlamaTokenizer"
    for text in [" negative", "negative", " The spider has 8 legs.", "a  b c", "Question: hi\nAnswer: There", "</s> was"]:
        assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"], text
        assert tok.encode(text) == hf(text)["input_ids"], text
        ids = hf(text)["input_ids"] + [5, 9]
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    eos = [hf.eos_token_id]
    assert data.label_word_ids(tok, ["negative"]) == [hf(" negative", add_special_tokens=False)["input_ids"] + eos]


def test_folder_without_config(tiny, tmp_path):
    folder = tiny.copy("gpt2", "causal-lm", tmp_path / "ck")
    (folder / "config.json").unlink()
    with pytest.raises(LoadError) as e:
        load_model(str(folder))
    assert "config.json" in one_line_error(e)


def test_a_file_given_as_the_model(tiny, tmp_path):
    """The config.json itself, say: named as a file (was "local folder ... (does not exist)")."""
    folder = tiny.copy("gpt2", "causal-lm", tmp_path / "ck")
    with pytest.raises(LoadError, match=r"^.*ck/config\.json is a file; pass the folder that holds config\.json, "
                                        r"\*\.safetensors and tokenizer\.json$"):
        load_model(str(folder / "config.json"))


def test_unsupported_model_type(tiny, tmp_path):
    folder = tiny.copy("bert", "base", tmp_path / "ck")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "t5"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError) as e:
        load_model(str(folder), task="base")
    assert "t5" in one_line_error(e)


def test_folder_without_tokenizer(tiny, tmp_path):
    folder = tiny.copy("llama", "causal-lm", tmp_path / "ck")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(LoadError) as e:
        load_model(str(folder))
    assert "tokenizer.json" in one_line_error(e)


BROKEN = [("gpt2", "causal-lm"), ("llama", "causal-lm"), ("qwen2", "seq-cls"), ("bert", "seq-cls"),
          ("distilbert", "base")]


def pick_matrix(state):
    """A 2-D tensor of the second layer, and the part of its name from the layer index on."""
    key = next(k for k, v in state.items() if re.search(r"\.1\.", k) and v.dim() == 2)
    return key, re.search(r"(\d+\..*)$", key).group(1)


@pytest.mark.parametrize("family,task", BROKEN)
def test_missing_tensor(tiny, tmp_path, family, task):
    folder = tiny.copy(family, task, tmp_path / "ck")
    state = load_file(str(folder / "model.safetensors"))
    key, short = pick_matrix(state)
    del state[key]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoadError) as e:
        load_model(str(folder), task=task, num_labels=num_labels_for(task))
    assert short in one_line_error(e)


@pytest.mark.parametrize("family,task", BROKEN)
def test_wrongly_shaped_tensor(tiny, tmp_path, family, task):
    folder = tiny.copy(family, task, tmp_path / "ck")
    state = load_file(str(folder / "model.safetensors"))
    key, short = pick_matrix(state)
    a, b = state[key].shape
    state[key] = torch.zeros(a + 1, b)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LoadError) as e:
        load_model(str(folder), task=task, num_labels=num_labels_for(task))
    msg = one_line_error(e)
    assert short in msg
    assert re.search(rf"\b{a + 1}\D{{1,4}}{b}\b", msg) and re.search(rf"\b{a}\D{{1,4}}{b}\b", msg), \
        f"message should give both shapes ({a + 1}, {b}) and ({a}, {b}): {msg}"


@pytest.mark.parametrize("family,task", [("llama", "causal-lm"), ("gpt2", "seq-cls"), ("bert", "base")])
def test_sharded_checkpoint(tmp_path, family, task):
    folder = tmp_path / "sharded"
    write_checkpoint(folder, family, task, seed=11, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("*.safetensors"))) > 1
    assert not (folder / "model.safetensors").exists()
    model, _ = load_model(str(folder), task=task, num_labels=num_labels_for(task))
    ids = random_ids(family, 2, 7, seed=12)
    ref = run_hf(load_hf(folder, family, task), family, task, ids)
    assert_same_output(run_ours(model, ids), ref, task, torch.ones_like(ids))


def test_model_safetensors_comes_before_an_index(tmp_path):
    """transformers reads model.safetensors when the folder also holds a (stale) index and its shards."""
    folder = tmp_path / "ck"
    write_checkpoint(folder, "llama", "causal-lm", seed=11, max_shard_size="20KB")
    shards = tmp_path / "shards"
    shutil.copytree(folder, shards)
    write_checkpoint(tmp_path / "single", "llama", "causal-lm", seed=12)
    shutil.copy(tmp_path / "single" / "model.safetensors", folder / "model.safetensors")
    model, _ = load_model(str(folder), task="causal-lm")
    ids = random_ids("llama", 2, 7, seed=13)
    ref = run_hf(load_hf(folder, "llama", "causal-lm"), "llama", "causal-lm", ids)
    torch.testing.assert_close(run_ours(model, ids), ref, atol=1e-5, rtol=0)
    stale = run_hf(load_hf(shards, "llama", "causal-lm"), "llama", "causal-lm", ids)
    assert (ref - stale).abs().max() > 1, "the two checkpoints should differ"


def test_other_safetensors_files_are_not_read(tiny, tmp_path):
    folder = tiny.copy("gpt2", "causal-lm", tmp_path / "ck")
    write_checkpoint(tmp_path / "other", "gpt2", "causal-lm", seed=21)
    shutil.copy(tmp_path / "other" / "model.safetensors", folder / "model_v0.safetensors")  # sorts after model.
    model, _ = load_model(str(folder), task="causal-lm")
    ids = random_ids("gpt2", 2, 7, seed=13)
    ref = run_hf(load_hf(folder, "gpt2", "causal-lm"), "gpt2", "causal-lm", ids)
    torch.testing.assert_close(run_ours(model, ids), ref, atol=1e-5, rtol=0)
    (folder / "model.safetensors").unlink()
    with pytest.raises(LoadError) as e:
        load_model(str(folder), task="causal-lm")
    assert "model_v0.safetensors" in one_line_error(e)


def test_save_model_into_the_folder_it_came_from(tiny, tmp_path):
    from models import save_model

    folder = tiny.copy("bert", "base", tmp_path / "ck")
    model, tok = load_model(str(folder), task="base")
    with torch.no_grad():
        model.embeddings.LayerNorm.weight.add_(0.5)
    ids = random_ids("bert", 2, 7, seed=13)
    expected = run_ours(model, ids)
    save_model(model, folder, tok)
    reloaded, tok2 = load_model(str(folder), task="base")
    torch.testing.assert_close(run_ours(reloaded, ids), expected, atol=0, rtol=0)
    assert tok2.encode("the quick brown fox") == tok.encode("the quick brown fox")


@pytest.mark.parametrize("tokenizer_json_lowercase,config", [
    (True, {"do_lower_case": False}),
    (False, {}),  # transformers' BertTokenizer lowercases by default
    (True, {"tokenize_chinese_chars": False}),
    (True, {"strip_accents": False}),
    (False, {"do_lower_case": False, "strip_accents": True}),
    (False, {"tokenizer_class": None}),  # no class named (bert-base-uncased): config.json's model_type picks BERT's
])
def test_bert_tokenizer_normalizer_from_tokenizer_config(tiny, tmp_path, tokenizer_json_lowercase, config):
    """transformers 5 builds a BertTokenizer's normalizer from tokenizer_config.json, not tokenizer.json."""
    from transformers import AutoTokenizer

    folder = tiny.copy("bert", "base", tmp_path / "ck")
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    data["normalizer"]["lowercase"] = tokenizer_json_lowercase
    path.write_text(json.dumps(data))
    path = folder / "tokenizer_config.json"
    cfg = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("do_lower_case", "strip_accents")}
    cfg = {**cfg, "tokenizer_class": "BertTokenizer", **config}
    path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    tok, hf = load_model(folder, task="base")[1], AutoTokenizer.from_pretrained(str(folder))
    assert type(hf).__name__ == "BertTokenizer"
    for text in ["The Quick brown fox jumps", "café Naïve 東京 the lazy dog"]:
        assert tok.encode(text) == hf(text)["input_ids"], text


@pytest.mark.parametrize("family,task", [("distilbert", "base"), ("bert", "seq-cls"), ("gpt2", "causal-lm"),
                                         ("qwen2", "causal-lm"), ("llama", "base")])
def test_too_long_sequence(ours, family, task):
    model, _ = ours(family, task)
    run_ours(model, random_ids(family, 1, MAX_POS))  # exactly max positions is fine
    with pytest.raises(ValueError) as e:
        run_ours(model, random_ids(family, 1, MAX_POS + 1))
    msg = str(e.value)
    assert str(MAX_POS + 1) in msg and str(MAX_POS) in msg.replace(str(MAX_POS + 1), ""), msg


DAMAGED_FILES = {  # file -> (new content, the message's end)
    "config.json": (b'{"model_type": "gpt2",', r"config\.json: not valid JSON \(Expecting property name enclosed in "
                                               r"double quotes, line 1 column 23\)"),
    "tokenizer.json": (b'{"version": ', r"tokenizer\.json: the tokenizers library cannot read it \(.*\)"),
    "tokenizer_config.json": (b"[1, 2]", r"tokenizer_config\.json: expected a JSON object \(\{\.\.\.\}\), found a list"),
    "model.safetensors": (b"\x08\x00\x00\x00\x00\x00\x00\x00{}", r"model\.safetensors: not a readable safetensors file "
                                                                  r"\(.*\)"),
    "model.safetensors.index.json": (b'{"metadata": {}}', r"model\.safetensors\.index\.json: no weight_map "
                                                          r"\(tensor name -> file\)"),
}


@pytest.mark.parametrize("name", DAMAGED_FILES)
def test_a_damaged_file_is_one_line_naming_it(tiny, tmp_path, name):
    folder = tiny.copy("gpt2", "causal-lm", tmp_path / "model")
    content, message = DAMAGED_FILES[name]
    (folder / name).write_bytes(content)
    if name == "model.safetensors.index.json":  # read only when there is no model.safetensors
        (folder / "model.safetensors").rename(folder / "model-00001-of-00001.safetensors")
    with pytest.raises(LoadError, match=f"^{re.escape(str(folder))}/{message}$") as e:
        load_model(folder, task="causal-lm")
    one_line_error(e)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_generation_up_to_the_last_position(tiny, ours, family):
    """T + new - 1 positions (the last token is not fed back) may fill the model exactly, and match transformers;
    one more is a ValueError before the first step, not after max_new_tokens - 1 of them."""
    model, _ = ours(family, "causal-lm")
    ids = random_ids(family, 1, 10, seed=3)
    fits = MAX_POS - ids.shape[1] + 1
    kw = dict(max_new_tokens=fits, eos_token_id=-1, pad_token_id=special(family, "pad"))  # no eos: all steps run
    out = generate(model, ids, **kw)
    assert out.shape[1] == MAX_POS + 1
    assert torch.equal(out, hf_generate(tiny.hf(family, "causal-lm"), ids, torch.ones_like(ids), **kw))
    calls = []
    hook = model.register_forward_hook(lambda *a: calls.append(1))  # the model is shared by the module's tests
    try:
        with pytest.raises(ValueError, match=rf"^10 prompt tokens \+ {fits + 1} new tokens exceed the model's "
                                             rf"maximum of {MAX_POS} positions$"):
            generate(model, ids, **{**kw, "max_new_tokens": fits + 1})
    finally:
        hook.remove()
    assert not calls


@pytest.mark.parametrize("family", ["distilbert", "bert", "gpt2", "llama"])
def test_a_head_for_other_labels_starts_fresh_as_in_transformers(tiny, family):
    """A checkpoint fine-tuned for 3 labels, loaded for 2: an error by default; with ignore_mismatched_sizes the
    head starts fresh, as transformers' option of that name does, and everything else loads. Checked by
    copying our fresh head into transformers' model: the logits must agree (DistilBERT's pre_classifier
    keeps the checkpoint's weights in both)."""
    folder = tiny.folder(family, "seq-cls")  # NUM_LABELS = 3 outputs
    with pytest.raises(LoadError, match=r"has shape \(3,( \d+)?\), the model expects \(2,( \d+)?\) "
                                        r"\(pass num_labels"):
        load_model(str(folder), task="seq-cls", num_labels=2)
    model, _ = load_model(str(folder), task="seq-cls", num_labels=2, ignore_mismatched_sizes=True)
    head = "classifier" if family in ("distilbert", "bert") else "score"
    assert model.resized_heads == [head] and head in model.random_heads
    hf = HF_CLASSES[(family, "seq-cls")].from_pretrained(str(folder), num_labels=2, ignore_mismatched_sizes=True,
                                                          attn_implementation="eager", dtype=torch.float32).eval()
    fresh = model.get_submodule(head).state_dict()
    assert fresh["weight"].shape[0] == 2
    hf.get_submodule(head).load_state_dict(fresh)
    ids = random_ids(family, 2, 7)
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(model(ids, torch.ones_like(ids)), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(do_sample=True, temperature=float("nan")), r"^temperature must be > 0 when sampling, got nan$"),
    (dict(max_new_tokens=-3), r"^max_new_tokens must be a positive integer, got -3$"),
    (dict(max_new_tokens=0), r"^max_new_tokens must be a positive integer, got 0$"),
])
def test_generation_arguments_out_of_range_are_errors(tiny, ours, kwargs, message):
    """transformers refuses them too; a nan temperature failed inside torch.multinomial and max_new_tokens < 1
    returned the prompt."""
    model, _ = ours("gpt2", "causal-lm")
    with pytest.raises(ValueError, match=message):
        generate(model, random_ids("gpt2", 1, 5), **kwargs)


def test_generation_needs_a_token_in_every_row(tiny, ours):
    """A row of padding only (an empty prompt in a left-padded batch) has nothing to continue from."""
    model, _ = ours("gpt2", "causal-lm")
    ids = random_ids("gpt2", 2, 4)
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]])
    for args in ((ids, mask), (ids[:, :0], mask[:, :0])):
        with pytest.raises(ValueError, match=r"^every row needs at least one prompt token to continue"):
            generate(model, *args, max_new_tokens=3)


DROPOUT_ONLY = {  # the config's residual / embedding dropout at 0.5, attention dropout off
    "bert": dict(hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.0),
    "distilbert": dict(dropout=0.5, attention_dropout=0.0),
    "gpt2": dict(resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.0),
}


@pytest.mark.parametrize("family", DROPOUT_ONLY)
def test_dropout_sits_where_transformers_puts_it(tmp_path, monkeypatch, family):
    """Both libraries' dropout made the same deterministic x / (1 - p), so train-mode outputs differ only if a
    dropout is placed elsewhere: DistilBERT had one more, after the attention's out_lin (1.6 off)."""
    import models.fused

    def scale(x, p=0.5, training=True, inplace=False):
        return x / (1 - p) if training and p > 0 else x

    monkeypatch.setattr(models.fused, "dropout", scale)
    monkeypatch.setattr(torch.nn.functional, "dropout", scale)
    write_checkpoint(tmp_path / "ck", family, "base", seed=3, **DROPOUT_ONLY[family])
    model = load_model(str(tmp_path / "ck"), task="base")[0].train()
    ref = load_hf(tmp_path / "ck", family, "base").train()
    ids = random_ids(family, 2, 9, seed=1)
    with torch.no_grad():
        out, expected = run_ours(model, ids), run_hf(ref, family, "base", ids)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_bert_classifier_dropout_of_zero_is_kept(tmp_path):
    write_checkpoint(tmp_path / "ck", "bert", "seq-cls", hidden_dropout_prob=0.5, classifier_dropout=0.0)
    model = load_model(str(tmp_path / "ck"), task="seq-cls", num_labels=NUM_LABELS)[0]
    assert model.dropout.p == load_hf(tmp_path / "ck", "bert", "seq-cls").dropout.p == 0.0  # was 0.5


def test_rope_parameters_theta_wins_over_a_top_level_one(tmp_path):
    """transformers 5 reads rope_parameters' theta; a stale top-level rope_theta beside it gave logits off by 0.35."""
    hf = write_checkpoint(tmp_path / "ck", "llama", "causal-lm", seed=3)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 20000.0}
    cfg["rope_theta"] = 30000.0
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    hf = load_hf(tmp_path / "ck", "llama", "causal-lm")
    assert hf.config.rope_parameters["rope_theta"] == 20000.0
    ids = random_ids("llama", 2, 9)
    ours = load_model(tmp_path / "ck", task="causal-lm")[0]
    torch.testing.assert_close(run_ours(ours, ids), run_hf(hf, "llama", "causal-lm", ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_classifier_pools_the_last_token_that_is_not_the_pad_id(tiny, ours, family):
    """transformers' rule: a real token equal to the pad id (eos used as pad) counts as padding; the mask is
    not read. Pooling by the mask gave logits off by 0.8-3.5 for rows ending in that token."""
    model, _ = ours(family, "seq-cls")
    pad = special(family, "pad")
    ids = random_ids(family, 3, 8, seed=4)
    ids[0, -1] = pad  # a real token equal to the pad id ends the row
    ids[1, 5:] = pad  # "... eos" then right padding
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ref = run_hf(tiny.hf(family, "seq-cls"), family, "seq-cls", ids, mask)
    torch.testing.assert_close(run_ours(model, ids, mask), ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(run_ours(model, ids), ref, atol=ATOL, rtol=0)


def test_decoder_classifier_without_a_pad_id_takes_the_tokenizers(tiny, tmp_path):
    """A config naming no pad token (GPT-2's): transformers refuses batches; ours takes the pad token the
    tokenizer pads with and saves it in config.json, so transformers then pools as we do."""
    from models import save_model
    from models.common import last_token_index

    folder = tiny.copy("gpt2", "seq-cls", tmp_path / "ck")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["pad_token_id"]
    (folder / "config.json").write_text(json.dumps(cfg))
    model, tok = load_model(str(folder), task="seq-cls", num_labels=NUM_LABELS)
    assert model.pad_token_id == tok.pad_token_id == special("gpt2", "eos")
    save_model(model, tmp_path / "saved", tok)
    hf = load_hf(tmp_path / "saved", "gpt2", "seq-cls")
    assert hf.config.pad_token_id == tok.pad_token_id
    rows = ragged_rows("gpt2", [7, 4], seed=6)
    ids, mask = padded_batch(rows, tok.pad_token_id, "right")
    torch.testing.assert_close(run_ours(model, ids, mask), run_hf(hf, "gpt2", "seq-cls", ids, mask), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="without a pad token"):
        last_token_index(ids, mask, None)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generation_without_a_mask_reads_pad_tokens_as_padding(tiny, ours, family):
    """As transformers infers the mask (pad tokens in the prompt, when pad is not an eos); before, a
    left-padded batch without its mask generated other tokens."""
    model, _ = ours(family, "causal-lm")
    pad, eos = (0, special(family, "eos")) if family == "llama" else (special(family, "pad"), special(family, "eos"))
    rows = ragged_rows(family, [7, 4], seed=8)
    ids, mask = padded_batch(rows, pad, "left")
    with_mask = generate(model, ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=pad)
    without = generate(model, ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=pad)
    if pad != eos:
        assert torch.equal(without, with_mask)
        hf = tiny.hf(family, "causal-lm")
        ref = hf.generate(input_ids=ids, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=pad)
        assert torch.equal(without, ref[:, :without.shape[1]])
    else:  # pad is eos (GPT-2): the prompt's eos tokens are text, as transformers reads them
        assert torch.equal(without, generate(model, ids, torch.ones_like(ids), max_new_tokens=6, eos_token_id=eos,
                                             pad_token_id=pad))


def test_save_model_keeps_label_names_dtype_and_architecture(tiny, tmp_path):
    """Label names that fit the head stay (they were rewritten to LABEL_i); config.json's dtype is the
    tensors' (transformers' dtype="auto" loaded bf16 files as float32); architectures names the saved task's
    class (a classifier from a causal-LM checkpoint said LlamaForCausalLM)."""
    from transformers import AutoModelForSequenceClassification

    from models import save_model

    folder = tiny.copy("llama", "seq-cls", tmp_path / "ck")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["id2label"] = {str(i): f"class-{i}" for i in range(NUM_LABELS)}
    cfg["label2id"] = {f"class-{i}": i for i in range(NUM_LABELS)}
    (folder / "config.json").write_text(json.dumps(cfg))
    model, tok = load_model(str(folder), task="seq-cls", num_labels=NUM_LABELS, dtype=torch.bfloat16)
    save_model(model, tmp_path / "saved", tok)
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["id2label"] == cfg["id2label"] and saved["dtype"] == "bfloat16"
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "saved"))
    assert hf.dtype == torch.bfloat16 and hf.config.id2label[1] == "class-1"

    causal = tiny.folder("llama", "causal-lm")
    classifier, tok = load_model(str(causal), task="seq-cls", num_labels=3)
    save_model(classifier, tmp_path / "from-causal", tok)
    saved = json.loads((tmp_path / "from-causal" / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForSequenceClassification"] and len(saved["id2label"]) == 3


def test_a_shard_the_index_lists_but_the_folder_lacks(tmp_path):
    write_checkpoint(tmp_path / "ck", "llama", "causal-lm", max_shard_size="20KB")
    shards = sorted((tmp_path / "ck").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(LoadError, match=f"lists shard\\(s\\) the folder lacks: {shards[-1].name}"):
        load_model(tmp_path / "ck", task="causal-lm")


def test_qwen2_sliding_window_on_no_layer_is_plain_attention(tmp_path):
    """use_sliding_window with max_window_layers >= the layers: transformers slides in no layer (it was refused)."""
    hf = write_checkpoint(tmp_path / "ck", "qwen2", "causal-lm", seed=2, use_sliding_window=True, sliding_window=4,
                          max_window_layers=2)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg.pop("layer_types", None)  # as older configs: derived from max_window_layers
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    ids = random_ids("qwen2", 2, 9)
    ours = load_model(tmp_path / "ck", task="causal-lm")[0]
    torch.testing.assert_close(run_ours(ours, ids), run_hf(hf, "qwen2", "causal-lm", ids), atol=ATOL, rtol=0)


def test_a_config_pad_id_of_minus_one_means_none(tiny, tmp_path):
    """LLaMA-1-era conversions say "pad_token_id": -1; loading stopped on an OverflowError in the tokenizer."""
    folder = tiny.copy("llama", "causal-lm", tmp_path / "ck")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "pad_token_id": -1}))
    model, tok = load_model(str(folder), task="causal-lm")
    assert tok.pad_token_id == tok.eos_token_id == special("llama", "eos")
    classifier, _ = load_model(str(folder), task="seq-cls", num_labels=NUM_LABELS)  # takes the tokenizer's, as none
    assert classifier.pad_token_id == classifier.config["pad_token_id"] == special("llama", "eos")


@pytest.mark.parametrize("config", [{"sliding_window": None}, {"max_window_layers": None, "layer_types": None}],
                         ids=["no-window", "max-window-layers-missing"])
def test_qwen2_sliding_window_settings_transformers_reads_as_plain_attention(tmp_path, config):
    hf = write_checkpoint(tmp_path / "ck", "qwen2", "causal-lm", seed=2, use_sliding_window=True, sliding_window=4)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg.pop("layer_types", None)
    cfg = {**cfg, **config}
    if "max_window_layers" in config:
        del cfg["max_window_layers"]  # transformers' default, 28, covers both layers
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    hf = load_hf(tmp_path / "ck", "qwen2", "causal-lm")
    assert set(hf.config.layer_types) == {"full_attention"}
    ids = random_ids("qwen2", 2, 9)
    ours = load_model(tmp_path / "ck", task="causal-lm")[0]
    torch.testing.assert_close(run_ours(ours, ids), run_hf(hf, "qwen2", "causal-lm", ids), atol=ATOL, rtol=0)


def test_a_saved_tokenizer_names_the_pad_token_it_padded_with(tiny, tmp_path):
    """GPT-2-style files name no pad token; ours pads with eos, and the saved tokenizer_config.json now says so, so
    transformers' AutoTokenizer pads alike (it could not pad at all)."""
    from transformers import AutoTokenizer

    model, tok = load_model(str(tiny.folder("gpt2", "seq-cls")), task="seq-cls", num_labels=NUM_LABELS)
    assert AutoTokenizer.from_pretrained(str(tiny.folder("gpt2", "seq-cls"))).pad_token is None
    tok.save(tmp_path / "saved")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert theirs.pad_token_id == tok.pad_token_id == special("gpt2", "eos")
    batch = theirs(["the quick brown fox", "a"], padding=True)
    assert batch["input_ids"] == tok(["the quick brown fox", "a"], return_tensors=None)["input_ids"]


def test_a_pad_token_the_vocabulary_lacks_is_replaced_in_the_saved_tokenizer(tiny, tmp_path):
    """Ours pads with eos when tokenizer_config.json names a pad token the vocabulary lacks; the saved file kept the
    missing name, and transformers then added it as a new id and padded with that."""
    from transformers import AutoTokenizer

    folder = tiny.copy("llama", "causal-lm", tmp_path / "ck")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<pad>"}))
    _, tok = load_model(str(folder), task="causal-lm")
    assert tok.pad_token_id == special("llama", "eos")
    tok.save(tmp_path / "saved")
    assert AutoTokenizer.from_pretrained(str(tmp_path / "saved")).pad_token_id == tok.pad_token_id
