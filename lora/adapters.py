"""Putting LoRA adapters into a model, switching between them, and saving them in peft's file format.

apply_lora(model, LoraConfig(...)) replaces every target linear layer by a LoRALinear that wraps it
(lora/layer.py holds the math) and freezes everything except the adapter and the modules to save
(the classification head, which a new task needs to train). Targets are matched by name as peft
does: a list entry matches a module whose name equals it or ends with "." + it; a string is a regex
that must match the whole name, except "all-linear": every linear layer but the output layer (the LM
head, or a classifier's final layer), as peft's shorthand. exclude_modules (names or a regex) and
layers_to_transform (layer indices, found after layers_pattern) narrow the choice, also as in peft.

Several adapters live in one model under their names; one is active at a time. Files:
    adapter_config.json          peft's LoraConfig fields (peft_type "LORA")
    adapter_model.safetensors    base_model.model.<path>.lora_A.weight, ...lora_B.weight,
                                 ...lora_magnitude_vector (DoRA), base_model.model.<head>.weight
so `peft.PeftModel.from_pretrained(transformers_model, folder)` loads what we save and the reverse.
A peft file with an option that changes the adapter's tensors or math beyond this (rank_pattern,
lora_bias, an initialisation that rewrites the base weights such as PiSSA, ...) is refused by name.
"""
import copy
import json
import re
import warnings
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from models.loading import open_safetensors, read_json, write_json

from .layer import LoRALinear, is_linear_base

DEFAULT_TARGETS = {  # peft's defaults, and DistilBERT's (peft has none)
    "distilbert": ["q_lin", "v_lin"],
    "bert": ["query", "value"],
    "gpt2": ["c_attn"],
    "llama": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}
PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"  # peft's file with safe_serialization=False


class AdapterError(ValueError):
    """An adapter config or file that does not fit the model; the message names the problem."""


