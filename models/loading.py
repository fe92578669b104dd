"""Find a Hugging Face checkpoint, build our model for it, and load the weights in one safetensors read.

A name resolves, in order, to: an existing local folder; a folder of that name in $PEFT_MODELS_DIR
(where ../shared/tools/fetch_models.py puts `minilm-l6` and `smollm2-135m`); a short alias's Hub id;
that Hub id in the local Hugging Face cache; a download from the Hub.

The model is built on the meta device, so no memory is spent on random weights; each tensor is then
read once from the .safetensors file(s), cast to the requested dtype and assigned in place.
"""
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import bert, distilbert, gpt2, llama
from .common import init_new_weights
from .tokenizer import Tokenizer

FAMILIES = {"bert": bert, "distilbert": distilbert, "gpt2": gpt2, "llama": llama, "qwen2": llama}
DECODERS = ("gpt2", "llama", "qwen2")
TASKS = ("causal-lm", "seq-cls", "base")
QUANT = ("nf4", "nf4-dq", "int8")  # quant.linear.FORMATS
ALIASES = {
    "distilbert": "distilbert/distilbert-base-uncased",
    "distilbert-base-uncased": "distilbert/distilbert-base-uncased",
    "distilgpt2": "distilbert/distilgpt2",
    "gpt2": "openai-community/gpt2",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "qwen2.5-0.5b-instruct": "Qwen/Qwen2.5-0.5B-Instruct",
}
HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]


class LoadError(ValueError):
    """A checkpoint that cannot be found or does not fit the model, or an input that does not fit it (a
    generation past its positions); the message says which and why."""


def write_text(path, text):
    """Write `text` to `path` through a temporary file, so an interruption never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path, value):
    """write_text of `value` as JSON; a value JSON cannot hold fails before any file is touched."""
    write_text(path, json.dumps(value, indent=2))


def read_json(path, error=LoadError):
    """The JSON object in the file at `path` (a config); anything else raises `error` naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a UTF-8 text file") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object ({{...}}), found a {type(value).__name__}")
    return value


def open_safetensors(path, error=LoadError):
    """safe_open on `path`; a file the safetensors library cannot read raises `error` naming it."""
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise error(f"{path}: not a readable safetensors file ({e})") from None


def models_dir():
    return Path(os.environ.get("PEFT_MODELS_DIR") or Path.home() / ".cache" / "peft-models")


def resolve(name_or_path, cache_dir=None):
    """The local folder holding the checkpoint `name_or_path`, downloading it if need be."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        raise LoadError(f"{path} is a file; pass the folder that holds config.json, *.safetensors and tokenizer.json")
    tried = [f"local folder {path} (does not exist)"]
    fetched = models_dir() / str(name_or_path)
    if fetched.is_dir():
        return fetched
    tried.append(f"{fetched} (does not exist)")
    repo_id = ALIASES.get(str(name_or_path).lower(), str(name_or_path))
    if repo_id.count("/") > 1 or path.is_absolute() or str(name_or_path).startswith("."):
        raise LoadError(f"{name_or_path!r} is not an existing folder; tried: {'; '.join(tried)}")
    from huggingface_hub import snapshot_download  # only needed for Hub names

    for local_only, where in ((True, "the local Hugging Face cache"), (False, "the Hugging Face Hub")):
        try:
            return Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=local_only,
                                          allow_patterns=HUB_FILES))
        except Exception as e:  # every failure is reported below, with its reason
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            tried.append(f"{repo_id} in {where} ({type(e).__name__}: {reason[:160]})")
    raise LoadError(f"could not find model {name_or_path!r}; tried: {'; '.join(tried)}. "
                    "Pass the path of a local folder with config.json, *.safetensors and tokenizer.json.")


def read_config(folder):
    path = Path(folder) / "config.json"
    if (Path(folder) / "adapter_config.json").is_file() and not path.is_file():
        base = read_json(Path(folder) / "adapter_config.json").get("base_model_name_or_path")
        raise LoadError(f"{folder} holds an adapter, not a model: pass its base model" + (f" ({base})" if base else "")
                        + " as the model and this folder as the adapter")
    if not path.is_file():
        raise LoadError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    cfg = read_json(path)
    if cfg.get("model_type") not in FAMILIES:
        raise LoadError(f"{path}: model_type {cfg.get('model_type')!r} is not supported; "
                        f"supported: {', '.join(sorted(FAMILIES))}")
    quantized = cfg.get("quantization_config")
    if quantized:  # its tensors are codes and scales in that library's layout, not weights
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        raise LoadError(f"{path}: the checkpoint was saved quantized (quantization_config, quant_method {method!r}); "
                        "load its full-precision checkpoint and quantize while loading (quant=..., --quant)")
    return cfg


def max_positions(cfg):
    """The most positions the model of config.json `cfg` takes (GPT-2 names it n_positions)."""
    return cfg.get("max_position_embeddings") or cfg.get("n_positions")


def check_positions(cfg, model_name, tokens, asked_by):
    """LoadError unless `tokens` positions fit the model; `asked_by` names the flags that ask for them."""
    if tokens > max_positions(cfg):
        raise LoadError(f"{asked_by} exceeds {model_name}'s maximum of {max_positions(cfg)} positions")


def weight_files(folder):
    """The checkpoint's weight files, chosen as transformers chooses them: model.safetensors, else the
    shards model.safetensors.index.json lists. Other .safetensors files in the folder are not read."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LoadError(f"{index}: no weight_map (tensor name -> file)")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise LoadError(f"{index} lists shard(s) the folder lacks: {', '.join(absent)}")
        return files
    others = sorted(path.name for path in folder.glob("*.safetensors"))
    if others:
        raise LoadError(f"{folder} has no model.safetensors or model.safetensors.index.json "
                        f"(it has {', '.join(others)})")
    raise LoadError(f"{folder} has no .safetensors weights (pickled .bin files are not loaded, for safety)")


