"""bitsandbytes 0.50.2 as a reference on any x86 CPU, with its two CPU-specific detours taken out.

On CPUs with AVX512 bitsandbytes' `dequantize_4bit` runs a C++ kernel that walks the weight row by
row and takes the wrong block scale for every block that straddles two rows, i.e. whenever the row
length (in_features) is not a multiple of the blocksize: on a (256, 192) weight with blocksize 128,
43 % of the values come out wrong. The NF4 format itself is a flat stream of blocks (quantize_4bit
ignores rows), and on a flat (numel,) state the same kernel is right, so the reference dequantizes
the flat stream and reshapes it.

On CPUs with AVX512-BF16, `bnb.nn.Linear4bit` in eval mode repacks its weight on the first no-grad
call and from then on computes in bfloat16 (about 0.3 % relative error per layer; it fails outright
for in_features below the blocksize). `fp32_linear4bit` turns that off, so the layer computes
x · dequantize(W)ᵀ + b in its fp32 compute dtype, as the QLoRA paper's method does.
"""
import copy

import bitsandbytes as bnb
import bitsandbytes.functional as bnbF


def bnb_dequantize(packed, quant_state):
    """bitsandbytes' dequantize_4bit of the flat block stream, reshaped to the weight's shape."""
    flat = copy.copy(quant_state)
    flat.shape = (quant_state.shape.numel(),)
    return bnbF.dequantize_4bit(packed, flat).view(quant_state.shape)


def fp32_linear4bit(model):
    """Keep every bnb.nn.Linear4bit of `model` on its fp32 dequantize-then-matmul path; returns model."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model
