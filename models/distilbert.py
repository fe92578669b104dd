"""DistilBERT (Sanh et al. 2019, arXiv:1910.01108), as in transformers' `DistilBertModel`.

A 6-layer BERT distilled from BERT-base: no token-type embeddings, no pooler. Per layer (post-norm):
    a = sa_layer_norm(h + out_lin · MHA(h));  h = output_layer_norm(a + lin2 · gelu(lin1 · a))
Classification: h[:, 0] -> pre_classifier -> ReLU -> dropout -> classifier.
"""
import torch.nn as nn
import torch.nn.functional as F

from .bert import encoder_self_attention
from .common import activation, check_length, padding_mask
from .fused import Dropout, Linear


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg["dim"]
        self.n_head = cfg["n_heads"]
        self.attn_dropout = cfg.get("attention_dropout", 0.0)
        self.attention = nn.ModuleDict({name: Linear(C, C) for name in ("q_lin", "k_lin", "v_lin", "out_lin")})
        self.sa_layer_norm = nn.LayerNorm(C, eps=1e-12)
        self.ffn = nn.ModuleDict({"lin1": Linear(C, cfg["hidden_dim"]), "lin2": Linear(cfg["hidden_dim"], C)})
        self.output_layer_norm = nn.LayerNorm(C, eps=1e-12)
        self.act = activation(cfg.get("activation", "gelu"))
        self.dropout = Dropout(cfg.get("dropout", 0.0))

    def forward(self, x, mask, first_token_only=False):
        """(B, T, C) -> (B, T, C), or (B, 1, C) for the [CLS] row alone (all rows are still attended to)."""
        a = self.attention
        queries = x[:, :1] if first_token_only else x
        y = encoder_self_attention(x, a.q_lin, a.k_lin, a.v_lin, self.n_head, mask,
                                   self.attn_dropout if self.training else 0.0, queries)
        x = self.sa_layer_norm(queries + a.out_lin(y))  # no dropout here (transformers has none)
        y = self.ffn.lin2(self.act(self.ffn.lin1(x)))
        return self.output_layer_norm(x + self.dropout(y))


class DistilBertModel(nn.Module):
    new_head_names = ()

    def __init__(self, cfg):
        super().__init__()
        C = cfg["dim"]
        self.max_positions = cfg["max_position_embeddings"]
        self.embeddings = nn.ModuleDict({
            "word_embeddings": nn.Embedding(cfg["vocab_size"], C),
            "position_embeddings": nn.Embedding(self.max_positions, C),  # sinusoidal or learned: stored either way
            "LayerNorm": nn.LayerNorm(C, eps=1e-12),
        })
        self.emb_dropout = Dropout(cfg.get("dropout", 0.0))
        self.transformer = nn.ModuleDict({"layer": nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg["n_layers"]))})

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, first_token_only=False):
        """Returns the last hidden state (B, T, C), or only its [CLS] row (B, 1, C) with first_token_only
        (the last layer then computes one query per sequence)."""
        emb = self.embeddings
        x = emb.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        T = x.shape[1]
        check_length(T, self.max_positions)
        x = self.emb_dropout(emb.LayerNorm(x + emb.position_embeddings.weight[:T]))
        mask = padding_mask(attention_mask)
        last = len(self.transformer.layer) - 1
        for i, layer in enumerate(self.transformer.layer):
            x = layer(x, mask, first_token_only and i == last)
        return x


class DistilBertForSequenceClassification(nn.Module):
    new_head_names = ("pre_classifier", "classifier")

    def __init__(self, cfg, num_labels):
        super().__init__()
        self.distilbert = DistilBertModel(cfg)
        self.pre_classifier = Linear(cfg["dim"], cfg["dim"])
        self.classifier = Linear(cfg["dim"], num_labels)
        self.dropout = Dropout(cfg.get("seq_classif_dropout", 0.0))

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        hidden = self.distilbert(input_ids, attention_mask, inputs_embeds, first_token_only=True)[:, 0]  # (B, C), [CLS]
        return self.classifier(self.dropout(F.relu(self.pre_classifier(hidden))))  # (B, num_labels)


BASE_PREFIX = "distilbert"


def build(cfg, task, num_labels):
    if task == "base":
        return DistilBertModel(cfg)
    if task == "seq-cls":
        return DistilBertForSequenceClassification(cfg, num_labels)
    raise ValueError(f"task {task!r} is not available for DistilBERT; use 'base' or 'seq-cls'")
