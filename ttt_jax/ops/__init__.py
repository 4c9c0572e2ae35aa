"""Sequence-mixing ops: the TTT inner loop.

`inner_loop(kind, impl, ...)` dispatches between the inner models
(TTT-Linear, TTT-MLP) and their implementations (XLA scan, Pallas TPU and
GPU kernels).
"""

from ttt_jax.ops.dispatch import inner_loop
from ttt_jax.ops.ttt import ttt_linear, ttt_mlp

__all__ = ["inner_loop", "ttt_linear", "ttt_mlp"]
