"""The tokenizer of a checkpoint: its tokenizer.json run by the `tokenizers` library, read as
transformers 5 reads the folder.

tokenizer.json holds the vocabulary, the normaliser/pre-tokeniser and the template that adds
special tokens ([CLS] ... [SEP] for BERT); tokenizer_config.json names the special tokens, and
special_tokens_map.json overrides it where tokenizer_config.json has no added_tokens_decoder (older
checkpoints; newer ones keep everything in tokenizer_config.json and transformers then ignores the
map). The named special tokens (pad, eos, bos, ...) are skipped when decoding, also if tokenizer.json
does not flag them special. Padding and truncation stored in tokenizer.json give the pad token and the padding and
truncation sides where tokenizer_config.json does not; lengths are chosen per call. Decoders without
a pad token pad with eos. A BERT tokenizer's normaliser (lowercasing, accents, Chinese characters)
comes from tokenizer_config.json, as transformers 5 builds it (also when only config.json's
model_type names BERT), where the two files disagree, and a LlamaTokenizer's is its Metaspace
(_sentencepiece_pipeline). Other classes that transformers 5 rebuilds from their own definition
(GPT2Tokenizer's add_prefix_space, Qwen2Tokenizer's NFC) are read as their tokenizer.json says,
which matches transformers on the Hub's files.
"""
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import Metaspace

# what save() copies: the files read here, the chat template transformers 5 saves beside them, and
# generation_config.json, whose eos ids stop generation
FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
         "chat_template.json", "generation_config.json")
# transformers 5 builds these classes' normaliser from tokenizer_config.json, whatever tokenizer.json holds
BERT_TOKENIZER_CLASSES = ("BertTokenizer", "BertTokenizerFast", "DistilBertTokenizer", "DistilBertTokenizerFast")
# transformers 5 builds these classes' pipeline around SentencePiece's Metaspace (unless tokenizer.json is byte-level)
LLAMA_TOKENIZER_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
MODEL_TYPE_TOKENIZER_CLASSES = {"bert": "BertTokenizer", "distilbert": "DistilBertTokenizer"}  # when no file names one
SPECIAL_NAMES = ("pad", "eos", "bos", "unk", "cls", "sep", "mask")
# transformers' clean_up_tokenization, in its order: WordPiece's "do n't" -> "don't", " ." -> "." etc.
CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path):
    from .loading import read_json

    return read_json(path) if path.is_file() else {}


def _sentencepiece_pipeline(tok, config):
    """LlamaTokenizer's pipeline as transformers 5 builds it (Llama-2, Mistral v0.1, TinyLlama): no normaliser,
    spaces become "▁" and one is prepended where the text does not start with one ("first"; "always" with
    legacy: true, "never" with add_prefix_space: false). The files' Prepend + Replace normaliser prepends
    one always, so " word" (a label word, an answer) got a token "▁" of its own in front."""
    add_prefix_space = config.get("add_prefix_space") is not False
    scheme = "never" if not add_prefix_space else "always" if config.get("legacy") is True else "first"
    tok.normalizer = None
    tok.pre_tokenizer = Metaspace(replacement="▁", prepend_scheme=scheme, split=False)
    tok.model.fuse_unk, tok.model.byte_fallback = True, True
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] * add_prefix_space)


