"""Autoregressive generation for the decoders, with a KV cache.

Each step feeds only the newest token; the keys and values of earlier tokens come from the cache,
so a step costs O(T) instead of re-running the whole O(T²) prefix. Batches are left-padded: every
row's next token is then at the same position -1, and the attention mask hides the padding.
"""
import torch

from .common import KVCache
from .loading import LoadError


def sample_next(logits, do_sample, temperature, top_p, generator):
    """logits (B, vocab) -> next token ids (B,): argmax, or a draw from the top-p nucleus at a temperature."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs > top_p  # tokens after the nucleus already holds top_p of the mass
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def check_room(model, prompt_length, max_new_tokens):
    """Raise LoadError unless prompt + new tokens fit the model's positions: checked before the first
    step, not when the model meets the position max_new_tokens steps later."""
    limit = next((m.max_positions for m in model.modules() if hasattr(m, "max_positions")), None)
    virtual = getattr(model, "virtual_tokens", 0)  # a soft prompt's positions (lora/prompt_tuning.py)
    if limit is not None and virtual + prompt_length + max_new_tokens - 1 > limit:  # the last token is not fed back
        raise LoadError(f"{prompt_length} prompt tokens" + (f" + {virtual} virtual tokens" if virtual else "")
                        + f" + {max_new_tokens} new tokens exceed the model's maximum of {limit} positions")


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, max_new_tokens=20, do_sample=False, temperature=1.0,
             top_p=1.0, eos_token_id=None, pad_token_id=None, use_cache=True, generator=None):
    """Extend each row of input_ids (B, T) by up to max_new_tokens tokens; returns (B, T + new).

    Rows that emit an eos token are padded with pad_token_id afterwards; generation stops when every
    row has finished. eos_token_id may be an int or a list of ids. Without attention_mask, prompt tokens
    equal to pad_token_id are padding when pad is not also an eos, as transformers infers the mask.
    """
    if do_sample and not temperature > 0:  # `not >`: nan too
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not (isinstance(max_new_tokens, int) and max_new_tokens > 0):
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    eos = torch.tensor([] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int)
                       else list(eos_token_id), dtype=torch.long, device=input_ids.device)
    if attention_mask is None:  # as transformers: pad tokens in the prompt are padding, unless pad is an eos
        pad_is_padding = pad_token_id is not None and pad_token_id not in eos.tolist()
        attention_mask = (input_ids != pad_token_id).long() if pad_is_padding else torch.ones_like(input_ids)
    if input_ids.shape[1] == 0 or not attention_mask.bool().any(1).all():  # no token to predict the first new one from
        raise ValueError("every row needs at least one prompt token to continue; an empty prompt has none")
    check_room(model, input_ids.shape[1], max_new_tokens)
    if pad_token_id is None:
        pad_token_id = int(eos[0]) if len(eos) else 0
    cache = KVCache() if use_cache else None
    ids, step_ids = input_ids, input_ids
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        inputs = step_ids if use_cache else ids
        last = torch.zeros_like(inputs, dtype=torch.bool)
        last[:, -1] = True  # the full (B, T, vocab) logits of the prompt are never needed
        logits = model(inputs, attention_mask, cache=cache, logits_mask=last)  # (B, vocab)
        next_ids = sample_next(logits, do_sample, temperature, top_p, generator).masked_fill(finished, pad_token_id)
        ids = torch.cat([ids, next_ids[:, None]], dim=1)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        finished |= torch.isin(next_ids, eos)
        if finished.all():
            break
        step_ids = next_ids[:, None]
    return ids
