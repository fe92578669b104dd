"""Llama (Touvron et al. 2023, arXiv:2302.13971) and Qwen2 (arXiv:2407.10671): one decoder, two flags.

    h0 = embed_tokens[ids]
    per layer (pre-norm, RMSNorm):
        h = h + o_proj(CausalGQA(RoPE(q_proj x), RoPE(k_proj x), v_proj x)),  x = input_layernorm(h)
        h = h + down_proj(silu(gate_proj x) * up_proj x),                     x = post_attention_layernorm(h)
    logits = lm_head(norm(h))         (lm_head tied to embed_tokens when tie_word_embeddings)

RMSNorm(x) = w * x / sqrt(mean(x²) + eps). RoPE (Su et al. 2021, arXiv:2104.09864) rotates each
(i, i + hs/2) pair of a head's dimensions by angle position · theta^(-2i/hs). Grouped-query
attention (Ainslie et al. 2023) shares each key/value head among n_head / n_kv_head query heads.
Qwen2 differs from Llama only in its q/k/v biases (and o_proj without one); SmolLM2 is Llama.
"""
import torch
import torch.nn as nn

from .common import (activation, check_length, decoder_positions_and_mask, last_token_index, lm_output,
                     pool_last_token, sdpa)
from .fused import Linear, rms_norm, rope


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)  # statistics in fp32, as the reference for bf16/fp16 models


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx, qkv_bias, o_bias):
        super().__init__()
        C = cfg["hidden_size"]
        self.n_head, self.n_kv_head = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        self.hs = cfg.get("head_dim") or C // self.n_head
        self.layer_idx = layer_idx
        self.attn_dropout = cfg.get("attention_dropout", 0.0)
        self.q_proj = Linear(C, self.n_head * self.hs, bias=qkv_bias)
        self.k_proj = Linear(C, self.n_kv_head * self.hs, bias=qkv_bias)
        self.v_proj = Linear(C, self.n_kv_head * self.hs, bias=qkv_bias)
        self.o_proj = Linear(self.n_head * self.hs, C, bias=o_bias)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.hs).transpose(1, 2)  # (B, n_kv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.hs).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv, past + T, hs)
        y = sdpa(q, k, v, mask, k.shape[2] == T, self.attn_dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hs))


class MLP(nn.Module):
    def __init__(self, cfg, bias):
        super().__init__()
        C, H = cfg["hidden_size"], cfg["intermediate_size"]
        self.gate_proj, self.up_proj = Linear(C, H, bias=bias), Linear(C, H, bias=bias)
        self.down_proj = Linear(H, C, bias=bias)
        self.act = activation(cfg.get("hidden_act", "silu"))

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx, qwen2):
        super().__init__()
        attention_bias = cfg.get("attention_bias", False)
        self.self_attn = Attention(cfg, layer_idx, qkv_bias=qwen2 or attention_bias, o_bias=not qwen2 and attention_bias)
        self.mlp = MLP(cfg, bias=not qwen2 and cfg.get("mlp_bias", False))
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def rope_theta(cfg):
    for rope in (cfg.get("rope_parameters") or {}, cfg.get("rope_scaling") or {}):  # transformers 5's, and older
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"rope scaling {kind!r} is not supported (only the default RoPE)")
    # transformers 5 reads rope_parameters first; a top-level rope_theta is the older place
    sources = (cfg.get("rope_parameters") or {}, cfg, cfg.get("rope_scaling") or {})
    return float(next((s["rope_theta"] for s in sources if s.get("rope_theta")), 10000.0))


class LlamaModel(nn.Module):
    new_head_names = ()

    def __init__(self, cfg):
        super().__init__()
        qwen2 = cfg["model_type"] == "qwen2"
        # transformers' layer_types, else what it derives them from: layers from max_window_layers (default 28) on
        # slide, if there is a window
        slides = cfg.get("use_sliding_window") and cfg.get("sliding_window") is not None
        first_sliding = cfg.get("max_window_layers", 28)
        first_sliding = 0 if first_sliding is None else first_sliding  # null: transformers fails; refused here
        layer_types = cfg.get("layer_types") or [
            "sliding_attention" if slides and i >= first_sliding else "full_attention"
            for i in range(cfg["num_hidden_layers"])]
        sliding = any(t != "full_attention" for t in layer_types)
        if sliding:  # each position would attend to the last `sliding_window` ones only
            raise ValueError("sliding-window attention (use_sliding_window / layer_types in config.json) is not supported")
        self.max_positions = cfg.get("max_position_embeddings", 2048)
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, qwen2) for i in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6))
        self.theta, self.hs = rope_theta(cfg), self.layers[0].self_attn.hs

    def get_input_embeddings(self):
        return self.embed_tokens

    def rope(self, position_ids, dtype):
        """cos, sin of shape (B or 1, 1, T, hs) for the given positions."""
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.hs, 2, dtype=torch.int64, device=position_ids.device).float() / self.hs))
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hs)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None):
        """Returns the last hidden state (B, T, C). `cache` (a KVCache) is extended in place."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        T, past = x.shape[1], len(cache) if cache is not None else 0
        check_length(past + T, self.max_positions)
        derived_positions, mask = decoder_positions_and_mask(attention_mask, T, past)
        if position_ids is None:
            position_ids = derived_positions
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None]
        cos, sin = self.rope(position_ids, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    new_head_names = ()

    def __init__(self, cfg):
        super().__init__()
        self.model = LlamaModel(cfg)
        self.lm_head = Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)
        self.tie_word_embeddings = cfg.get("tie_word_embeddings", False)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                logits_mask=None, targets=None):
        hidden = self.model(input_ids, attention_mask, position_ids, cache, inputs_embeds)  # (B, T, C)
        return lm_output(self.lm_head, hidden, logits_mask, targets)


class LlamaForSequenceClassification(nn.Module):
    new_head_names = ("score",)

    def __init__(self, cfg, num_labels):
        super().__init__()
        self.model = LlamaModel(cfg)
        self.score = Linear(cfg["hidden_size"], num_labels, bias=False)
        self.pad_token_id = cfg.get("pad_token_id")

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None):
        hidden = self.model(input_ids, attention_mask, position_ids, None, inputs_embeds)
        index = last_token_index(input_ids, attention_mask, self.pad_token_id)
        return self.score(pool_last_token(hidden, index))  # (B, num_labels)


BASE_PREFIX = "model"


def build(cfg, task, num_labels):
    if task == "base":
        return LlamaModel(cfg)
    if task == "causal-lm":
        return LlamaForCausalLM(cfg)
    return LlamaForSequenceClassification(cfg, num_labels)