def checkpoint_name_to_ours(key, ours, prefix):
    """Map a checkpoint key onto our parameter names: with or without the base model's prefix, and
    LayerNorm's old gamma / beta names (early BERT conversions) read as weight / bias, as transformers does."""
    for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
        if key.endswith(old) and key[:-len(old)].endswith("LayerNorm"):
            key = key[:-len(old)] + new
    if key in ours:
        return key
    if f"{prefix}.{key}" in ours:
        return f"{prefix}.{key}"
    if key.startswith(prefix + ".") and key[len(prefix) + 1:] in ours:
        return key[len(prefix) + 1:]
    return None


def is_new_head(name, model):
    return any(name == head or name.startswith(head + ".") for head in model.new_head_names)


def quantization_targets(model, quant):
    """The linear layers a quantized load replaces: all but the task heads (and the tied LM head)."""
    if quant is None:
        return {}
    if quant not in QUANT:
        raise LoadError(f"unknown quantization {quant!r}; choose from {', '.join(QUANT)}")
    from quant.linear import BLOCKSIZE, is_linear, is_skipped

    targets = {name: m for name, m in model.named_modules() if is_linear(m) and not is_skipped(name)}
    uneven = [(name, m.weight.numel()) for name, m in targets.items() if m.weight.numel() % BLOCKSIZE]
    if quant != "int8" and uneven:  # checked before reading: bitsandbytes would give these a short last block
        raise LoadError(f"{uneven[0][0]} has {uneven[0][1]} weights, not a multiple of NF4's block of {BLOCKSIZE} "
                        f"({len(uneven)} such layer(s)); load this model with quant='int8' or without quant")
    return targets


