"""LoRA, DoRA and prompt tuning on our models, with adapters in peft's file format.

    model, tok = load_model("minilm-l6", task="seq-cls")
    apply_lora(model, LoraConfig(r=8, alpha=16))          # q/v LoRA + the classifier head trainable
    ...train...
    save_adapter(model, "out/")                            # peft.PeftModel.from_pretrained can read it
"""
from .adapters import (DEFAULT_TARGETS, AdapterError, LoraConfig, ModulesToSave, apply_lora, delete_adapter,
                       disable_adapters, load_adapter, merge_adapter, merge_and_unload, print_trainable_parameters,
                       save_adapter, set_adapter, trainable_parameters, unmerge_adapter)
from .layer import LoRALinear
from .prompt_tuning import PromptTuningModel

__all__ = ["LoRALinear", "LoraConfig", "apply_lora", "set_adapter", "disable_adapters", "delete_adapter",
           "merge_adapter", "unmerge_adapter", "merge_and_unload", "save_adapter", "load_adapter",
           "trainable_parameters", "print_trainable_parameters", "PromptTuningModel", "ModulesToSave",
           "AdapterError", "DEFAULT_TARGETS"]
