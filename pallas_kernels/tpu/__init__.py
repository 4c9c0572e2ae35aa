"""Pallas TPU (Mosaic) kernels for the TTT inner loop."""

from pallas_kernels.tpu.ttt import ttt_linear_pallas, ttt_mlp_pallas

__all__ = ["ttt_linear_pallas", "ttt_mlp_pallas"]