def load_weights(model, folder, dtype, prefix, std, quant=None, ignore_mismatched_sizes=False):
    """Read each tensor of the checkpoint once into the meta-built `model`; initialise new heads.

    With `quant`, each target linear layer is quantized as soon as its tensors are read, so at most
    one layer's full-precision weight is alive at a time (QLoRA's point: the fp32 model never exists).
    ignore_mismatched_sizes: a task head whose checkpoint tensors have another shape (another number of
    labels) is initialised fresh, as transformers' option of that name does, instead of an error.
    """
    tied = getattr(model, "tie_word_embeddings", False)
    ours = {name: p.shape for name, p in model.named_parameters() if not (tied and name == "lm_head.weight")}
    targets = quantization_targets(model, quant)
    if targets:
        from quant.linear import FORMATS
    pending, quantized, resized = {}, set(), set()  # layer -> tensors read so far; quantized; left for a new head
    state, stored_head = {}, None
    for file in weight_files(folder):
        with open_safetensors(file) as f:
            for key in f.keys():
                name = checkpoint_name_to_ours(key, ours, prefix)
                if tied and key == "lm_head.weight":
                    stored_head = f.get_tensor(key).to(dtype)  # compared with the embedding below
                if name is None:
                    continue  # another task's head (e.g. an LM head when classifying) or an old buffer
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(ours[name]):
                    if ignore_mismatched_sizes and is_new_head(name, model):
                        resized.add(name)
                        continue
                    raise LoadError(f"{file}: tensor {key} has shape {shape}, the model expects {tuple(ours[name])}"
                                    + (" (pass num_labels to match the checkpoint, or ignore_mismatched_sizes=True "
                                       "for a new head)" if is_new_head(name, model) else ""))
                owner, _, attr = name.rpartition(".")
                if owner not in targets:
                    tensor = f.get_tensor(key).to(dtype)
                    # a tensor read from the file may be a view of its memory map, and one surviving view
                    # keeps every page the quantizer touched resident: a quantized load copies it out
                    state[name] = tensor.clone() if targets else tensor
                    continue
                pending.setdefault(owner, {})[attr] = f.get_tensor(key).to(dtype)
                if len(pending[owner]) == len(list(targets[owner].parameters())):
                    tensors = pending.pop(owner)
                    conv1d = type(targets[owner]).__name__ == "Conv1D"  # stores (in, out)
                    weight = tensors["weight"].t() if conv1d else tensors["weight"]
                    cls, options = FORMATS[quant]
                    model.set_submodule(owner, cls.from_weight(weight, tensors.get("bias"), dtype, conv1d, **options))
                    quantized.update(f"{owner}.{a}" for a in tensors)
    missing = [n for n in ours if n not in state and n not in quantized and not is_new_head(n, model)]
    if missing:
        raise LoadError(f"{folder}: checkpoint is missing {len(missing)} tensor(s) the model needs: "
                        + ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else ""))
    model.load_state_dict(state, strict=False, assign=True)
    model.random_heads, model.resized_heads = [], []  # heads the checkpoint lacks / has in another size
    for head in model.new_head_names:
        module = model.get_submodule(head)
        other_size = any(n.startswith(head + ".") for n in resized)
        if other_size or any(p.is_meta for p in module.parameters()):
            module.to_empty(device="cpu").to(dtype)
            init_new_weights(module, std)
            model.random_heads.append(head)
            if other_size:
                model.resized_heads.append(head)
    if tied:
        model.lm_head.weight = model.get_submodule(prefix).get_input_embeddings().weight
        # transformers then keeps the stored head (untied, with a warning); silently tying it would
        # compute another model
        if stored_head is not None and not torch.equal(stored_head, model.lm_head.weight):
            raise LoadError(f"{folder}: config.json ties lm_head to the input embedding (tie_word_embeddings), but "
                            "the checkpoint stores a different lm_head.weight; set tie_word_embeddings to false in "
                            "config.json to use the stored head")