@dataclass
class LoraConfig:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list | str | None = None  # None: the architecture's default (DEFAULT_TARGETS); or "all-linear"
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"  # or "gaussian"
    modules_to_save: list | None = None  # modules trained in full; a seq-cls model adds its head (None: and BERT's pooler)
    exclude_modules: list | str | None = None  # layers that match target_modules but get no adapter
    layers_to_transform: int | list | None = None  # only these layer indices (with a list of targets)
    layers_pattern: str | list | None = None  # the name before the layer index ("layers", "h"); None: any
    extra: dict = field(default_factory=dict, repr=False)  # fields of a loaded peft config we carry along

    def __post_init__(self):
        for name in ("target_modules", "exclude_modules", "modules_to_save"):  # peft's configs hold sets too
            if isinstance(getattr(self, name), (set, frozenset, tuple)):
                setattr(self, name, sorted(getattr(self, name)))
        if not isinstance(self.r, int) or self.r <= 0:
            raise AdapterError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        for name in ("alpha", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise AdapterError(f"LoRA {name} must be a number, got {value!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        layers = self.layers_to_transform
        if not (layers is None or type(layers) is int
                or (isinstance(layers, list) and all(type(i) is int for i in layers))):
            raise AdapterError(f"layers_to_transform must be a layer index or a list of them, got {layers!r}")
        if isinstance(self.target_modules, str) and (layers is not None or self.layers_pattern is not None):
            raise AdapterError("layers_to_transform / layers_pattern need target_modules as a list of names; a "
                               f"regex or 'all-linear' ({self.target_modules!r}) picks the layers itself (as peft)")
        if self.layers_pattern is not None and layers is None:
            raise AdapterError("layers_pattern needs layers_to_transform: it names where the layer indices are (as "
                               "peft requires)")
        if self.init not in ("kaiming", "gaussian"):
            raise AdapterError(f"LoRA init must be 'kaiming' or 'gaussian', got {self.init!r}")


def is_linear(module):
    return isinstance(module, LoRALinear) or is_linear_base(module)


class ModulesToSave(nn.Module):
    """A module trained per adapter (a task head): a trainable copy of the original for each adapter."""

    def __init__(self, original_module):
        super().__init__()
        self.original_module = original_module.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter, self.disabled = None, False

    def add(self, name):
        self.modules_to_save[name] = copy.deepcopy(self.original_module).requires_grad_(True)

    def set_adapter(self, name):
        self.active_adapter = name if name in self.modules_to_save else None
        for key, module in self.modules_to_save.items():
            module.requires_grad_(key == name)

    @property
    def active_module(self):
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name):
        """Attributes the wrapper lacks come from the active module, as in peft: models read
        `position_embeddings.weight` directly, and then read the trained copy's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.active_module, name)


def model_type(model):
    return getattr(model, "config", {}).get("model_type", "unknown")


def lora_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def heads(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ModulesToSave)]


def outside_wrappers(model):
    """(name, module) of every module that is not inside a LoRALinear or ModulesToSave."""
    wrappers = [name + "." for name, m in model.named_modules() if isinstance(m, (LoRALinear, ModulesToSave))]
    return [(name, m) for name, m in model.named_modules() if name and not any(name.startswith(w) for w in wrappers)]


def short_names(names):
    """The last dotted part of each name, sorted and once each: what error messages list as the choices."""
    return sorted({name.rsplit(".", 1)[-1] for name in names})


def linear_layer_names(model):
    """Names of the linear layers LoRA can target, not counting those inside adapters."""
    return [name for name, m in outside_wrappers(model) if is_linear(m)]


def matches(name, targets):
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def all_linear(model):
    """Names of every linear layer except the output layer, which peft's "all-linear" leaves out: the LM
    head, or else a seq-cls model's final layer (peft looks for `score`, then `classifier`)."""
    output = next((getattr(model, n) for n in ("lm_head", "score", "classifier") if hasattr(model, n)), None)
    return [name for name in linear_layer_names(model) if model.get_submodule(name) is not output]


def layer_index(name, layers_pattern):
    """The index of the layer `name` lies in (the first numbered segment, as peft finds it), or None."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    regexes = [rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in patterns] if patterns else [r".*?\.[^.]*\.(?P<idx>\d+)\."]
    found = next((m for m in (re.match(r, name) for r in regexes) if m), None)
    return int(found["idx"]) if found else None


def targeted(name, targets, config):
    """peft's rule: never an excluded module; a regex or an exact name as given; a suffix match only
    in the layers of layers_to_transform, when that is set."""
    if (config.exclude_modules and matches(name, config.exclude_modules)) or not matches(name, targets):
        return False
    if isinstance(targets, str) or name in targets or config.layers_to_transform in (None, []):
        return True
    layers = config.layers_to_transform
    return layer_index(name, config.layers_pattern) in ([layers] if isinstance(layers, int) else layers)


CLASSIFIER_HEADS = ("classifier", "score")  # what peft adds to every seq-cls model's modules_to_save


def is_classifier(model):
    return type(model).__name__.endswith("ForSequenceClassification")


def default_heads(model):
    """The modules a seq-cls model trains in full: its head, and BERT's pooler.

    BERT classifies tanh(W_p h_[CLS]); sentence encoders such as all-MiniLM-L6-v2 were trained with
    mean pooling, so that pooler path starts untrained and LoRA on query/value alone barely moves it
    (README: 0.582 test accuracy with the classifier alone at lr 1e-3, 0.760 with the defaults, pooler trained).
    """
    if not is_classifier(model):
        return []
    return [n.rsplit(".", 1)[-1] for n in model.new_head_names]


def head_names(model, names):
    """Modules whose name ends with one of `names` (peft's plain-suffix rule, so "classifier" also
    selects DistilBERT's "pre_classifier"; following it keeps peft's files and ours alike)."""
    return [n for n, _ in outside_wrappers(model) if any(n.endswith(t) for t in names)]


def wrap_heads(model, names, adapter_name):
    """Give `adapter_name` a trainable copy of every module selected by head_names(model, names)."""
    chosen = head_names(model, names)
    for name in chosen:
        head = model.get_submodule(name)
        if not isinstance(head, ModulesToSave):
            head = ModulesToSave(head)
            model.set_submodule(name, head)
        head.add(adapter_name)
    return chosen


def apply_lora(model, config=None, adapter_name="default"):
    """Add a LoRA adapter named `adapter_name` to `model` (in place) and return the model.

    The first adapter becomes active and only it (and its modules to save) stays trainable; later
    adapters are added inactive, as in peft; switch with set_adapter.
    """
    config = config or LoraConfig()
    if hasattr(model, "prompt_embeddings"):  # peft: "Cannot combine adapters with different peft types"
        raise AdapterError("this model holds prompt-tuning adapters; LoRA and prompt tuning do not combine in one model "
                           "(as in peft): add LoRA to the base model instead")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:  # checked before any change
        raise AdapterError(f"an adapter name must be a non-empty string without '.', got {adapter_name!r}")
    registry = getattr(model, "peft_config", {})
    if adapter_name in registry:
        raise AdapterError(f"the model already has an adapter named {adapter_name!r}")
    if config.target_modules is not None and not config.target_modules:
        raise AdapterError("target_modules is empty; name the layers to adapt (or pass None for the defaults)")
    targets = config.target_modules or DEFAULT_TARGETS.get(model_type(model))
    if isinstance(targets, str) and targets.lower() == "all-linear":
        targets = all_linear(model)  # saved as the full names, as peft saves them
    if not targets:
        raise AdapterError(f"no default target modules for model type {model_type(model)!r}; pass target_modules")
    save = default_heads(model) if config.modules_to_save is None else config.modules_to_save
    if is_classifier(model):  # as peft's PeftModelForSequenceClassification: the head always trains
        save = list(dict.fromkeys([*save, *(h for h in CLASSIFIER_HEADS if head_names(model, [h]))]))
    trained_in_full = [h + "." for h in head_names(model, save)] if save else []
    available = linear_layer_names(model)
    # a layer inside a module that is trained in full gets no adapter (as in peft)
    chosen = [name for name in available if targeted(name, targets, config)
              and not any((name + ".").startswith(h) for h in trained_in_full)]
    if not chosen and any(matches(name, targets) for name in available):
        reasons = [f"inside modules trained in full (modules_to_save {list(save)!r})" if save else "",
                   f"excluded (exclude_modules {config.exclude_modules!r})" if config.exclude_modules else "",
                   f"outside layers_to_transform {config.layers_to_transform!r}"
                   if config.layers_to_transform not in (None, []) else ""]
        raise AdapterError(f"target modules {targets!r} match only layers that get no adapter: those "
                           + " or ".join(r for r in reasons if r))
    if not chosen:
        raise AdapterError(f"target modules {targets!r} match no linear layer of this {model_type(model)} model; "
                           f"its linear layers are named: {', '.join(short_names(available))}")
    other = next(((name, m) for name, m in outside_wrappers(model)
                  if not is_linear(m) and targeted(name, targets, config)
                  and not any((name + ".").startswith(h) for h in trained_in_full)), None)
    if other:  # peft refuses it too (or adapts an embedding, which this project does not)
        raise AdapterError(f"target modules {targets!r} match {other[0]} ({type(other[1]).__name__}), which is not a "
                           "linear layer: LoRA here adapts nn.Linear and GPT-2's Conv1D only")
    for name in head_names(model, save):
        inner = next((type(m).__name__ for m in model.get_submodule(name).modules()
                      if isinstance(m, LoRALinear) or hasattr(m, "dequantized_weight")), None)
        if inner:  # peft: "modules_to_save cannot be applied to modules of type ..."
            raise AdapterError(f"modules_to_save selects {name}, which holds a {inner}; a layer with LoRA or a "
                               "quantized layer cannot also be trained in full")
    if not registry:
        model.requires_grad_(False)
    for name in chosen:
        layer = model.get_submodule(name)
        if not isinstance(layer, LoRALinear):
            layer = LoRALinear(layer)
            model.set_submodule(name, layer)
        layer.add_adapter(adapter_name, config.r, config.alpha, config.dropout, config.use_rslora,
                          config.use_dora, config.init)
    wrap_heads(model, save, adapter_name)
    config = copy.deepcopy(config)
    config.target_modules, config.modules_to_save = targets, list(save)
    model.peft_config = {**registry, adapter_name: config}
    set_adapter(model, getattr(model, "active_adapter", None) or adapter_name)
    return model


def _check_adapter(model, name):
    names = list(getattr(model, "peft_config", {}))
    if not names:
        raise AdapterError("the model has no adapter (add one with apply_lora or load_adapter)")
    if name not in names:
        raise AdapterError(f"no adapter named {name!r}; the model has {names}")


def set_adapter(model, name):
    """Make `name` the active (and only trainable) adapter. A merged model is unmerged first, with a
    warning, as peft does (adding an adapter sets one too)."""
    if hasattr(model, "prompt_embeddings"):  # a PromptTuningModel switches its own prompts
        return model.set_adapter(name)
    _check_adapter(model, name)
    merged = [layer for _, layer in lora_layers(model) if layer.merged]
    if merged:
        warnings.warn("an adapter cannot be set while the model is merged; unmerging it first", stacklevel=2)
        for layer in merged:
            layer.unmerge()
    for _, layer in lora_layers(model):
        layer.set_adapter([name] if name in layer.lora_A else [])
    for _, head in heads(model):
        head.set_adapter(name)
    model.active_adapter = name


@contextmanager
def disable_adapters(model):
    """Within the block the model is the base model: no adapter or soft prompt, original heads."""
    if hasattr(model, "prompt_embeddings"):  # a PromptTuningModel switches itself off (as save_adapter saves)
        with model.disable_adapters():
            yield model
        return
    with ExitStack() as stack:
        for _, layer in lora_layers(model):
            stack.enter_context(layer.disable_adapters())
        for _, head in heads(model):
            head.disabled = True
            stack.callback(setattr, head, "disabled", False)
        yield model


def delete_adapter(model, name):
    if hasattr(model, "prompt_embeddings"):
        return model.delete_adapter(name)
    _check_adapter(model, name)
    for _, layer in lora_layers(model):
        if name in layer.lora_A:
            layer.delete_adapter(name)
    for _, head in heads(model):
        if name in head.modules_to_save:
            del head.modules_to_save[name]
            head.set_adapter(head.active_adapter if head.active_adapter != name else None)
    del model.peft_config[name]
    if model.active_adapter == name:  # peft activates the first remaining adapter in name order
        model.active_adapter = min(model.peft_config, default=None)
        if model.active_adapter:
            set_adapter(model, model.active_adapter)


@contextmanager
def restored_on_error(model):
    """An exception inside the block leaves `model` as it was: the adapters registered, the wrappers
    added and the trainable flags changed within the block are undone before it propagates."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    wrapped = {name for name, m in model.named_modules() if isinstance(m, (LoRALinear, ModulesToSave))}
    had_registry, registry = hasattr(model, "peft_config"), list(getattr(model, "peft_config", {}))
    active = getattr(model, "active_adapter", None)
    try:
        yield model
    except BaseException:
        prompt_model = hasattr(model, "prompt_embeddings")  # a PromptTuningModel manages its own prompts
        for name in [n for n in getattr(model, "peft_config", {}) if n not in registry]:
            if prompt_model:
                model.delete_adapter(name)
            else:
                delete_adapter(model, name)
        for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, ModulesToSave))
                        and n not in wrapped]:
            model.set_submodule(name, m.base_layer if isinstance(m, LoRALinear) else m.original_module)
        if not had_registry:
            for attribute in ("peft_config", "active_adapter"):
                model.__dict__.pop(attribute, None)
        elif active is not None and prompt_model:
            model.set_adapter(active)
        elif active is not None:
            set_adapter(model, active)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def warn_if_tied(model):
    """A layer whose weight is tied to another module's (an LM head to the input embedding) merges W + ΔW
    into both: the merged model is then not the unmerged one. peft does the same, and warns too."""
    owners = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    for name, layer in lora_layers(model):
        weight = getattr(layer.base_layer, "weight", None)
        others = [n for n in owners.get(id(weight), []) if not n.startswith(name + ".")]
        if others and layer.active_adapters and not layer.merged:
            warnings.warn(f"{name} shares its weight with {others[0].rsplit('.', 1)[0]} (tied embeddings): merging "
                          "changes both, so the merged model differs from the unmerged one; keep this adapter "
                          "unmerged to change the output layer alone", UserWarning, stacklevel=3)


