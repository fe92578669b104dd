"""Tiny random Hugging Face checkpoints for the tests (no download, seeded).

Every checkpoint is written with transformers' own ``save_pretrained`` from a
small config (hidden 32, 2 layers, a few hundred tokens of vocabulary) together
with a tiny ``tokenizer.json`` trained with the ``tokenizers`` library on the
fixed sentences in ``CORPUS`` and saved through ``PreTrainedTokenizerFast`` (so
``transformers.AutoTokenizer`` loads it as well).

API (the conftest wraps it in the session fixture ``tiny``):

    FAMILIES                      "distilbert", "bert", "gpt2", "qwen2", "llama", "llama-tied"
    TASKS[family]                 tasks of that family, e.g. ("base", "seq-cls")
    CASES                         every (family, task) pair, for parametrize
    DECODERS, ENCODERS            family names by kind
    NUM_LABELS                    number of labels of every seq-cls checkpoint (3): pass
                                  ``num_labels=NUM_LABELS`` to ``load_model``
    HF_CLASSES[(family, task)]    the transformers class of the checkpoint
    make_config(family, **kw)     the transformers config (kw overrides fields)
    write_checkpoint(folder, family, task, seed=0, max_shard_size=None, **config_kw)
                                  -> transformers model (eval, fp32) whose weights were saved
    load_hf(folder, family, task) -> a fresh transformers model loaded from folder (eval,
                                  eager attention), for tests that must not share state
    random_ids(family, batch, length, seed=0) -> LongTensor of ordinary (non-special)
                                  token ids of that family's tokenizer
    special_ids(family)           {"pad": .., "bos": .., "eos": .., "unk": ..} token ids (None if
                                  absent); pad is the config's pad_token_id (= eos for decoders)
    tokenizer_vocab_size(family)  tokens in the tokenizer (the config's vocab_size is a bit larger)
    Checkpoints(root)             cache: ``get(family, task) -> (folder, hf_model)`` writes each
                                  checkpoint once under root/<family>-<task>;
                                  ``folder(family, task)``, ``hf(family, task)``,
                                  ``copy(family, task, dest) -> dest`` (a private copy to edit)

The transformers models handed out by ``Checkpoints`` are shared by every test
of the session: do not modify them (no training, no LoRA injection); use
``load_hf`` or ``copy`` for a private model.

Family details:
  distilbert  DistilBertModel / DistilBertForSequenceClassification, WordPiece tokenizer
              ([CLS] ... [SEP]), max_position_embeddings 64
  bert        BertModel (with pooler) / BertForSequenceClassification, same tokenizer,
              type_vocab_size 2, max_position_embeddings 64
  gpt2        GPT2Model / GPT2LMHeadModel / GPT2ForSequenceClassification, byte-level BPE,
              <|endoftext|> = bos = eos = pad (id 0), n_positions 64
  qwen2       Qwen2Model / Qwen2ForCausalLM / Qwen2ForSequenceClassification, q/k/v biases,
              GQA 4/2, untied lm_head, byte-level BPE with Qwen2's NFC normalizer and split
              regex (<|endoftext|> = eos = pad, no bos); its
              config.json is rewritten in the legacy layout of the Hub's Qwen2.5 configs
              (top-level "rope_theta": 1e6 instead of "rope_parameters")
  llama       LlamaModel / LlamaForCausalLM / LlamaForSequenceClassification, GQA 4/2,
              rope_theta 20000, rms_norm_eps 1e-5, untied lm_head, byte-level BPE that
              prepends <s> (bos); pad = eos = </s>; config in transformers-5 layout
              ("rope_parameters")
  llama-tied  as llama but tie_word_embeddings=True (no lm_head.weight in the file)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

NUM_LABELS = 3
HIDDEN = 32
MAX_POS = 64

ENCODERS = ("distilbert", "bert")
DECODERS = ("gpt2", "qwen2", "llama", "llama-tied")
FAMILIES = ENCODERS + DECODERS
TASKS = {
    "distilbert": ("base", "seq-cls"),
    "bert": ("base", "seq-cls"),
    "gpt2": ("base", "causal-lm", "seq-cls"),
    "qwen2": ("base", "causal-lm", "seq-cls"),
    "llama": ("base", "causal-lm", "seq-cls"),
    "llama-tied": ("base", "causal-lm", "seq-cls"),
}
CASES = [(f, t) for f in FAMILIES for t in TASKS[f]]
# the families and tasks peft is checked on (one of each layer kind: DistilBERT's Linear, GPT-2's Conv1D, Qwen2)
PEFT_CASES = [("distilbert", "seq-cls"), ("gpt2", "causal-lm"), ("gpt2", "seq-cls"), ("qwen2", "causal-lm"),
              ("qwen2", "seq-cls")]
PEFT_TASK = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be, or not to be, that is the question.",
    "All that glitters is not gold; all who wander are not lost.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "In 1969, Apollo 11 landed on the Moon with 3 astronauts aboard.",
    "Machine learning models learn patterns from data.",
    "Parameter-efficient fine-tuning trains only a few weights.",
    "Low-rank adapters add two small matrices to each layer.",
    "Prompt tuning learns soft tokens prepended to the input.",
    "Quantization stores weights in 4 or 8 bits to save memory.",
    "She sells sea shells by the sea shore.",
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood?",
    "It was the best of times, it was the worst of times.",
    "The rain in Spain stays mainly in the plain.",
    "Numbers like 42, 3.14159 and 2718 appear in many texts.",
    "Emails such as someone@example.com and URLs like https://example.org are common.",
    "Café, naïve, résumé and jalapeño contain accented letters.",
    "Tokyo, 東京, and Москва are written in different scripts.",
    "Emoji such as 🙂 and 🚀 are encoded as several bytes.",
    "def add(a, b):\n    return a + b",
    "for i in range(10): print(i * i)",
    "The transformer architecture relies on self-attention.",
    "Attention weights are computed from queries and keys.",
    "Rotary position embeddings rotate queries and keys by position.",
    "Layer normalization keeps activations in a stable range.",
    "The model predicts the next token given the previous ones.",
    "Greedy decoding picks the most likely token at every step.",
    "Sampling with temperature and top-p adds diversity.",
    "Once upon a time, there was a little robot who loved to read.",
    "The weather today is sunny with a chance of rain in the evening.",
    "Please remember to water the plants on Tuesday and Friday.",
    "Good morning! How are you doing today?",
    "I think, therefore I am.",
    "The mitochondria is the powerhouse of the cell.",
    "Water boils at 100 degrees Celsius at sea level.",
    "This movie was wonderful, I loved every minute of it.",
    "This movie was terrible, a complete waste of time.",
    "The service was okay, nothing special but not bad either.",
    "Stock prices rose 5% after the company reported record earnings.",
]

# ----------------------------------------------------------------- tokenizers

# special tokens per tokenizer kind (trained first, so they get ids 0..k-1)
_SPECIALS = {
    "wordpiece": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
    "gpt2": ["<|endoftext|>"],
    "qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama": ["<unk>", "<s>", "</s>"],
}
_TOKENIZER_KIND = {"distilbert": "wordpiece", "bert": "wordpiece", "gpt2": "gpt2",
                   "qwen2": "qwen2", "llama": "llama", "llama-tied": "llama"}
# token ids (same for every tokenizer of a kind; fixed by _SPECIALS order)
SPECIAL_IDS = {
    "wordpiece": dict(pad=0, unk=1, cls=2, sep=3, mask=4, bos=None, eos=None),
    "gpt2": dict(pad=0, bos=0, eos=0, unk=0),
    "qwen2": dict(pad=0, bos=None, eos=0, unk=None),
    "llama": dict(pad=2, bos=1, eos=2, unk=0),
}
_tok_cache: dict[str, object] = {}
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _train_tokenizer(kind: str):
    """A tokenizers.Tokenizer for `kind`, trained on CORPUS (cached, deterministic)."""
    if kind in _tok_cache:
        return _tok_cache[kind]
    from tokenizers import (Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers,
                            processors, trainers)

    specials = _SPECIALS[kind]
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True,
                                                    handle_chinese_chars=True, strip_accents=None)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        # built, not trained: the WordPiece trainer's vocabulary (not only its order) follows the Rust hash seed of
        # the process, so the tiny BERT models tokenized differently from session to session (and a training test
        # passed or failed with it). Every character, as a word start and as a continuation, and every corpus word.
        words = {w for line in CORPUS for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(line))}
        chars = sorted(set("".join(words)))
        ordered = specials + chars + ["##" + c for c in chars] + sorted(words - set(chars))
        tok.model = models.WordPiece({t: i for i, t in enumerate(ordered)}, unk_token="[UNK]",
                                     max_input_chars_per_word=100)
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    else:
        tok = Tokenizer(models.BPE())
        if kind == "qwen2":  # exactly Qwen2's (transformers' Qwen2Tokenizer re-imposes it)
            tok.normalizer = normalizers.NFC()
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_QWEN2_PATTERN), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        else:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, min_frequency=1,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS, trainer=trainer)
        if kind == "llama":
            bos = tok.token_to_id("<s>")
            tok.post_processor = processors.TemplateProcessing(
                single="<s> $A", pair="<s> $A <s>:1 $B:1", special_tokens=[("<s>", bos)])
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for name, i in SPECIAL_IDS["wordpiece" if kind == "wordpiece" else kind].items():
        if i is not None:
            assert tok.id_to_token(i) in specials, (kind, name, i)
    _tok_cache[kind] = tok
    return tok


def special_ids(family: str) -> dict:
    """Ids of the special tokens of `family`'s tokenizer: keys pad, bos, eos, unk (None if absent)
    (+ cls, sep, mask for the encoders). pad is the config's pad_token_id (eos for decoders)."""
    return dict(SPECIAL_IDS[_TOKENIZER_KIND[family]])


