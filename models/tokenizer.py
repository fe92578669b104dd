"""The tokenizer of a checkpoint: its tokenizer.json run by the `tokenizers` library.

tokenizer.json holds the vocabulary, the normaliser/pre-tokeniser and the template that adds
special tokens ([CLS] ... [SEP] for BERT); tokenizer_config.json and special_tokens_map.json name
the special tokens. Padding and truncation stored inside tokenizer.json are ignored, as
transformers ignores them: they are chosen per call. Decoders without a pad token pad with eos.
A BERT tokenizer's normaliser (lowercasing, accents, Chinese characters) comes from tokenizer_config.json,
as transformers 5 builds it, where the two files disagree.
"""
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.normalizers import BertNormalizer

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# transformers 5 builds these classes' normaliser from tokenizer_config.json, whatever tokenizer.json holds
BERT_TOKENIZER_CLASSES = ("BertTokenizer", "BertTokenizerFast", "DistilBertTokenizer", "DistilBertTokenizerFast")


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path):
    from .loading import read_json

    return read_json(path) if path.is_file() else {}


class Tokenizer:
    def __init__(self, tokenizer, special_tokens, model_max_length, folder=None):
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.model_max_length = model_max_length
        self.padding_side = self.truncation_side = "right"  # from_folder reads tokenizer_config.json's
        self.folder = folder
        self.model_input_names = ["input_ids", "attention_mask"]  # from_folder adds token types for BERT
        self.stop_token_ids = []  # the ids that end generation; from_folder reads them
        for name in ("pad", "eos", "bos", "unk", "cls", "sep"):
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
        config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
        if config.get("tokenizer_class") in BERT_TOKENIZER_CLASSES:
            tok.normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=config.get("tokenize_chinese_chars", True),
                                            strip_accents=config.get("strip_accents"),
                                            lowercase=config.get("do_lower_case", True))
        special = {name: _token_text(config.get(f"{name}_token")) for name in ("pad", "eos", "bos", "unk", "cls", "sep")}
        for name in ("eos", "bos", "pad"):  # fall back to the model config's ids (GPT-2 names none in its files)
            token_id = cfg.get(f"{name}_token_id")
            token_id = token_id[0] if isinstance(token_id, list) else token_id
            if special[name] is None and token_id is not None:
                special[name] = tok.id_to_token(token_id)
        if special["pad"] is None:
            special["pad"] = special["eos"]
        max_length = config.get("model_max_length")
        if not isinstance(max_length, int) or max_length > 10**8:
            max_length = max_positions(cfg)
        tokenizer = cls(tok, special, max_length, folder)
        for side in ("padding_side", "truncation_side"):
            if config.get(side) in ("left", "right"):
                setattr(tokenizer, side, config[side])
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

    def encode(self, text, add_special_tokens=True):
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, texts, padding=True, truncation=False, max_length=None, add_special_tokens=True,
                 return_tensors="pt", text_pairs=None):
        """Token ids and attention mask of a text or a batch: {"input_ids", "attention_mask"} (B, T) tensors.

        text_pairs: a second text for each, encoded with the tokenizer's pair template (truncation cuts the
        longer of the two first, as transformers does); the result then also holds "token_type_ids".
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        if text_pairs is not None:
            texts = list(zip(texts, [text_pairs] if isinstance(text_pairs, str) else text_pairs, strict=True))
        if truncation:
            self.tokenizer.enable_truncation(max_length or self.model_max_length, direction=self.truncation_side)
        if padding:
            if self.pad_token_id is None:
                raise ValueError("this tokenizer has no pad token; pass padding=False or encode one text at a time")
            self.tokenizer.enable_padding(direction=self.padding_side, pad_id=self.pad_token_id,
                                          length=max_length if padding == "max_length" else None)
        try:
            encodings = self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        finally:
            self.tokenizer.no_truncation()
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
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows, skip_special_tokens=True):
        return [self.decode(row, skip_special_tokens) for row in rows]

    def save(self, folder):
        """Copy the tokenizer files next to an adapter, so the output folder is self-contained."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name in FILES:
            source = None if self.folder is None else Path(self.folder) / name
            if source is not None and source.is_file() and (Path(folder) / name).resolve() != source.resolve():
                shutil.copy(source, Path(folder) / name)