def merge_adapter(model, safe=True):
    """Fold the active adapter into the base weights (kept wrapped, so unmerge_adapter can undo it)."""
    warn_if_tied(model)
    for _, layer in lora_layers(model):
        layer.merge(safe=safe)


def unmerge_adapter(model):
    for _, layer in lora_layers(model):
        layer.unmerge()


def merge_and_unload(model, adapter_name=None, safe=True):
    """Merge one adapter into the base weights and remove every adapter: a plain model again."""
    if adapter_name is not None:
        set_adapter(model, adapter_name)
    warn_if_tied(model)
    for name, layer in lora_layers(model):
        layer.merge(safe=safe)
        model.set_submodule(name, layer.base_layer)
    for name, head in heads(model):
        model.set_submodule(name, head.modules_to_save[head.active_adapter] if head.active_adapter else head.original_module)
    model.peft_config, model.active_adapter = {}, None
    return model


def trainable_parameters(model):
    """(trainable, total) parameter counts; tied weights count once, a quantized weight as in x out."""
    params = {id(p): p for p in model.parameters()}.values()
    quantized = sum(m.in_features * m.out_features for m in model.modules()
                    if hasattr(m, "dequantized_weight") and not isinstance(m, LoRALinear))
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized


def print_trainable_parameters(model):
    trainable, total = trainable_parameters(model)
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")


