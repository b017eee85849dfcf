"""Triton kernels for the routed experts: grouped GEMMs (16-bit and FP8) and FP8 quantization.

The functions below have the names and signatures of their twins in `dsv3.kernels.reference`, so
either module can serve as the backend of the autograd functions in `dsv3.kernels.experts`.
Importing this package needs `triton`; on CPU the kernels run only when triton was imported with
TRITON_INTERPRET=1 (see `runtime.py`).
"""
from dsv3.kernels.triton.grouped_gemm import (gate_up_swiglu, grouped_linear, grouped_linear_dgrad,
                                              grouped_linear_wgrad, swiglu_dgrad)
from dsv3.kernels.triton.quant import dequantize, quantize, requantize
from dsv3.kernels.triton.runtime import interpreting

__all__ = ["grouped_linear", "grouped_linear_dgrad", "grouped_linear_wgrad", "gate_up_swiglu", "swiglu_dgrad",
           "quantize", "dequantize", "requantize", "interpreting"]
