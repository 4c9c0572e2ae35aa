"""Causal sliding-window attention: a baseline the paper put in the TTT slot.

One of the sequence layers the paper compares TTT-MLP with in the same place
of the DiT block (run over the arranged sequence, then once more on the
reversed one). Token i attends to itself and the previous `window - 1`
tokens, j in [i - window + 1, i], with ordinary softmax attention:

  o_i = sum_j softmax_j(q_i . k_j / sqrt(d)) v_j

`sliding_window_attention` computes it in query blocks of P tokens (P =
window by default): block n attends to keys of blocks n - 1 and n under a
band mask, which covers every key a query can see as long as P >= window - 1.
Scores are [L / P, P, 2P] per head, O(L * window) memory, never [L, L]; the
softmax is fp32 (or wider). Gradients are JAX autodiff of that blocked form
(its residuals are the same O(L * window) scores).

`CausalSelfAttention` holds what sliding-window and full attention
(`ttt_jax.layers.full_attention`) share: q/k/v/out projections with bias
(as `LocalSelfAttention`), per-head LayerNorm on q and k, and 1-D RoPE over
the sequence position 0..L-1 in the order given (so the reversed run rotates
by reversed positions, as its causal direction is reversed too). Like
`Mamba2` it comes in three parts for head-sharded runs: `project` (per-head
q, k, v), the pure per-head `core`, `merge` (back to [B, L, D]).
"""

from __future__ import annotations

import abc
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.layers.linear import dense, layer_norm
from ttt_jax.layers.mamba2 import check_positive, compute_dtype
from ttt_jax.layers.rope import apply_rope
from ttt_jax.parallel.sharding import constrain

Array = jax.Array

QK_NORM_EPS = 1e-6  # LocalSelfAttention's (CogVideoX's) per-head QK LayerNorm eps


def check_qkv(owner: str, q: Array, k: Array, v: Array) -> None:
  if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"{owner} takes q = k = v [B, L, H, d], got q {q.shape}, k {k.shape}, "
                     f"v {v.shape}")


def sequence_rope_angles(length: int, head_dim: int, theta: float = 10000.0) -> Array:
  """1-D RoPE angles [length, head_dim // 2] for positions 0..length-1.

  Channel pair (2i, 2i+1) turns by pos * theta^(-2i / d), the one-band case of
  `ttt_jax.layers.rope.rope_angles` (whose t/h/w bands are for 3-D grids);
  `apply_rope` rotates with them.
  """
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [d/2]
  return jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq


def band_mask(num_blocks: int, block: int, window: int) -> np.ndarray:
  """Which keys each query block sees: [num_blocks, P, 2P] bool.

  Query r of block n is token i = nP + r; key c of its [previous; own] blocks
  is token j = (n - 1)P + c. It attends when 0 <= i - j < window, i.e.
  0 <= r - c + P < window, and j >= 0 (block 0 has no previous block).
  """
  r, c = np.arange(block)[:, None], np.arange(2 * block)[None, :]
  lag = r - c + block  # i - j
  band = (lag >= 0) & (lag < window)  # [P, 2P]
  exists = (np.arange(num_blocks)[:, None, None] > 0) | (c[None] >= block)  # [nb, 1, 2P]
  return band[None] & exists


def sliding_window_attention(q: Array, k: Array, v: Array, window: int, *,
                             block: int | None = None) -> Array:
  """Causal sliding-window softmax attention, q, k, v [B, L, H, d] -> [B, L, H, d].

  Args:
    window: tokens a query sees, itself included (>= 1); window >= L is full
      causal attention.
    block: query block P (default window), at least window - 1 so that a
      block and the one before it hold every key its queries see; min(P, L)
      is used and a ragged L is zero-padded (padding keys come after every
      real query, so causality already hides them).
  Returns:
    o [B, L, H, d] in q's dtype. Logits, softmax and the weighted sum of v
    accumulate in fp32 (or q's dtype where wider); bf16 operands stay bf16.
  """
  check_qkv("sliding_window_attention", q, k, v)
  check_positive("sliding_window_attention", window=window)
  P = window if block is None else block
  check_positive("sliding_window_attention", block=P)
  if P < window - 1:
    raise ValueError(f"sliding_window_attention block {P} must be >= window - 1 = {window - 1} "
                     f"(a query block and the one before it must hold the whole window)")
  B, L, H, d = q.shape
  P = min(P, L)
  nb = -(-L // P)
  f = compute_dtype(q.dtype)

  def blocks(t: Array) -> Array:
    """[B, L, H, d] -> zero-padded [B, nb, P, H, d]."""
    return jnp.pad(t, ((0, 0), (0, nb * P - L), (0, 0), (0, 0))).reshape(B, nb, P, H, d)

  qb, kb, vb = blocks(q), blocks(k), blocks(v)
  # Each block's keys: [previous block; own block], [B, nb, 2P, H, d] (block 0's previous: zeros).
  before = lambda t: jnp.concatenate([jnp.zeros_like(t[:, :1]), t[:, :-1]], axis=1)
  kb = jnp.concatenate([before(kb), kb], axis=2)
  vb = jnp.concatenate([before(vb), vb], axis=2)

  s = jnp.einsum("bnqhd,bnkhd->bnhqk", qb, kb, preferred_element_type=f) / math.sqrt(d)
  mask = jnp.asarray(band_mask(nb, P, window))[None, :, None]  # [1, nb, 1, P, 2P]
  p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)  # every row sees its own key
  o = jnp.einsum("bnhqk,bnkhd->bnqhd", p.astype(v.dtype), vb, preferred_element_type=f)
  return o.reshape(B, nb * P, H, d)[:, :L].astype(q.dtype)


