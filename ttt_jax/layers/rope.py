"""3D rotary position embeddings over (frame, row, column).

The head dimension is split into three bands that rotate with the token's t,
h and w coordinate respectively; CogVideoX uses 16/24/24 of 64 dims, i.e.
d/4 for time and 3d/8 each for the two spatial axes. Inside each band,
adjacent channel pairs (x_{2i}, x_{2i+1}) rotate by angle pos * theta^(-2i/n)
with n the band width.

Positions need not be integers: CogVideoX fits the token grid of any
resolution into the grid it was pre-trained on (`crop_region_grid`), which
gives fractional h and w positions away from the native resolution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def band_dims(head_dim: int) -> tuple[int, int, int]:
  """Channels given to (t, h, w): d/4, 3d/8, 3d/8 (all even)."""
  if head_dim % 16:
    raise ValueError(f"3D RoPE needs head_dim divisible by 16 (d/4 + 3d/8 + 3d/8 "
                     f"with even bands), got {head_dim}")
  return head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8


def rope_angles(positions: Array, head_dim: int, theta: float = 10000.0) -> Array:
  """positions [L, 3] -> rotation angles [L, head_dim // 2]."""
  angles = []
  for axis, n in enumerate(band_dims(head_dim)):
    inv_freq = theta ** (-jnp.arange(0, n, 2, dtype=jnp.float32) / n)  # [n/2]
    angles.append(positions[:, axis, None].astype(jnp.float32) * inv_freq)
  return jnp.concatenate(angles, axis=-1)


def apply_rope(x: Array, angles: Array) -> Array:
  """Rotate channel pairs of x [B, L, H, d] by angles [L, d/2]."""
  cos = jnp.cos(angles)[None, :, None, :]  # [1, L, 1, d/2]
  sin = jnp.sin(angles)[None, :, None, :]
  x_pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


def crop_region_grid(grid: tuple[int, int], base: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """RoPE (h, w) positions of a (gh, gw) token grid, as the CogVideoX pipeline makes them.

  The pre-training grid `base` (bh, bw) = (sample_height, sample_width) /
  patch is resized to the aspect ratio of `grid` (keeping the side that
  fits), centred, and the crop region [top, bottom) x [left, right) is
  sampled at gh x gw points: diffusers' `get_resize_crop_region_for_grid`
  followed by the "linspace" grid of `get_3d_rotary_pos_embed`, whose end
  point is bottom * (gh - 1) / gh. At the native resolution (grid == base)
  this is exactly 0, 1, ..., gh - 1. Rounding is Python's round (half to
  even), as there.

  Returns:
    h positions [gh] and w positions [gw], float32.
  """
  (gh, gw), (bh, bw) = grid, base
  if gh / gw > bh / bw:
    rh, rw = bh, int(round(bh / gh * gw))
  else:
    rh, rw = int(round(bw / gw * gh)), bw
  top, left = int(round((bh - rh) / 2.0)), int(round((bw - rw) / 2.0))
  h = np.linspace(top, (top + rh) * (gh - 1) / gh, gh, dtype=np.float32)
  w = np.linspace(left, (left + rw) * (gw - 1) / gw, gw, dtype=np.float32)
  return h, w
