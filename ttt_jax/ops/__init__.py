"""Sequence-mixing ops: the TTT inner loop."""

from ttt_jax.ops.ttt import ttt_linear, ttt_mlp

__all__ = ["ttt_linear", "ttt_mlp"]