# ---- files in peft's format ------------------------------------------------------------------------

def task_type(model):
    kind = type(model).__name__
    return "SEQ_CLS" if kind.endswith("ForSequenceClassification") else "CAUSAL_LM" if kind.endswith(("LMHeadModel", "ForCausalLM")) else None


def lora_state_to_peft(state, adapter_name, head_names):
    """Our in-memory names -> the names peft writes in adapter_model.safetensors."""
    out = {}
    for key, value in state.items():
        for part in ("lora_A", "lora_B"):
            key = key.replace(f".{part}.{adapter_name}.weight", f".{part}.weight")
        key = key.replace(f".lora_magnitude_vector.{adapter_name}.weight", ".lora_magnitude_vector")
        for head in head_names:
            key = key.replace(f"{head}.modules_to_save.{adapter_name}.", f"{head}.")
        out[PREFIX + key] = value
    return out


def peft_key_to_ours(key, adapter_name, head_names):
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for part in ("lora_A", "lora_B"):
        if key.endswith(f".{part}.weight"):
            return key[: -len(".weight")] + f".{adapter_name}.weight"
    if key.endswith(".lora_magnitude_vector"):
        return key + f".{adapter_name}.weight"
    for head in head_names:
        if key.startswith(head + "."):
            return f"{head}.modules_to_save.{adapter_name}." + key[len(head) + 1:]
    return key