def tokenizer_vocab_size(family: str) -> int:
    return _train_tokenizer(_TOKENIZER_KIND[family]).get_vocab_size()


def write_tokenizer(folder, family: str) -> None:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json for `family`."""
    from transformers import PreTrainedTokenizerFast

    kind = _TOKENIZER_KIND[family]
    tok = _train_tokenizer(kind)
    if kind == "wordpiece":
        kw = dict(unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                  mask_token="[MASK]")
    elif kind == "gpt2":  # like GPT-2: no pad token
        kw = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    elif kind == "qwen2":  # like Qwen2.5: no bos, pad = eos
        kw = dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    else:  # like Llama: bos prepended, no pad token
        kw = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.__class__.from_str(tok.to_str()),
                                   model_max_length=MAX_POS, **kw)
    fast.save_pretrained(str(folder))


# --------------------------------------------------------------------- models


def _vocab(family: str) -> int:
    n = tokenizer_vocab_size(family)
    return (n + 7) // 8 * 8 + 8  # a few unused rows, like real checkpoints


def make_config(family: str, **kw):
    import transformers as tr

    V = _vocab(family)
    ids = SPECIAL_IDS[_TOKENIZER_KIND[family]]
    if family == "distilbert":
        base = dict(vocab_size=V, dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=64,
                    max_position_embeddings=MAX_POS, pad_token_id=ids["pad"], dropout=0.1,
                    attention_dropout=0.1, seq_classif_dropout=0.2)
        cls = tr.DistilBertConfig
    elif family == "bert":
        base = dict(vocab_size=V, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=MAX_POS, type_vocab_size=2,
                    pad_token_id=ids["pad"], layer_norm_eps=1e-12)
        cls = tr.BertConfig
    elif family == "gpt2":
        base = dict(vocab_size=V, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=MAX_POS,
                    bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
        cls = tr.GPT2Config
    elif family == "qwen2":
        base = dict(vocab_size=V, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    bos_token_id=None, eos_token_id=ids["eos"], pad_token_id=ids["pad"])
        cls = tr.Qwen2Config
    elif family in ("llama", "llama-tied"):
        base = dict(vocab_size=V, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POS,
                    rope_theta=20000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=(family == "llama-tied"),
                    bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
        cls = tr.LlamaConfig
    else:
        raise KeyError(family)
    # larger than transformers' default 0.02, so that greedy generation of the tiny random
    # decoders is not a single repeated token (it would hide position / cache bugs)
    base.setdefault("initializer_range", 0.2)
    base.update(kw)
    return cls(**base)


def _hf_classes():
    import transformers as tr

    return {
        ("distilbert", "base"): tr.DistilBertModel,
        ("distilbert", "seq-cls"): tr.DistilBertForSequenceClassification,
        ("bert", "base"): tr.BertModel,
        ("bert", "seq-cls"): tr.BertForSequenceClassification,
        ("gpt2", "base"): tr.GPT2Model,
        ("gpt2", "causal-lm"): tr.GPT2LMHeadModel,
        ("gpt2", "seq-cls"): tr.GPT2ForSequenceClassification,
        ("qwen2", "base"): tr.Qwen2Model,
        ("qwen2", "causal-lm"): tr.Qwen2ForCausalLM,
        ("qwen2", "seq-cls"): tr.Qwen2ForSequenceClassification,
        ("llama", "base"): tr.LlamaModel,
        ("llama", "causal-lm"): tr.LlamaForCausalLM,
        ("llama", "seq-cls"): tr.LlamaForSequenceClassification,
        ("llama-tied", "base"): tr.LlamaModel,
        ("llama-tied", "causal-lm"): tr.LlamaForCausalLM,
        ("llama-tied", "seq-cls"): tr.LlamaForSequenceClassification,
    }


class _LazyClasses(dict):
    def __missing__(self, key):
        self.update(_hf_classes())
        return dict.__getitem__(self, key)


HF_CLASSES = _LazyClasses()


def _legacy_rope_layout(folder: Path) -> None:
    """Rewrite config.json with top-level rope_theta (the layout of Hub configs before transformers 5)."""
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    rp = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    cfg["rope_scaling"] = None
    path.write_text(json.dumps(cfg, indent=2))


def write_checkpoint(folder, family: str, task: str, seed: int = 0, max_shard_size=None,
                     **config_kw):
    """Write a seeded random checkpoint + tokenizer into `folder`; return the transformers model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cls = HF_CLASSES[(family, task)]
    if task == "seq-cls":
        config_kw.setdefault("num_labels", NUM_LABELS)
    config = make_config(family, **config_kw)
    torch.manual_seed(seed)
    model = cls(config).eval()
    # transformers' default init leaves some tensors at exactly 0 / 1 (biases, norms): make
    # them random too so that a loader that forgets one of them gets caught.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            if p.dim() == 1:
                base = 1.0 if torch.all(p == 1) else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(folder), safe_serialization=True, **kw)
    write_tokenizer(folder, family)
    if family == "qwen2":
        _legacy_rope_layout(folder)
    return model


