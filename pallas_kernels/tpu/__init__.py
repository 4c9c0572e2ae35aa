"""Pallas TPU (Mosaic) kernels for the TTT inner loop."""

from pallas_kernels.tpu.ttt_linear import ttt_linear_pallas

__all__ = ["ttt_linear_pallas"]
