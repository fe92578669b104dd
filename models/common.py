"""Pieces every model family shares: activations, attention masks, and the KV cache.

Attention masks here are boolean and broadcast against SDPA's (B, nh, T_q, T_k) scores:
True means "this query may look at this key".
"""
import torch
import torch.nn.functional as F

from .fused import attention_with_dropout, lm_loss

ACTIVATIONS = {
    "gelu": F.gelu,  # exact erf form (BERT, DistilBERT)
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's tanh approximation
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def check_length(T, max_positions):
    if T > max_positions:
        raise ValueError(f"sequence length {T} exceeds the model's maximum of {max_positions} positions")


def padding_mask(attention_mask):
    """(B, T) 1/0 mask -> (B, 1, 1, T) boolean key mask for an encoder, or None when nothing is padded."""
    if attention_mask is None or bool(attention_mask.all()):
        return None  # SDPA's fastest path
    return attention_mask.bool()[:, None, None, :]


class KVCache:
    """Keys and values of each layer for every token seen so far, each (B, n_kv_head, T_past, hs)."""

    def __init__(self):
        self.layers = []

    def __len__(self):
        return self.layers[0][0].shape[2] if self.layers else 0

    def update(self, layer_idx, k, v):
        if layer_idx == len(self.layers):
            self.layers.append((k, v))
        else:
            past_k, past_v = self.layers[layer_idx]
            self.layers[layer_idx] = (torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2))
        return self.layers[layer_idx]

    def reorder(self, keep):
        """Keep only the batch rows in `keep` (rows that finished generating can be dropped)."""
        self.layers = [(k[keep], v[keep]) for k, v in self.layers]


def decoder_positions_and_mask(attention_mask, T, past):
    """Position ids and the causal+padding mask for T new tokens after `past` cached ones.

    Positions count only real tokens (cumsum of the mask), so a left-padded row gets the same
    positions, and therefore the same logits, as the row without padding.
    Returns position_ids (B, T) and a (B, 1, T, past + T) boolean mask, or (None, None) when the
    positions are past..past+T-1 and SDPA needs no mask (`is_causal` when past == 0).
    """
    if (attention_mask is None or bool(attention_mask.all())) and (past == 0 or T == 1):
        return None, None  # plain causal attention, or one new token that sees every cached one
    if attention_mask is None:
        attention_mask = torch.ones(1, past + T, dtype=torch.long)
    attention_mask = attention_mask.long()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -T:]
    query_index = torch.arange(past, past + T, device=attention_mask.device)
    key_index = torch.arange(past + T, device=attention_mask.device)
    causal = key_index[None, :] <= query_index[:, None]  # (T, past + T)
    mask = causal[None] & attention_mask.bool()[:, None, :]  # (B, T, past + T)
    # a left-pad query sees no key at all; let it see everything so SDPA gives no NaN (its output is unused)
    mask |= ~mask.any(-1, keepdim=True)
    return position_ids, mask[:, None]


def sdpa(q, k, v, mask, causal, dropout_p=0.0, scale=None):
    """Scaled dot-product attention: softmax(q kᵀ · scale + mask) v, scale 1 / sqrt(hs) unless given,
    with grouped KV heads allowed.

    With dropout on the attention probabilities (training) the probabilities must exist, so that
    case is written out (fused.attention_with_dropout); SDPA's own would take the same path with
    torch's slower dropout mask.
    """
    if dropout_p > 0.0:
        return attention_with_dropout(q, k, v, mask, causal and mask is None, dropout_p, scale)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal and mask is None,
        enable_gqa=q.shape[1] != k.shape[1], scale=scale,
    )


def init_new_weights(module, std):
    """Initialise a head the checkpoint does not have, as transformers does: N(0, std), bias 0."""
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)



def last_token_index(input_ids, attention_mask, pad_token_id):
    """Index of each row's last token that is not padding: what a decoder classifies.

    transformers' rule, so a head trained here classifies alike there: the rightmost token of input_ids
    that is not pad_token_id (the attention mask is not read: a real token equal to the pad id, e.g. an
    eos used as pad, counts as padding); without pad_token_id the last position, for one row only.
    With inputs_embeds only (a soft prompt), the last position the attention mask keeps
    (transformers takes the last position there, padding or not).
    """
    if input_ids is None:
        if attention_mask is None:
            return None
        real = attention_mask.bool()
    elif pad_token_id is None:
        if input_ids.shape[0] > 1:
            raise ValueError("a decoder classifier cannot find each row's last token in a batch without a pad token: "
                             "set pad_token_id in config.json (transformers refuses such batches too)")
        return None
    else:
        real = input_ids != pad_token_id
    positions = torch.arange(real.shape[-1], device=real.device)
    return (positions * real).argmax(-1)


def pool_last_token(hidden, index):
    """hidden (B, T, C) -> (B, C) at each row's `index` (or the last position when index is None)."""
    if index is None:
        return hidden[:, -1]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def lm_output(lm_head, hidden, logits_mask=None, targets=None):
    """What a causal LM's forward returns from its last hidden state (B, T, C):
    the logits (B, T, vocab); with a boolean logits_mask (B, T) only those positions' logits (n, vocab);
    with targets (n,) as well, the summed next-token NLL of those positions instead of their logits.

    Training needs logits only where there are labels: a full (B, T, vocab) fp32 tensor is the
    largest activation of a small LM, and the loss from the hidden states never materialises even
    that part (fused.lm_loss).
    """
    if logits_mask is not None:
        hidden = hidden[logits_mask]  # (n, C)
    if targets is not None:
        return lm_loss(lm_head, hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1))
    return lm_head(hidden)
