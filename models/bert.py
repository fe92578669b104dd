"""BERT encoder (Devlin et al. 2019, arXiv:1810.04805), as in transformers' `BertModel`.

    h0 = LayerNorm(word_emb[ids] + pos_emb[0..T-1] + type_emb[token_type_ids])
    per layer (post-norm):  a = LayerNorm(h + Wo · MHA(h));  h = LayerNorm(a + W2 · act(W1 · a))
    pooler(h) = tanh(Wp · h[:, 0])        (the [CLS] token)

Module names nest exactly like transformers' (`encoder.layer.0.attention.self.query`), using
nn.ModuleDict for the levels that hold no code of their own, so a checkpoint loads as is.
all-MiniLM-L6-v2 (`minilm-l6`) is this architecture.
"""
import torch
import torch.nn as nn

from .common import activation, check_length, padding_mask, sdpa
from .fused import Dropout, Linear


def encoder_self_attention(x, query, key, value, n_head, mask, dropout_p, queries=None):
    """Multi-head self-attention of an encoder, before the output projection: (B, Tq, C).

    queries: the rows of x that ask (default all of x); keys and values always come from all of x.
    """
    queries = x if queries is None else queries
    B, T, C = x.shape

    def heads(t):  # (B, T, C) -> (B, nh, T, hs)
        return t.view(B, t.shape[1], n_head, C // n_head).transpose(1, 2)

    y = sdpa(heads(query(queries)), heads(key(x)), heads(value(x)), mask, causal=False, dropout_p=dropout_p)
    return y.transpose(1, 2).reshape(B, queries.shape[1], C)


class BertLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, eps = cfg["hidden_size"], cfg.get("layer_norm_eps", 1e-12)
        self.n_head = cfg["num_attention_heads"]
        self.attn_dropout = cfg.get("attention_probs_dropout_prob", 0.0)
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({"query": Linear(C, C), "key": Linear(C, C), "value": Linear(C, C)}),
            "output": nn.ModuleDict({"dense": Linear(C, C), "LayerNorm": nn.LayerNorm(C, eps=eps)}),
        })
        self.intermediate = nn.ModuleDict({"dense": Linear(C, cfg["intermediate_size"])})
        self.output = nn.ModuleDict({"dense": Linear(cfg["intermediate_size"], C), "LayerNorm": nn.LayerNorm(C, eps=eps)})
        self.act = activation(cfg.get("hidden_act", "gelu"))
        self.dropout = Dropout(cfg.get("hidden_dropout_prob", 0.0))

    def forward(self, x, mask, first_token_only=False):
        """(B, T, C) -> (B, T, C), or (B, 1, C) for the [CLS] row alone (all rows are still attended to)."""
        sa, out = self.attention.self, self.attention.output
        queries = x[:, :1] if first_token_only else x
        y = encoder_self_attention(x, sa.query, sa.key, sa.value, self.n_head, mask,
                                   self.attn_dropout if self.training else 0.0, queries)
        x = out.LayerNorm(queries + self.dropout(out.dense(y)))
        y = self.output.dense(self.act(self.intermediate.dense(x)))
        return self.output.LayerNorm(x + self.dropout(y))


class BertPooler(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.dense = Linear(C, C)

    def forward(self, hidden):  # (B, T, C) -> (B, C): the [CLS] token through dense + tanh
        return torch.tanh(self.dense(hidden[:, 0]))


class BertModel(nn.Module):
    new_head_names = ("pooler",)  # may be absent from a checkpoint; initialised fresh then

    def __init__(self, cfg, add_pooler=True):
        super().__init__()
        C = cfg["hidden_size"]
        self.max_positions = cfg["max_position_embeddings"]
        self.embeddings = nn.ModuleDict({
            "word_embeddings": nn.Embedding(cfg["vocab_size"], C),
            "position_embeddings": nn.Embedding(self.max_positions, C),
            "token_type_embeddings": nn.Embedding(cfg.get("type_vocab_size", 2), C),
            "LayerNorm": nn.LayerNorm(C, eps=cfg.get("layer_norm_eps", 1e-12)),
        })
        self.emb_dropout = Dropout(cfg.get("hidden_dropout_prob", 0.0))
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(BertLayer(cfg) for _ in range(cfg["num_hidden_layers"]))})
        self.pooler = BertPooler(C) if add_pooler else None

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
                first_token_only=False):
        """Returns the last hidden state (B, T, C), or only its [CLS] row (B, 1, C) with first_token_only:
        the last layer then computes one query per sequence, which is all a [CLS] classifier reads."""
        emb = self.embeddings
        x = emb.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        T = x.shape[1]
        check_length(T, self.max_positions)
        x = x + emb.position_embeddings.weight[:T]
        if token_type_ids is None:
            x = x + emb.token_type_embeddings.weight[0]
        else:
            x = x + emb.token_type_embeddings(token_type_ids)
        x = self.emb_dropout(emb.LayerNorm(x))
        mask = padding_mask(attention_mask)
        last = len(self.encoder.layer) - 1
        for i, layer in enumerate(self.encoder.layer):
            x = layer(x, mask, first_token_only and i == last)
        return x


class BertForSequenceClassification(nn.Module):
    """[CLS] -> pooler (tanh) -> dropout -> classifier, as transformers' class of the same name."""

    new_head_names = ("classifier", "bert.pooler")

    def __init__(self, cfg, num_labels):
        super().__init__()
        self.bert = BertModel(cfg)
        p = cfg.get("classifier_dropout")  # an explicit 0.0 is kept, as transformers keeps it
        self.dropout = Dropout(cfg.get("hidden_dropout_prob", 0.0) if p is None else p)
        self.classifier = Linear(cfg["hidden_size"], num_labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None):
        hidden = self.bert(input_ids, attention_mask, token_type_ids, inputs_embeds, first_token_only=True)  # (B, 1, C)
        return self.classifier(self.dropout(self.bert.pooler(hidden)))  # (B, num_labels)


BASE_PREFIX = "bert"  # where transformers' task classes keep the BertModel


def build(cfg, task, num_labels):
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):  # a causal mask or cross-attention: other math
        raise ValueError("BERT as a decoder (is_decoder / add_cross_attention in config.json) is not supported")
    if task == "base":
        return BertModel(cfg)
    if task == "seq-cls":
        return BertForSequenceClassification(cfg, num_labels)
    raise ValueError(f"task {task!r} is not available for BERT; use 'base' or 'seq-cls'")
