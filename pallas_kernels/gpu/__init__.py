"""Pallas GPU (Triton) kernels for the TTT inner loop."""

from pallas_kernels.gpu.ttt import ttt_linear_pallas_gpu, ttt_mlp_pallas_gpu

__all__ = ["ttt_linear_pallas_gpu", "ttt_mlp_pallas_gpu"]
