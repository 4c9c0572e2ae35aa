"""The global sequence slot of a DiT block, run both ways with tanh-gated residuals.

    a1 = a  + tanh(alpha_fwd) * F(a)
    a2 = a1 + tanh(alpha_bwd) * F(a1, reverse)

F is TTT in the paper (`ttt_jax.layers.ttt`), or a baseline in its place
(`ttt_jax.layers.sequence`): any module called as F(x, layout, reverse=...)
on the canonical-order sequence, which reads the video in the layout's TTT
order (or its reverse: flipped frames, captions still before their frames).
The gates are per channel, apart for text and video tokens and for each
direction, and start at tanh(alpha) = GATE_INIT, so a fresh slot adds a small
residual to the pretrained model. Both directions share F's parameters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.layout import VideoLayout
from ttt_jax.parallel.sharding import named_param

Array = jax.Array

GATE_INIT = 0.1  # tanh(alpha) at initialisation


class Bidirectional(nnx.Module):
  """F forwards and backwards over the video with gated residuals.

  family: the attribute F is stored under (its parameters' scope, e.g.
  blocks/ttt/<family>/...); core: the module F.
  """

  def __init__(self, width: int, family: str, core: nnx.Module):
    self.family = family
    setattr(self, family, core)
    alpha = lambda: named_param(jnp.full((width,), math.atanh(GATE_INIT), jnp.float32), "norm")
    self.alpha_fwd_text, self.alpha_fwd_video = alpha(), alpha()
    self.alpha_bwd_text, self.alpha_bwd_video = alpha(), alpha()

  @staticmethod
  def _gate(layout: VideoLayout, alpha_text: nnx.Param, alpha_video: nnx.Param) -> Array:
    is_video = jnp.asarray(layout.is_video)[:, None]  # [L, 1] (padding: the text gate)
    return jnp.where(is_video, jnp.tanh(alpha_video[...]), jnp.tanh(alpha_text[...]))  # [L, D]

  def __call__(self, a: Array, layout: VideoLayout) -> Array:
    """a [B, L, D] (canonical order) -> a2 [B, L, D]."""
    core = getattr(self, self.family)
    gate_fwd = self._gate(layout, self.alpha_fwd_text, self.alpha_fwd_video)
    gate_bwd = self._gate(layout, self.alpha_bwd_text, self.alpha_bwd_video)
    a1 = a + (gate_fwd * core(a, layout)).astype(a.dtype)
    return a1 + (gate_bwd * core(a1, layout, reverse=True)).astype(a.dtype)