class CausalSelfAttention(nnx.Module):
  """Projections, per-head QK LayerNorm and 1-D RoPE around a causal per-head `core`.

  Subclasses define `core(q, k, v)` ([B, L, H, d] each -> [B, L, H, d]).

  Args:
    width: model width D (= num_heads * head_dim).
    num_heads: H.
    qk_norm: per-head LayerNorm (affine, shared by the heads) on q and k, as
      `LocalSelfAttention`.
    rope_theta: 1-D RoPE base over positions 0..L-1; None: no RoPE.
    dtype: compute dtype of projections and output; param_dtype: of the parameters.
  """

  def __init__(self, width: int, num_heads: int, *, qk_norm: bool = True,
               qk_norm_eps: float = QK_NORM_EPS, rope_theta: float | None = 10000.0,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    owner = type(self).__name__
    check_positive(owner, width=width, num_heads=num_heads)
    if width % num_heads:
      raise ValueError(f"{owner} width {width} is not divisible by num_heads {num_heads}")
    self.width, self.num_heads, self.head_dim = width, num_heads, width // num_heads
    if rope_theta is not None and self.head_dim % 2:
      raise ValueError(f"{owner} RoPE needs an even head dim, got {self.head_dim} "
                       f"(or pass rope_theta=None)")
    self.rope_theta, self.dtype = rope_theta, dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.to_q, self.to_k, self.to_v = (dense(width, width, ("embed", "heads"), **kw)
                                       for _ in range(3))
    self.to_out = dense(width, width, ("heads", "embed"), **kw)
    norm = lambda: layer_norm(self.head_dim, qk_norm_eps, "kv", **kw) if qk_norm else None
    self.norm_q, self.norm_k = norm(), norm()

  def project(self, x: Array) -> tuple[Array, Array, Array]:
    """x [B, L, D] -> q, k, v [B, L, H, d]: q and k normed and rotated (position = index in L)."""
    B, L, _ = x.shape
    heads = lambda proj: constrain(proj(x).reshape(B, L, self.num_heads, self.head_dim),
                                   "act_batch", "act_length", "act_heads", "act_kv")
    q, k, v = heads(self.to_q), heads(self.to_k), heads(self.to_v)
    if self.norm_q is not None:
      q, k = self.norm_q(q), self.norm_k(k)
    if self.rope_theta is not None:
      angles = sequence_rope_angles(L, self.head_dim, self.rope_theta)
      q, k = apply_rope(q, angles), apply_rope(k, angles)
    return q, k, v

  @abc.abstractmethod
  def core(self, q: Array, k: Array, v: Array) -> Array:
    """The per-head attention, [B, L, H, d] each -> [B, L, H, d]: each subclass's own (nnx
    modules are ABCs, so a class without it cannot be instantiated)."""

  def merge(self, o: Array) -> Array:
    """o [B, L, H, d] -> [B, L, D]: the output projection."""
    B, L, H, d = o.shape
    return self.to_out(o.reshape(B, L, H * d).astype(self.dtype))

  def __call__(self, x: Array) -> Array:
    """x [B, L, D] -> [B, L, D], causal along L."""
    if x.ndim != 3 or x.shape[-1] != self.width:
      raise ValueError(f"{type(self).__name__} takes [B, L, {self.width}], got {x.shape}")
    return self.merge(self.core(*self.project(x)))


class SlidingWindowAttention(CausalSelfAttention):
  """Causal sliding-window attention over [B, L, D]: each token sees the last `window` tokens.

  Args:
    window: tokens each query attends to, itself included.
    block: query block of the core (default window); see `sliding_window_attention`.
    (the rest as `CausalSelfAttention`)
  """

  def __init__(self, width: int, num_heads: int, *, window: int, block: int | None = None,
               **kw: Any):
    check_positive("SlidingWindowAttention", window=window)
    if block is not None and (not isinstance(block, int) or block < max(1, window - 1)):
      raise ValueError(f"SlidingWindowAttention block must be an int >= max(1, window - 1) = "
                       f"{max(1, window - 1)}, got {block!r}")
    self.window, self.block = window, block
    super().__init__(width, num_heads, **kw)

  def core(self, q: Array, k: Array, v: Array) -> Array:
    """The per-head part: `sliding_window_attention` at this layer's window, [B, L, H, d]."""
    return sliding_window_attention(q, k, v, self.window, block=self.block)