def load_hf(folder, family: str, task: str):
    """A fresh transformers model from `folder` (fp32, eval, eager attention)."""
    cls = HF_CLASSES[(family, task)]
    model = cls.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def random_ids(family: str, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Ordinary token ids (no special token, no unused vocab row) of `family`'s tokenizer."""
    n_special = len(_SPECIALS[_TOKENIZER_KIND[family]])
    g = torch.Generator().manual_seed(seed)
    return torch.randint(n_special, tokenizer_vocab_size(family), (batch, length), generator=g)


def run_ours(model, ids, mask, grad=False):
    """Our model's output (logits or hidden states) for a batch, with or without autograd."""
    with torch.set_grad_enabled(grad):
        out = model(ids, mask)
    assert isinstance(out, torch.Tensor)
    return out


class Checkpoints:
    """Writes each (family, task) checkpoint once under `root` and caches the transformers model."""

    def __init__(self, root):
        self.root = Path(root)
        self._cache: dict[tuple[str, str], tuple[Path, object]] = {}

    def get(self, family: str, task: str):
        key = (family, task)
        if key not in self._cache:
            if task not in TASKS[family]:
                raise KeyError(f"{family} has no task {task!r}")
            folder = self.root / f"{family}-{task}"
            write_checkpoint(folder, family, task)
            self._cache[key] = (folder, load_hf(folder, family, task))
        return self._cache[key]

    __call__ = get

    def folder(self, family: str, task: str) -> Path:
        return self.get(family, task)[0]

    def hf(self, family: str, task: str):
        return self.get(family, task)[1]

    def copy(self, family: str, task: str, dest) -> Path:
        """Copy the checkpoint folder to `dest` (to be edited by the caller); return dest."""
        dest = Path(dest)
        shutil.copytree(self.folder(family, task), dest)
        return dest
