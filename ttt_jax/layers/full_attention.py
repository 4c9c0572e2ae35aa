"""Causal full attention over the whole sequence: the cost reference of the sequence slot.

The paper's point of comparison for cost: global softmax attention over the
whole minute is quadratic in the sequence length, which is what TTT (and
the other layers of this slot) avoid. Every token attends to itself and all
tokens before it; the layer is `CausalSelfAttention` (projections with bias,
per-head QK LayerNorm, 1-D RoPE, output projection; shared with
`SlidingWindowAttention`) around `causal_attention`.

`causal_attention` is `jax.nn.dot_product_attention(..., is_causal=True)`:
on GPU it may run cuDNN flash attention (bf16 / fp16), elsewhere XLA's dense
path, which materialises fp32 scores [B, H, L, L]: quadratic memory too, as
the reference it is. It equals `sliding_window_attention` with window >= L.
"""

from __future__ import annotations

from typing import Any

import jax

from ttt_jax.layers.sliding_window import CausalSelfAttention, check_qkv

Array = jax.Array


def causal_attention(q: Array, k: Array, v: Array, *, implementation: str | None = None
                     ) -> Array:
  """Causal softmax attention, q, k, v [B, L, H, d] -> [B, L, H, d] in q's dtype.

  implementation: `jax.nn.dot_product_attention`'s ('xla', 'cudnn' or None:
  the best available). Logits and softmax are fp32 (or wider) on the XLA path.
  """
  check_qkv("causal_attention", q, k, v)
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


class FullAttention(CausalSelfAttention):
  """Causal global attention over [B, L, D]: every token sees every token before it.

  Args (as `CausalSelfAttention`), plus implementation: see `causal_attention`.
  """

  def __init__(self, width: int, num_heads: int, *, implementation: str | None = None,
               **kw: Any):
    self.implementation = implementation
    super().__init__(width, num_heads, **kw)

  def core(self, q: Array, k: Array, v: Array) -> Array:
    """The per-head part: `causal_attention` over the whole sequence, [B, L, H, d]."""
    return causal_attention(q, k, v, implementation=self.implementation)