def adapter_state(model, adapter_name):
    """The tensors of one adapter: its LoRA factors, magnitudes and head copies (our names)."""
    keep = (f".lora_A.{adapter_name}.", f".lora_B.{adapter_name}.", f".lora_magnitude_vector.{adapter_name}.",
            f".modules_to_save.{adapter_name}.")
    return {k: v for k, v in model.state_dict().items() if any(part in k for part in keep)}


def save_adapter(model, folder, adapter_name=None):
    """Write adapter_config.json and adapter_model.safetensors (peft's layout) for one adapter."""
    if hasattr(model, "prompt_embeddings"):
        return model.save(folder, adapter_name)
    adapter_name = adapter_name or getattr(model, "active_adapter", None)
    _check_adapter(model, adapter_name)
    config = model.peft_config[adapter_name]
    state = lora_state_to_peft(adapter_state(model, adapter_name), adapter_name, [name for name, _ in heads(model)])
    # the config names only the modules whose copies the file holds: peft loads every one it names (an adapter
    # loaded from a file without its head keeps the model's own head)
    saved = {name for name, head in heads(model) if adapter_name in head.modules_to_save}
    held = lambda names: set(head_names(model, names)) <= saved  # noqa: E731 (peft's suffix rule, as head_names)
    modules_to_save = [m for m in config.modules_to_save or [] if held([m])]
    kind = task_type(model)
    if kind == "SEQ_CLS" and not (head_names(model, CLASSIFIER_HEADS) and held(CLASSIFIER_HEADS)):
        kind = None  # peft's SEQ_CLS model would look for its heads' tensors (both of DistilBERT's) in the file
    peft_config = {
        **config.extra, "peft_type": "LORA", "task_type": kind,
        "base_model_name_or_path": getattr(model, "name_or_path", None), "r": config.r,
        "lora_alpha": config.alpha, "lora_dropout": config.dropout, "target_modules": config.target_modules,
        "use_rslora": config.use_rslora, "use_dora": config.use_dora,
        "init_lora_weights": True if config.init == "kaiming" else config.init,
        "modules_to_save": modules_to_save or None, "bias": "none", "inference_mode": True,
        "fan_in_fan_out": model_type(model) == "gpt2", "exclude_modules": config.exclude_modules,
        "layers_to_transform": config.layers_to_transform, "layers_pattern": config.layers_pattern,
    }
    write_adapter_files(folder, peft_config, state)