class Tokenizer:
    def __init__(self, tokenizer, special_tokens, model_max_length, folder=None, clean_up_tokenization_spaces=False):
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.padding_side = self.truncation_side = "right"  # from_folder reads tokenizer_config.json's
        self.folder = folder
        self.model_input_names = ["input_ids", "attention_mask"]  # from_folder adds token types for BERT
        self.stop_token_ids = []  # the ids that end generation; from_folder reads them
        for name in SPECIAL_NAMES:
            text = special_tokens.get(name)
            setattr(self, f"{name}_token_id", None if text is None else tokenizer.token_to_id(text))

    @classmethod
    def from_folder(cls, folder, cfg):
        from .loading import LoadError, max_positions

        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise LoadError(f"{folder} has no tokenizer.json (the fast-tokenizer file this project reads)")
        try:
            tok = RustTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as e:  # the Rust library raises a bare Exception with its parser's message
            raise LoadError(f"{folder / 'tokenizer.json'}: the tokenizers library cannot read it ({e})") from None
        config = _read_json(folder / "tokenizer_config.json")
        if "added_tokens_decoder" not in config:  # transformers' older layout: the map's entries win
            config = {**config, **_read_json(folder / "special_tokens_map.json")}
        tokenizer_class = (config.get("tokenizer_class") or cfg.get("tokenizer_class")
                           or MODEL_TYPE_TOKENIZER_CLASSES.get(cfg.get("model_type")))
        if tokenizer_class in BERT_TOKENIZER_CLASSES:
            tok.normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
                                            strip_accents=config.get("strip_accents"),
                                            lowercase=config.get("do_lower_case", True))
        if tokenizer_class in LLAMA_TOKENIZER_CLASSES and "ByteLevel" not in f"{tok.pre_tokenizer} {tok.decoder}":
            _sentencepiece_pipeline(tok, config)
        stored_padding, stored_truncation = tok.padding or {}, tok.truncation or {}
        special = {name: _token_text(config.get(f"{name}_token")) for name in SPECIAL_NAMES}
        special["pad"] = special["pad"] or stored_padding.get("pad_token")
        for name in ("eos", "bos", "pad"):  # fall back to the model config's ids (GPT-2 names none in its files)
            token_id = cfg.get(f"{name}_token_id")
            token_id = token_id[0] if isinstance(token_id, list) else token_id
            if special[name] is None and token_id is not None:
                special[name] = tok.id_to_token(token_id) if 0 <= token_id < tok.get_vocab_size() else None  # -1: none
        if special["pad"] is None or tok.token_to_id(special["pad"]) is None:  # none, or a word the vocabulary lacks
            special["pad"] = special["eos"]
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        extra = [_token_text(t) for t in (extra if isinstance(extra, list) else extra.values())]
        # transformers skips the named special tokens when decoding, flagged special in tokenizer.json or not;
        # other listed ones only if it has to add them (they are in the vocabulary but not added tokens)
        added = tok.get_added_tokens_decoder()  # id -> AddedToken
        flagged = []
        named = [t for t in special.values() if t is not None]
        for text in dict.fromkeys([*named, *extra]):
            token_id = tok.token_to_id(text)
            known = added.get(token_id)
            if token_id is None or (known is not None and (known.special or text not in named)):
                continue
            flagged.append(AddedToken(text, special=True, normalized=False) if known is None else
                           AddedToken(text, special=True, normalized=known.normalized, lstrip=known.lstrip,
                                      rstrip=known.rstrip, single_word=known.single_word))
        tok.add_special_tokens(flagged)
        max_length = config.get("model_max_length")
        if not isinstance(max_length, int) or max_length > 10**8:
            max_length = max_positions(cfg)
        # the cleanup transformers applies after decoding, which it skips for BPE vocabularies
        clean_up = config.get("clean_up_tokenization_spaces") is True and type(tok.model).__name__ != "BPE"
        tokenizer = cls(tok, special, max_length, folder, clean_up)
        for side, stored in (("padding_side", stored_padding), ("truncation_side", stored_truncation)):
            value = config.get(side) or str(stored.get("direction", "")).lower()
            if value in ("left", "right"):
                setattr(tokenizer, side, value)
        # transformers' generate stops at generation_config.json's eos ids (Qwen2.5-Instruct lists two), else at
        # config.json's; answers are trained to end with the tokenizer's eos, so that one stops generation too
        stops = _read_json(folder / "generation_config.json").get("eos_token_id", cfg.get("eos_token_id"))
        stops = [tokenizer.eos_token_id] + (stops if isinstance(stops, list) else [stops])
        tokenizer.stop_token_ids = list(dict.fromkeys(i for i in stops if isinstance(i, int)))
        if cfg.get("type_vocab_size", 0) > 1:  # the model embeds token types (BERT): a pair's second text is type 1
            tokenizer.model_input_names.insert(1, "token_type_ids")
        return tokenizer

    @property
    def vocab_size(self):
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text, add_special_tokens=True, max_length=None, truncation_side=None):
        """Token ids of one text; with max_length the text is cut (from truncation_side, default the
        tokenizer's) so that it fits with its special tokens, which stay."""
        with self._truncating(max_length, truncation_side):
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    @contextmanager
    def _truncating(self, max_length, side=None):
        """The Rust tokenizer cuts to max_length within the block (nothing for None), from `side` or the
        tokenizer's truncation side; it never keeps a setting between calls."""
        if max_length is not None:
            self.tokenizer.enable_truncation(max_length, direction=side or self.truncation_side)
        try:
            yield
        finally:
            self.tokenizer.no_truncation()

    def __call__(self, texts, padding=True, truncation=False, max_length=None, add_special_tokens=True,
                 return_tensors="pt", text_pairs=None):
        """Token ids and attention mask of a text or a batch: {"input_ids", "attention_mask"} (B, T) tensors.

        text_pairs: a second text for each, encoded with the tokenizer's pair template (truncation cuts the
        longer of the two first, as transformers does); the result then also holds "token_type_ids".
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if text_pairs is not None:
            texts = list(zip(texts, [text_pairs] if isinstance(text_pairs, str) else text_pairs, strict=True))
        if padding and self.pad_token_id is None:
            raise ValueError("this tokenizer has no pad token; pass padding=False or encode one text at a time")
        with self._truncating(max_length or self.model_max_length if truncation else None):
            if padding:
                self.tokenizer.enable_padding(direction=self.padding_side, pad_id=self.pad_token_id,
                                              length=max_length if padding == "max_length" else None)
            try:
                encodings = self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
            finally:
                self.tokenizer.no_padding()
        out = {"input_ids": [e.ids for e in encodings], "attention_mask": [e.attention_mask for e in encodings]}
        if text_pairs is not None:
            out["token_type_ids"] = [e.type_ids for e in encodings]
        if return_tensors != "pt":
            return out
        if len({len(row) for row in out["input_ids"]}) > 1:
            raise ValueError("texts have different lengths; pass padding=True to return tensors")
        return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}

    def decode(self, ids, skip_special_tokens=True):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if self.clean_up_tokenization_spaces:
            for spaced, joined in CLEAN_UP:
                text = text.replace(spaced, joined)
        return text

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(row, skip_special_tokens) for row in rows]

    def save(self, folder):
        """Copy the tokenizer's files (FILES) next to an adapter or model, so the output folder is self-contained."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name in FILES:
            source = None if self.folder is None else Path(self.folder) / name
            if source is not None and source.is_file() and (Path(folder) / name).resolve() != source.resolve():
                shutil.copy(source, Path(folder) / name)
        config_file = Path(folder) / "tokenizer_config.json"
        config = _read_json(config_file)
        pad = None if self.pad_token_id is None else self.tokenizer.id_to_token(self.pad_token_id)
        if pad is not None and _token_text(config.get("pad_token")) != pad:
            # the pad token batches were padded with (eos for GPT-2-style files that name none or one the vocabulary
            # lacks), so transformers' AutoTokenizer pads the same way
            from .loading import write_json

            write_json(config_file, {**config, "pad_token": pad})
