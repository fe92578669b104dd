"""GPT-2 (Radford et al. 2019), as in transformers' `GPT2LMHeadModel`; DistilGPT-2 is the 6-layer one.

    h0 = wte[ids] + wpe[positions]
    per layer (pre-norm):  h = h + c_proj(CausalMHA(ln_1(h)));  h = h + mlp.c_proj(gelu(mlp.c_fc(ln_2(h))))
    logits = ln_f(h) · wteᵀ         (the LM head is tied to the token embedding)

GPT-2's linear layers are `Conv1D`: the weight is stored transposed, (in, out), so y = x·W + b.
LoRA and quantization handle that layout (peft calls it fan_in_fan_out).
"""
import torch
import torch.nn as nn

from .common import (activation, check_length, decoder_positions_and_mask, last_token_index, lm_output,
                     pool_last_token, sdpa)
from .fused import Dropout, Linear, linear


class Conv1D(nn.Module):
    """A linear layer whose weight is stored (in_features, out_features): y = x·W + b."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return linear(x, self.weight.t(), self.bias)


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        C = cfg["n_embd"]
        self.n_head, self.layer_idx = cfg["n_head"], layer_idx
        # two config flags change the attention's scale, as in transformers (None: sdpa's 1 / sqrt(hs))
        scale = (C // self.n_head) ** -0.5 if cfg.get("scale_attn_weights", True) else 1.0
        if cfg.get("scale_attn_by_inverse_layer_idx", False):
            scale /= layer_idx + 1
        self.scale = None if scale == (C // self.n_head) ** -0.5 else scale
        self.attn_dropout = cfg.get("attn_pdrop", 0.0)
        eps = cfg.get("layer_norm_epsilon", 1e-5)
        self.ln_1 = nn.LayerNorm(C, eps=eps)
        self.attn = nn.ModuleDict({"c_attn": Conv1D(C, 3 * C), "c_proj": Conv1D(C, C)})
        self.ln_2 = nn.LayerNorm(C, eps=eps)
        inner = cfg.get("n_inner") or 4 * C
        self.mlp = nn.ModuleDict({"c_fc": Conv1D(C, inner), "c_proj": Conv1D(inner, C)})
        self.act = activation(cfg.get("activation_function", "gelu_new"))
        self.dropout = Dropout(cfg.get("resid_pdrop", 0.0))

    def forward(self, x, mask, cache):
        B, T, C = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, nh, past + T, hs)
        y = sdpa(q, k, v, mask, k.shape[2] == T, self.attn_dropout if self.training else 0.0, self.scale)
        x = x + self.dropout(self.attn.c_proj(y.transpose(1, 2).reshape(B, T, C)))
        return x + self.dropout(self.mlp.c_proj(self.act(self.mlp.c_fc(self.ln_2(x)))))


class GPT2Model(nn.Module):
    new_head_names = ()

    def __init__(self, cfg):
        super().__init__()
        C = cfg["n_embd"]
        self.max_positions = cfg["n_positions"]
        self.wte = nn.Embedding(cfg["vocab_size"], C)
        self.wpe = nn.Embedding(self.max_positions, C)
        self.drop = Dropout(cfg.get("embd_pdrop", 0.0))
        self.h = nn.ModuleList(Block(cfg, i) for i in range(cfg["n_layer"]))
        self.ln_f = nn.LayerNorm(C, eps=cfg.get("layer_norm_epsilon", 1e-5))

    def get_input_embeddings(self):
        return self.wte

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None):
        """Returns the last hidden state (B, T, C). `cache` (a KVCache) is extended in place."""
        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        T, past = x.shape[1], len(cache) if cache is not None else 0
        check_length(past + T, self.max_positions)
        derived_positions, mask = decoder_positions_and_mask(attention_mask, T, past)
        if position_ids is None:
            position_ids = derived_positions
        x = x + (self.wpe.weight[past:past + T] if position_ids is None else self.wpe(position_ids))
        x = self.drop(x)
        for block in self.h:
            x = block(x, mask, cache)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    new_head_names = ()

    def __init__(self, cfg):
        super().__init__()
        self.transformer = GPT2Model(cfg)
        self.lm_head = Linear(cfg["n_embd"], cfg["vocab_size"], bias=False)
        self.tie_word_embeddings = cfg.get("tie_word_embeddings", True)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                logits_mask=None, targets=None):
        hidden = self.transformer(input_ids, attention_mask, position_ids, cache, inputs_embeds)  # (B, T, C)
        return lm_output(self.lm_head, hidden, logits_mask, targets)


class GPT2ForSequenceClassification(nn.Module):
    new_head_names = ("score",)

    def __init__(self, cfg, num_labels):
        super().__init__()
        self.transformer = GPT2Model(cfg)
        self.score = Linear(cfg["n_embd"], num_labels, bias=False)
        self.pad_token_id = cfg.get("pad_token_id")

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None):
        hidden = self.transformer(input_ids, attention_mask, position_ids, None, inputs_embeds)
        index = last_token_index(input_ids, attention_mask, self.pad_token_id)
        return self.score(pool_last_token(hidden, index))  # (B, num_labels)


BASE_PREFIX = "transformer"


def build(cfg, task, num_labels):
    if task == "base":
        return GPT2Model(cfg)
    if task == "causal-lm":
        return GPT2LMHeadModel(cfg)
    return GPT2ForSequenceClassification(cfg, num_labels)