def write_adapter_files(folder, config, state):
    folder = Path(folder)
    json.dumps(config)  # a config that cannot be written fails before any file is touched
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(folder / WEIGHTS_FILE),
              metadata={"format": "pt"})
    write_json(folder / CONFIG_FILE, config)


def check_adapter_folder(folder):
    """Raise AdapterError unless `folder` holds peft's two adapter files."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        inside, model = folder / "adapter", folder / "model"  # where train.py's run folder holds what it trained
        hint = (f"; it holds {PICKLED_WEIGHTS_FILE}, a pickle, which is not loaded for safety: save the adapter with "
                "safe_serialization=True" if (folder / PICKLED_WEIGHTS_FILE).is_file() else
                f"; did you mean {inside}?" if (inside / CONFIG_FILE).is_file() else
                f"; {model} is a fine-tuned model (--method none): pass it as the model" if (model / "config.json").is_file()
                else "")
        raise AdapterError(f"{folder} is not an adapter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}{hint}")


def read_adapter_files(folder):
    folder = Path(folder)
    check_adapter_folder(folder)
    with open_safetensors(folder / WEIGHTS_FILE, AdapterError) as f:
        return read_json(folder / CONFIG_FILE, AdapterError), {key: f.get_tensor(key) for key in f.keys()}


# peft options that change which tensors an adapter has or what its layers compute: refused, not ignored
UNSUPPORTED = ("rank_pattern", "alpha_pattern", "lora_bias", "target_parameters", "trainable_token_indices",
               "layer_replication", "use_qalora", "alora_invocation_tokens", "arrow_config", "use_bdlora",
               "monteclora_config", "kasa_config", "megatron_config", "velora_config",
               "ensure_weight_tying")
# initialisations that also rewrite the base weights, so the adapter only fits the rewritten base
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
FROZEN_B_INITS = ("mica",)  # lora_B stays frozen in training: a different adapter to train


def config_from_peft(peft):
    for key in UNSUPPORTED:
        if peft.get(key):
            raise AdapterError(f"adapter_config.json uses {key}, which this project does not support")
    if peft.get("bias", "none") != "none":
        raise AdapterError(f"adapter_config.json trains biases (bias={peft['bias']!r}); only 'none' is supported")
    init = peft.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        raise AdapterError(f"adapter_config.json has init_lora_weights={init!r}, which also changes the base "
                           "weights; convert it to a plain LoRA adapter with peft first (save_pretrained(..., "
                           "path_initial_model_for_weight_conversion=...))")
    if isinstance(init, str) and init.lower() in FROZEN_B_INITS:
        raise AdapterError(f"adapter_config.json has init_lora_weights={init!r}, which trains lora_A only (lora_B "
                           "frozen); this project trains both, so it does not load it")
    fields = {"r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "target_modules",
              "use_rslora": "use_rslora", "use_dora": "use_dora", "exclude_modules": "exclude_modules",
              "layers_to_transform": "layers_to_transform", "layers_pattern": "layers_pattern"}
    ignored = {"modules_to_save", "init_lora_weights", "peft_type", "task_type", "base_model_name_or_path", "bias",
               "inference_mode", "fan_in_fan_out"}  # read above, or set from the model when saving
    given = {"r": 8, "lora_alpha": 8} | {k: v for k, v in peft.items() if v is not None}  # peft's defaults
    return LoraConfig(**{ours: given[key] for key, ours in fields.items() if key in given},
                      init="gaussian" if init == "gaussian" else "kaiming",
                      modules_to_save=peft.get("modules_to_save") or [],
                      extra={k: v for k, v in peft.items()
                             if k not in fields and k not in ignored and v not in (None, {}, [])})


def load_state_strict(model, state, folder, allowed):
    """Copy `state` (our names) into the model's `allowed` tensors, naming the first unknown or misshaped one."""
    ours = model.state_dict()
    for key, value in state.items():
        if key not in allowed:
            raise AdapterError(f"{folder}: tensor {key} has no place in this model (wrong base model or targets?)")
        if value.shape != ours[key].shape:
            raise AdapterError(f"{folder}: tensor {key} has shape {tuple(value.shape)}, "
                               f"the model expects {tuple(ours[key].shape)}")
    with torch.no_grad():
        for key, value in state.items():
            ours[key].copy_(value)


