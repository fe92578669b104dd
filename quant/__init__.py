"""Quantization: NF4 + double quantization (QLoRA), LLM.int8(), and frozen quantized linear layers."""
from .int8 import int8_linear, int8_matmul, vectorwise_dequantize, vectorwise_quantize
from .linear import Linear4bit, Linear8bit, dequantize_model, model_bytes, quantize_model
from .nf4 import DYNAMIC_CODE, NF4_CODE, NF4State, dequantize_nf4, quantize_nf4

__all__ = [
    "DYNAMIC_CODE", "NF4_CODE", "NF4State", "quantize_nf4", "dequantize_nf4",
    "vectorwise_quantize", "vectorwise_dequantize", "int8_matmul", "int8_linear",
    "Linear4bit", "Linear8bit", "quantize_model", "dequantize_model", "model_bytes",
]
