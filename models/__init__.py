"""Hand-written DistilBERT, BERT, GPT-2, Llama and Qwen2 that load Hugging Face checkpoints.

    model, tokenizer = load_model("minilm-l6", task="seq-cls", num_labels=2)
    logits = model(**tokenizer(["a fine film", "a dull one"]))      # (B, num_labels)
"""
from .common import KVCache
from .generate import generate
from .gpt2 import Conv1D
from .loading import ALIASES, FAMILIES, LoadError, load_model, resolve, save_model
from .tokenizer import Tokenizer

__all__ = ["load_model", "save_model", "generate", "LoadError", "Tokenizer", "KVCache", "Conv1D", "resolve", "ALIASES", "FAMILIES"]
