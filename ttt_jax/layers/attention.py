"""Local (per-segment) self-attention of the video DiT.

Each 3-second segment attends over [its caption; its frames (+ the boundary
frame it shares with the previous segment)] with RoPE positions local to
that window, exactly the clip CogVideoX was pre-trained on: on each window
this computes what CogVideoX's attention computes on that window's tokens
alone (time from 0 in the window, h and w from CogVideoX's crop-region grid
for the model's pre-training size, captions not rotated); TTT carries
information between segments. Windows are gathered with a static index plan
(`VideoLayout.attention_windows`) and batched, so the cost is S windows of
Lw tokens and no full-sequence mask is ever built. A token in two windows
(the boundary frame) gets the mean of its two outputs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.layout import VideoLayout
from ttt_jax.layers.rope import apply_rope, crop_region_grid, rope_angles

Array = jax.Array


def attention(q: Array, k: Array, v: Array, mask: Array | None = None) -> Array:
  """Softmax attention, q/k/v [B, T, H, d] -> [B, T, H, d].

  The one attention function of the model: `jax.nn.dot_product_attention`
  picks a fused implementation (cuDNN flash attention on GPU) where it can.
  """
  return jax.nn.dot_product_attention(q, k, v, mask=mask)


def window_rope_angles(layout: VideoLayout, head_dim: int, rope_theta: float = 10000.0,
                       rope_base_grid: tuple[int, int] | None = None) -> Array:
  """RoPE angles [S*Lw, d/2] of every window slot; zero (no rotation) on captions and padding.

  Time is local to the window; h and w are `crop_region_grid` positions of
  the layout's token grid in `rope_base_grid` (None: the layout's own grid,
  i.e. integer positions).
  """
  win = layout.attention_windows
  grid = (layout.height, layout.width)
  h_pos, w_pos = crop_region_grid(grid, rope_base_grid or grid)
  t, h, w = (win.positions[..., i].reshape(-1) for i in range(3))
  positions = np.stack([t.astype(np.float32), h_pos[h], w_pos[w]], axis=-1)  # [S*Lw, 3]
  rotated = (layout.is_video[win.index] & win.valid).reshape(-1, 1)
  return rope_angles(jnp.asarray(positions), head_dim, rope_theta) * jnp.asarray(rotated)


def local_attention(q: Array, k: Array, v: Array, layout: VideoLayout,
                    rope_theta: float = 10000.0,
                    rope_base_grid: tuple[int, int] | None = None) -> Array:
  """q, k, v [B, L, H, d] in canonical order -> [B, L, H, d]."""
  B, L, H, d = q.shape
  win = layout.attention_windows
  S, Lw = win.index.shape
  flat_index = win.index.reshape(-1)  # [S*Lw]
  angles = window_rope_angles(layout, d, rope_theta, rope_base_grid)  # [S*Lw, d/2]
  gather = lambda t: t[:, flat_index]  # [B, S*Lw, H, d]
  windows = lambda t: t.reshape(B * S, Lw, H, d)
  qw = windows(apply_rope(gather(q), angles))
  kw = windows(apply_rope(gather(k), angles))
  vw = windows(gather(v))
  mask = None
  if not win.valid.all():  # ragged windows: mask the padding keys of each window
    mask = jnp.broadcast_to(jnp.asarray(win.valid)[None], (B, S, Lw)).reshape(B * S, 1, 1, Lw)
  out = attention(qw, kw, vw, mask).reshape(B, S * Lw, H, d)
  out = out * jnp.asarray(win.weight.reshape(-1), out.dtype)[None, :, None, None]
  return jnp.zeros_like(q).at[:, flat_index].add(out)


class LocalSelfAttention(nnx.Module):
  """q/k/v projections with bias, QK LayerNorm per head, local attention, output projection.

  rope_base_grid: the token grid of the resolution the weights were
  pre-trained at (CogVideoX: sample_height / patch x sample_width / patch),
  which sets the RoPE positions at every other resolution; None: the input's
  own grid.
  """

  def __init__(self, width: int, num_heads: int, *, qk_norm_eps: float = 1e-6,
               rope_theta: float = 10000.0, rope_base_grid: tuple[int, int] | None = None,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"attention width {width} is not divisible by num_heads {num_heads}")
    self.num_heads, self.head_dim, self.rope_theta = num_heads, width // num_heads, rope_theta
    self.rope_base_grid = None if rope_base_grid is None else tuple(rope_base_grid)
    linear = lambda: nnx.Linear(width, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.to_q, self.to_k, self.to_v, self.to_out = linear(), linear(), linear(), linear()
    norm = lambda: nnx.LayerNorm(self.head_dim, epsilon=qk_norm_eps, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    self.norm_q, self.norm_k = norm(), norm()

  def __call__(self, x: Array, layout: VideoLayout) -> Array:
    """x [B, L, D] canonical -> [B, L, D]."""
    B, L, D = x.shape
    heads = lambda proj: proj(x).reshape(B, L, self.num_heads, self.head_dim)
    q = self.norm_q(heads(self.to_q))
    k = self.norm_k(heads(self.to_k))
    out = local_attention(q, k, heads(self.to_v), layout, self.rope_theta, self.rope_base_grid)
    return self.to_out(out.reshape(B, L, D))
