"""What fills the DiT block's global sequence slot: TTT, or a baseline the paper compared.

`model.sequence_layer` names it (`make_sequence_layer`):
  "ttt"             TTT-Linear or TTT-MLP (`model.ttt.inner`), the paper's layer;
  "local"           nothing: local attention alone (CogVideoX's own block);
  "sliding_window"  causal softmax attention over the last `window` tokens;
  "full_attention"  causal softmax attention over the whole video (quadratic);
  "mamba2"          Mamba 2 (chunked SSD);
  "gated_deltanet"  Gated DeltaNet (chunked gated delta rule);
  "lact"            large-chunk TTT with SwiGLU fast weights (and Muon updates).
Every one sits in the same place with the same bidirectional, tanh-gated
residuals (`Bidirectional`), text and video gates apart, under the same
parameter scope (blocks/ttt/...: one optimizer group, never CogVideoX's).

A baseline reads the video in the layout's TTT order, like TTT: captions
interleaved with their segments' frames (reversed for the backward pass), so
a causal layer sees each caption just before its frames. Its input is put in
that order first (its short convolutions and 1-D RoPE are order-dependent),
then its per-head core runs with every head's whole sequence on one device
(`heads_parallel`), then its output returns to canonical order. Padding tokens
sit last in both orders: a causal layer never lets them reach a real token,
and LaCT, which reads a chunk out through weights updated on that chunk, gives
them a zero learning rate.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.layout import VideoLayout
from ttt_jax.layers.bidirectional import Bidirectional
from ttt_jax.layers.full_attention import FullAttention
from ttt_jax.layers.gated_deltanet import GatedDeltaNet
from ttt_jax.layers.lact import LaCT
from ttt_jax.layers.mamba2 import Mamba2, mamba2_heads
from ttt_jax.layers.sliding_window import SlidingWindowAttention
from ttt_jax.layers.ttt import BidirectionalTTT
from ttt_jax.parallel.context import heads_parallel

Array = jax.Array


def in_ttt_order(run: Callable[[Array], Array], x: Array, layout: VideoLayout,
                 reverse: bool) -> Array:
  """run(x in TTT order) -> back in canonical order; x, out [B, L, D]."""
  return run(x[:, layout.ttt_order(reverse)])[:, layout.from_ttt_order(reverse)]


class SlidingWindowSlot(SlidingWindowAttention):
  """`SlidingWindowAttention` over the video in TTT order (across segment boundaries)."""

  def __call__(self, x: Array, layout: VideoLayout, *, reverse: bool = False) -> Array:
    return in_ttt_order(lambda h: self.merge(heads_parallel(self.core, self.project(h))),
                        x, layout, reverse)


class FullAttentionSlot(FullAttention):
  """`FullAttention` (causal) over the whole video in TTT order."""

  def __call__(self, x: Array, layout: VideoLayout, *, reverse: bool = False) -> Array:
    return in_ttt_order(lambda h: self.merge(heads_parallel(self.core, self.project(h))),
                        x, layout, reverse)


class Mamba2Slot(Mamba2):
  """`Mamba2` over the video in TTT order; B and C are given to every head of their group,
  so each head's SSM runs on its own device."""

  def __call__(self, x: Array, layout: VideoLayout, *, reverse: bool = False) -> Array:
    per_group = self.num_heads // self.num_groups

    def run(h: Array) -> Array:
      (xs, dt, A, B, C, D), z = self.project(h)
      heads = lambda t: jnp.repeat(t, per_group, axis=2)  # [B, L, G, N] -> [B, L, H, N]
      core = lambda xs, dt, B, C, A, D: mamba2_heads(xs, dt, A, B, C, D,
                                                     chunk_size=self.chunk_size)
      return self.merge(heads_parallel(core, (xs, dt, heads(B), heads(C)), (A, D)), z)

    return in_ttt_order(run, x, layout, reverse)


class GatedDeltaNetSlot(GatedDeltaNet):
  """`GatedDeltaNet` over the video in TTT order."""

  def __call__(self, x: Array, layout: VideoLayout, *, reverse: bool = False) -> Array:
    def run(h: Array) -> Array:
      heads, gate = self.project(h)
      return self.merge(heads_parallel(self.core, heads), gate)

    return in_ttt_order(run, x, layout, reverse)


class LaCTSlot(LaCT):
  """`LaCT` over the video in TTT order; padding tokens get a zero inner learning rate."""

  def __call__(self, x: Array, layout: VideoLayout, *, reverse: bool = False) -> Array:
    real = jnp.asarray(~layout.is_pad[layout.ttt_order(reverse)])[None, :, None, None]

    def run(h: Array) -> Array:
      q, k, v, eta = self.project(h)
      eta = jnp.where(real, eta, 0.0)  # [B, L, H, 3]
      return self.merge(heads_parallel(self.core, (q, k, v, eta), self.fast_weights()))

    return in_ttt_order(run, x, layout, reverse)


BASELINES: dict[str, type[nnx.Module]] = {
    "sliding_window": SlidingWindowSlot,
    "full_attention": FullAttentionSlot,
    "mamba2": Mamba2Slot,
    "gated_deltanet": GatedDeltaNetSlot,
    "lact": LaCTSlot,
}
SEQUENCE_LAYERS = ("ttt", "local", *BASELINES)


def make_sequence_layer(name: str, width: int, num_heads: int, options: Mapping[str, Any], *,
                        dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.Module | None:
  """The slot `name` (None for "local"), built with its family's `options`
  (model.ttt for "ttt", model.baselines.<name> for a baseline)."""
  if name not in SEQUENCE_LAYERS:
    raise ValueError(f"model.sequence_layer={name!r} is unknown; choose from {SEQUENCE_LAYERS}")
  if name == "local":
    return None
  kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  if name == "ttt":
    return BidirectionalTTT(width, num_heads, **options, **kw)
  return Bidirectional(width, name, BASELINES[name](width, num_heads, **options, **kw))
