"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning",
arXiv:2104.08691).

The model stays frozen; the only trained weights are P, num_virtual_tokens "soft prompt" vectors
in the model's embedding space, put in front of every input:

    x = [P ; E[ids]]                (B, N + T, C),   E = the frozen token embedding
    mask = [1 ... 1 ; attention_mask]

so the model reads the task instruction as N free vectors instead of N discrete tokens. P starts
random (N(0, 1), peft's nn.Embedding default), as the embeddings of N sampled vocabulary tokens,
or as the embeddings of an initialisation text's tokens repeated/cut to N (peft's
PromptTuningInit.TEXT; the paper finds text or vocabulary init trains better than random).

Our forward returns the outputs of the real tokens only (the N virtual positions are cut off), so
labels need no -100 padding for the virtual tokens. The last virtual position predicts the first real
token, and the causal-LM loss scores that too (evaluation.next_token_nll selects it with a logits_mask
as wide as prompt + input), as peft's does: it pads the labels with N x -100 and then shifts them.
With a KV cache the prompt is prepended on the first step only; later steps find it in the cache.
Saved as peft does: adapter_config.json (peft_type PROMPT_TUNING) and adapter_model.safetensors
holding `prompt_embeddings` (N, C) (and the classification head for seq-cls).
"""
import copy
from contextlib import contextmanager

import torch
from torch import nn

from .adapters import (AdapterError, default_heads, heads, load_state_strict, restored_on_error, task_type, wrap_heads,
                       write_adapter_files)

PREFIX = "base_model."  # peft's prompt-learning models name head tensors base_model.<head>.<param>

INITS = ("random", "sample_vocab", "text")


def input_embeddings(model):
    return next(m for m in model.modules() if hasattr(m, "get_input_embeddings")).get_input_embeddings()


class PromptTuningModel(nn.Module):
    """A frozen model with named soft prompts; the active one is prepended to every input."""

    def __init__(self, model):
        super().__init__()
        self.base_model = model.requires_grad_(False)
        self.prompt_embeddings = nn.ParameterDict()
        self.peft_config, self.active_adapter, self.disabled = {}, None, False

    @torch.no_grad()
    def add_prompt(self, name="default", num_virtual_tokens=20, init="random", init_text=None, tokenizer=None,
                   modules_to_save=None):
        """Add a soft prompt of num_virtual_tokens vectors (init: random | sample_vocab | text)."""
        if name in self.prompt_embeddings:
            raise AdapterError(f"a prompt named {name!r} already exists")
        if not isinstance(num_virtual_tokens, int) or num_virtual_tokens <= 0:
            raise AdapterError(f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens!r}")
        if init not in INITS:
            raise AdapterError(f"prompt init must be one of {', '.join(INITS)}, got {init!r}")
        embed = input_embeddings(self.base_model)
        N = num_virtual_tokens
        if init == "random":
            prompt = torch.randn(N, embed.embedding_dim)
        else:
            if init == "text":
                if not init_text or tokenizer is None:
                    raise AdapterError("init='text' needs init_text and the model's tokenizer")
                ids = tokenizer.encode(init_text)  # with special tokens, as peft's tokenizer(text) call
                ids = (ids * -(-N // len(ids)))[:N]  # repeat, then cut to N tokens
                ids = torch.tensor(ids)
            else:
                ids = torch.randint(0, embed.num_embeddings, (N,))
            prompt = embed.weight[ids].float().clone()
        self.prompt_embeddings[name] = nn.Parameter(prompt)  # (N, C), kept in fp32
        save = default_heads(self.base_model) if modules_to_save is None else list(dict.fromkeys(modules_to_save))
        wrap_heads(self.base_model, save, name)
        cfg = self.base_model.config
        self.peft_config[name] = {
            # peft's plain PeftModel (task_type None) ignores a soft prompt; on a base model it is FEATURE_EXTRACTION
            "peft_type": "PROMPT_TUNING", "task_type": task_type(self.base_model) or "FEATURE_EXTRACTION",
            "num_virtual_tokens": N,
            "token_dim": embed.embedding_dim, "num_transformer_submodules": 1,
            "num_attention_heads": cfg.get("num_attention_heads") or cfg.get("n_head") or cfg.get("n_heads"),
            "num_layers": cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("n_layers"),
            "prompt_tuning_init": init.upper(), "prompt_tuning_init_text": init_text if init == "text" else None,
            "tokenizer_name_or_path": getattr(self.base_model, "name_or_path", None) if init == "text" else None,
            "base_model_name_or_path": getattr(self.base_model, "name_or_path", None),
            "modules_to_save": list(save) or None, "inference_mode": True,
        }
        self.set_adapter(self.active_adapter or name)  # the new prompt and head copies train only if active
        return self

    def set_adapter(self, name):
        if name not in self.prompt_embeddings:
            raise AdapterError(f"no prompt named {name!r}; have {list(self.prompt_embeddings)}")
        for key, prompt in self.prompt_embeddings.items():
            prompt.requires_grad_(key == name)
        for _, head in heads(self.base_model):
            head.set_adapter(name)
        self.active_adapter = name

    def delete_adapter(self, name):
        if name not in self.prompt_embeddings:
            raise AdapterError(f"no prompt named {name!r}; have {list(self.prompt_embeddings)}")
        del self.prompt_embeddings[name]
        del self.peft_config[name]
        for _, head in heads(self.base_model):
            if name in head.modules_to_save:
                del head.modules_to_save[name]
                head.set_adapter(head.active_adapter if head.active_adapter != name else None)
        if self.active_adapter == name:  # another prompt becomes active only in place of the deleted one
            self.active_adapter = None
            if self.prompt_embeddings:
                self.set_adapter(next(iter(self.prompt_embeddings)))

    @contextmanager
    def disable_adapters(self):
        previous, self.disabled = self.disabled, True
        saved_heads = [(head, head.disabled) for _, head in heads(self.base_model)]
        for head, _ in saved_heads:
            head.disabled = True
        try:
            yield self
        finally:
            self.disabled = previous
            for head, state in saved_heads:
                head.disabled = state

    @property
    def virtual_tokens(self):
        """Positions the active soft prompt takes before the input (0 when switched off)."""
        return 0 if self.disabled or self.active_adapter is None else len(self.prompt_embeddings[self.active_adapter])

    def forward(self, input_ids=None, attention_mask=None, cache=None, token_type_ids=None, **kwargs):
        if self.disabled or self.active_adapter is None:
            extra = {"cache": cache} if cache is not None else {}
            if token_type_ids is not None:
                extra["token_type_ids"] = token_type_ids
            return self.base_model(input_ids, attention_mask, **extra, **kwargs)
        x = input_embeddings(self.base_model)(input_ids)  # (B, T, C)
        B, T, _ = x.shape
        prompt = self.prompt_embeddings[self.active_adapter]  # (N, C)
        N = prompt.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones(B, x.shape[1] + (len(cache) - N if cache else 0), dtype=torch.long)
        mask = torch.cat([attention_mask.new_ones(B, N), attention_mask], dim=1)  # (B, N + T_total)
        prepend = cache is None or len(cache) == 0
        if prepend:
            x = torch.cat([prompt.to(x.dtype).expand(B, -1, -1), x], dim=1)  # (B, N + T, C)
        extra = {"cache": cache} if cache is not None else {}
        if token_type_ids is not None:
            extra["token_type_ids"] = torch.cat([token_type_ids.new_zeros(B, N), token_type_ids], dim=1)
        mask_of_input = kwargs.get("logits_mask")  # (B, T), or (B, N + T) to select virtual positions too
        if mask_of_input is not None and mask_of_input.shape[1] == T:
            kwargs["logits_mask"] = torch.cat([mask_of_input.new_zeros(B, N if prepend else 0), mask_of_input], dim=1)
        out = self.base_model(inputs_embeds=x, attention_mask=mask, **extra, **kwargs)
        return out[:, N:] if prepend and out.dim() == 3 else out

    def save(self, folder, adapter_name=None):
        name = adapter_name or self.active_adapter
        if name not in self.prompt_embeddings:
            raise AdapterError(f"no prompt named {name!r}; have {list(self.prompt_embeddings)}")
        state = {"prompt_embeddings": self.prompt_embeddings[name]}
        for head_name, head in heads(self.base_model):
            if name in head.modules_to_save:
                for key, value in head.modules_to_save[name].state_dict().items():
                    state[f"{PREFIX}{head_name}.{key}"] = value
        write_adapter_files(folder, self.peft_config[name], state)


def load_prompt_adapter(model, peft, tensors, folder, adapter_name):
    """Build (or extend) a PromptTuningModel from a peft prompt-tuning adapter's config and tensors."""
    if "prompt_embeddings" not in tensors:
        raise AdapterError(f"{folder}: a prompt-tuning adapter needs the tensor prompt_embeddings")
    if peft.get("num_transformer_submodules", 1) != 1:
        raise AdapterError(f"{folder}: prompt tuning for encoder-decoder models is not supported")
    with restored_on_error(model):  # the caller's model: a plain one or a PromptTuningModel
        wrapper = model if isinstance(model, PromptTuningModel) else PromptTuningModel(model)
        prompt = tensors["prompt_embeddings"]
        dim = input_embeddings(wrapper.base_model).embedding_dim
        if prompt.shape[1] != dim:
            raise AdapterError(f"{folder}: tensor prompt_embeddings has shape {tuple(prompt.shape)}, "
                               f"the model expects (*, {dim})")
        if peft.get("num_virtual_tokens", prompt.shape[0]) != prompt.shape[0]:
            raise AdapterError(f"{folder}: adapter_config.json says num_virtual_tokens {peft['num_virtual_tokens']!r}, "
                               f"tensor prompt_embeddings has {prompt.shape[0]} rows")
        wrapper.add_prompt(adapter_name, prompt.shape[0], modules_to_save=peft.get("modules_to_save") or [])
        wrapper.peft_config[adapter_name] = copy.deepcopy(peft)
        with torch.no_grad():
            wrapper.prompt_embeddings[adapter_name].copy_(prompt)
        head_names = [n for n, h in heads(wrapper.base_model) if adapter_name in h.modules_to_save]
        head_state = {}
        for key, value in tensors.items():
            if key == "prompt_embeddings":
                continue
            rest = key[len(PREFIX):] if key.startswith(PREFIX) else key
            head = next((h for h in head_names if rest.startswith(h + ".")), None)
            if head is None:
                raise AdapterError(f"{folder}: tensor {key} belongs to no head of this model")
            head_state[f"base_model.{head}.modules_to_save.{adapter_name}.{rest[len(head) + 1:]}"] = value
        allowed = {k for k in wrapper.state_dict() if f".modules_to_save.{adapter_name}." in k}
        load_state_strict(wrapper, head_state, folder, allowed)
    return wrapper