def load_adapter(model, folder, adapter_name="default"):
    """Load an adapter saved by peft or by save_adapter, under `adapter_name`; returns the model.

    LoRA adapters are added in place (the first one becomes active); a prompt-tuning adapter
    returns a new PromptTuningModel wrapping `model`.
    """
    peft, tensors = read_adapter_files(folder)
    kind = peft.get("peft_type")
    if kind == "PROMPT_TUNING":
        from .prompt_tuning import load_prompt_adapter

        return load_prompt_adapter(model, peft, tensors, folder, adapter_name)
    if kind != "LORA":
        raise AdapterError(f"{folder}: peft_type {kind!r} is not supported (LORA or PROMPT_TUNING)")
    config = config_from_peft(peft)
    with restored_on_error(model):
        apply_lora(model, config, adapter_name)
        head_names = [name for name, _ in heads(model)]
        state = {peft_key_to_ours(k, adapter_name, head_names): v for k, v in tensors.items()}
        expected = set(adapter_state(model, adapter_name))
        missing = sorted(k for k in expected - set(state) if ".modules_to_save." not in k)
        if missing:
            raise AdapterError(f"{folder}: adapter lacks {len(missing)} tensor(s) its config needs, e.g. {missing[0]}")
        # With lm_head or an embedding among the targets, peft also saves that layer's base weight
        # (save_embedding_layers="auto", for resized vocabularies) and loads it back: so do we.
        base_copies = {k for k in model.state_dict() if k.endswith(".base_layer.weight") and k in state}
        load_state_strict(model, state, folder, expected | base_copies)
        # a head the file does not hold stays the model's own: a classifier's is always wrapped (as in peft),
        # and another tool's file may lack it
        for name, head in heads(model):
            prefix = f"{name}.modules_to_save.{adapter_name}."
            if adapter_name in head.modules_to_save and not any(k.startswith(prefix) for k in state):
                del head.modules_to_save[adapter_name]
                head.set_adapter(head.active_adapter if head.active_adapter != adapter_name else None)
                if not head.modules_to_save:
                    model.set_submodule(name, head.original_module)
    return model
