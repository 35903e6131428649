"""Running quantized weights: the W4A16 layer, its layouts, the Triton kernels and their references.

Triton is imported only when a CUDA fp16/bf16 tensor meets a kernel; everything here runs on CPU
through the PyTorch references.
"""
from .layout import pack_kernel, unpack_checkpoint, unpack_kernel
from .linear import QuantLinear, triton_available

__all__ = ["QuantLinear", "pack_kernel", "triton_available", "unpack_checkpoint", "unpack_kernel"]