def load_model(name_or_path, task="causal-lm", num_labels=2, dtype=torch.float32, cache_dir=None, quant=None,
               ignore_mismatched_sizes=False):
    """Load a Hugging Face checkpoint into our model. Returns (model in eval mode, Tokenizer).

    task: "causal-lm" (logits (B, T, vocab)), "seq-cls" (logits (B, num_labels)) or "base" (hidden (B, T, C)).
    quant: None, "nf4", "nf4-dq" (NF4 + double quantization) or "int8" (LLM.int8): the linear layers
    except the heads are quantized while loading (quant/), computing in `dtype`.
    ignore_mismatched_sizes: a classification head the checkpoint holds for another number of labels
    starts fresh (listed in model.resized_heads, as heads it lacks are in model.random_heads).
    """
    if task not in TASKS:
        raise LoadError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise LoadError(f"unsupported dtype {dtype!r}; use float32, bfloat16, float16 or float64")
    folder = resolve(name_or_path, cache_dir)
    cfg = read_config(folder)
    family = FAMILIES[cfg["model_type"]]
    try:
        with torch.device("meta"):
            model = family.build(cfg, task, num_labels)
    except KeyError as e:
        raise LoadError(f"{folder}/config.json lacks the key {e.args[0]!r} that {cfg['model_type']} needs") from None
    except ValueError as e:
        raise LoadError(f"{folder}: {e}") from None
    load_weights(model, folder, dtype, family.BASE_PREFIX, cfg.get("initializer_range", 0.02), quant,
                 ignore_mismatched_sizes)
    model.config, model.name_or_path = cfg, str(name_or_path)
    tokenizer = Tokenizer.from_folder(folder, cfg)
    if getattr(model, "pad_token_id", 0) in (None, -1):  # a decoder classifier finds each row's end by its pad token
        # a config naming none (GPT-2's; -1 in LLaMA-1-era conversions) takes the one the tokenizer pads with, and
        # is saved with it
        model.pad_token_id = cfg["pad_token_id"] = tokenizer.pad_token_id
    elif task == "seq-cls" and cfg["model_type"] in DECODERS and model.pad_token_id != tokenizer.pad_token_id:
        raise LoadError(f"{folder}: config.json's pad_token_id {model.pad_token_id} is not the tokenizer's pad token "
                        f"{tokenizer.pad_token_id}; a classifier would take padding for text: make them one (edit "
                        "pad_token_id in config.json or the pad token in tokenizer_config.json)")
    return model.eval(), tokenizer


ARCHITECTURE_PREFIX = {"bert": "Bert", "distilbert": "DistilBert", "gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2"}


def architecture(model_type, model):
    """transformers' class name for `model` (config.json's architectures), from its task."""
    if hasattr(model, "lm_head"):
        return "GPT2LMHeadModel" if model_type == "gpt2" else ARCHITECTURE_PREFIX[model_type] + "ForCausalLM"
    task = "ForSequenceClassification" if hasattr(model, "classifier") or hasattr(model, "score") else "Model"
    return ARCHITECTURE_PREFIX[model_type] + task


def save_model(model, folder, tokenizer=None, labels=None):
    """Write `model` as a Hugging Face checkpoint (config.json, model.safetensors with HF names, and
    the tokenizer's files when given): load_model and transformers' from_pretrained both read it.
    labels: a classifier's label names in head order, for config.json's id2label (without them the
    checkpoint's names stay when they fit the head, else LABEL_i as transformers names them).

    A LoRA model must be merged first (lora.merge_and_unload) and a quantized one dequantized
    (quant.dequantize_model): the file holds plain full-precision weights only.
    """
    from safetensors.torch import save_file

    wrapped = [name for name, m in model.named_modules() if hasattr(m, "lora_A") or hasattr(m, "dequantized_weight")]
    if wrapped:
        raise ValueError(f"{wrapped[0]} is a LoRA or quantized layer; merge_and_unload / dequantize_model the "
                         "model before saving it as a plain checkpoint")
    tied = getattr(model, "tie_word_embeddings", False)
    state = {name: p.detach().contiguous() for name, p in model.named_parameters()
             if not (tied and name == "lm_head.weight")}  # a tied head is the embedding, stored once
    config = dict(model.config)
    head = getattr(model, "classifier", None) or getattr(model, "score", None)
    if labels is not None and (head is None or len(labels) != head.out_features):
        raise ValueError(f"{len(labels)} label names for a model with {head.out_features if head else 'no'} outputs")
    if head is not None and (labels is not None or len(config.get("id2label") or {}) != head.out_features):
        # sequence classification: transformers sizes the head from id2label
        names = labels or [f"LABEL_{i}" for i in range(head.out_features)]
        config["id2label"] = {str(i): name for i, name in enumerate(names)}
        config["label2id"] = {name: i for i, name in enumerate(names)}
    config["architectures"] = [architecture(config["model_type"], model)]
    config["dtype"] = str(next(p.dtype for p in model.parameters() if p.is_floating_point())).removeprefix("torch.")
    config.pop("torch_dtype", None)  # transformers 4's name for it
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_json(folder / "config.json", config)
    if tokenizer is not None:
        tokenizer.save(folder)
