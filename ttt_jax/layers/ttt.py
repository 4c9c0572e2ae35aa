"""The TTT layer and its bidirectional, gated use in a video DiT block.

`TTT` (Sec. 2 of the paper) turns the hidden states of a whole multi-scene
video into per-head TTT problems and solves them with the inner loop of
`ttt_jax.ops`:

  1. arrange tokens in TTT order (captions interleaved with their segments'
     frames; see `ttt_jax.layout`), padded to a multiple of the
     mini-batch size K;
  2. q, k, v = linear projections (with bias), split into heads; q and k are
     L2-normalised per head and rotated by 3D RoPE at their GLOBAL (t, h, w)
     position (text tokens sit at the origin, i.e. are not rotated);
  3. per-token inner learning rate, computed from the ARRANGED inputs so it
     stays with its token: eta_j = base_lr * sigmoid(w_h . x_j + b_h) / (d K);
     padding tokens get eta = 0 and so never touch the fast weights;
  4. the reconstruction target LN_h(v - k), normalised as the public release
     does it (see `reconstruction_target`);
  5. inner loop (TTT-Linear or TTT-MLP fitting that target through the same
     per-head LayerNorm);
  6. post-norm over the model width, output projection, canonical order.

`BidirectionalTTT` runs it forwards and on the reversed sequence with shared
parameters and tanh-gated residuals, separate gates for text and video
tokens and for each direction:

  a1 = a  + tanh(alpha_fwd) * TTT(a)
  a2 = a1 + tanh(alpha_bwd) * Reverse(TTT(Reverse(a1)))
"""

from __future__ import annotations

import math
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.layout import VideoLayout
from ttt_jax.layers.rope import apply_rope, rope_angles
from ttt_jax.ops import inner_loop
from ttt_jax.ops.dispatch import check_kind_impl

Array = jax.Array

DEFAULT_BASE_LR = {"linear": 1.0, "mlp": 0.1}
GATE_INIT = 0.1  # tanh(alpha) at initialisation
POST_NORM_EPS = 1e-6
TARGET_EPS = 1e-8  # added to the target's standard deviation, as in the release


def reconstruction_target(v: Array, k: Array, ln_weight: Array, ln_bias: Array,
                          eps: float = TARGET_EPS) -> Array:
  """v, k [..., H, d], ln [H, d] -> v' [..., H, d] whose v' - k is LN_h(v - k).

  The inner model's output passes through the per-head LayerNorm LN_h before
  it is compared with the target, so it can only reach zero-mean, unit-scale
  vectors (times the LN affine). The public release therefore normalises the
  target v - k per token over the head dim with the SAME LN_h parameters, and
  the inner loss then measures a direction the model can actually fit,
  whatever the scale of v - k; without it the layer computes something else
  (about 40 % apart on one scene) and cannot take the release's weights. Its
  exact formula: torch's default unbiased (n - 1) std, with eps added to the
  std rather than to the variance. The op subtracts k again, so it is handed
  v' = LN_h(v - k) + k. Computed in fp32.
  """
  t = (v - k).astype(jnp.float32)
  t = t - jnp.mean(t, axis=-1, keepdims=True)
  std = jnp.sqrt(jnp.sum(jnp.square(t), axis=-1, keepdims=True) / (t.shape[-1] - 1))
  t = ln_weight.astype(jnp.float32) * (t / (std + eps)) + ln_bias.astype(jnp.float32)
  return (t + k.astype(jnp.float32)).astype(v.dtype)


def l2_normalize(x: Array, eps: float = 1e-6) -> Array:
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


class TTT(nnx.Module):
  """Test-Time-Training layer over a whole video sequence.

  Args:
    width: model width D (= num_heads * head_dim).
    num_heads: TTT heads H.
    inner: 'linear' (TTT-Linear) or 'mlp' (TTT-MLP, hidden mlp_ratio * d).
    mini_batch_size: K, tokens per inner gradient step.
    base_lr: inner base learning rate (default 1.0 linear, 0.1 mlp).
    remat_group: checkpoint the inner scan every this many mini-batches.
    matmul_dtype: dtype of the inner loop's matmul operands (None: fp32).
    impl: inner-loop implementation: 'xla' (lax.scan), 'pallas_tpu' /
      'pallas_gpu' (fused kernels) or 'pallas' (the default backend's
      kernels); remat_group keeps its meaning, see `ttt_jax.ops.inner_loop`.
    pallas_interpret: run the Pallas kernels in interpret mode (CPU tests).
    dtype: compute dtype of the projections; param_dtype: of the parameters.
  """

  def __init__(self, width: int, num_heads: int, *, inner: str = "mlp",
               mini_batch_size: int = 64, base_lr: float | None = None,
               remat_group: int | None = None, matmul_dtype: Any = None,
               impl: str = "xla", pallas_interpret: bool = False,
               mlp_ratio: int = 4, rope_theta: float = 10000.0,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    if inner not in DEFAULT_BASE_LR:
      raise ValueError(f"TTT inner model must be one of {sorted(DEFAULT_BASE_LR)}, got {inner!r}")
    check_kind_impl(inner, impl)
    if width % num_heads:
      raise ValueError(f"TTT width {width} is not divisible by num_heads {num_heads}")
    if mini_batch_size < 1:
      raise ValueError(f"TTT mini_batch_size must be >= 1, got {mini_batch_size}")
    self.width, self.num_heads = width, num_heads
    self.head_dim = d = width // num_heads
    self.inner, self.mini_batch_size = inner, mini_batch_size
    self.base_lr = DEFAULT_BASE_LR[inner] if base_lr is None else base_lr
    self.remat_group, self.matmul_dtype = remat_group, matmul_dtype
    self.impl, self.pallas_interpret = impl, pallas_interpret
    self.rope_theta = rope_theta

    init = nnx.initializers.normal(0.02)
    zeros, ones = nnx.initializers.zeros, nnx.initializers.ones
    linear = lambda: nnx.Linear(width, width, kernel_init=init, dtype=dtype,
                                param_dtype=param_dtype, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj, self.o_proj = linear(), linear(), linear(), linear()
    param = lambda fn, *shape: nnx.Param(fn(rngs.params(), shape, param_dtype))
    # Per-head inner learning-rate gate and inner LayerNorm.
    self.lr_weight = param(init, num_heads, width)  # [H, D]
    self.lr_bias = param(zeros, num_heads)  # [H]
    self.ln_weight = param(ones, num_heads, d)  # [H, d]
    self.ln_bias = param(zeros, num_heads, d)
    # Initial fast weights, learned by the outer loop.
    if inner == "linear":
      self.W = param(init, num_heads, d, d)
      self.b = param(zeros, num_heads, 1, d)
    else:
      f = mlp_ratio * d
      self.W1 = param(init, num_heads, d, f)
      self.b1 = param(zeros, num_heads, 1, f)
      self.W2 = param(init, num_heads, f, d)
      self.b2 = param(zeros, num_heads, 1, d)
    self.post_norm = nnx.LayerNorm(width, epsilon=POST_NORM_EPS, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)

  def fast_weights(self) -> tuple[Array, ...]:
    names = ("W", "b") if self.inner == "linear" else ("W1", "b1", "W2", "b2")
    return tuple(getattr(self, n)[...] for n in names)

  def inner_inputs(self, x: Array, layout: VideoLayout, *, reverse: bool = False
                   ) -> tuple[Array, Array, Array, Array]:
    """x [B, L, D] canonical -> q, k, v' [B, H, NC, K, d] and eta [B, H, NC, K] in TTT order.

    v' is `reconstruction_target(v, k)`: the op's v' - k is the normalised target.
    """
    B, L, D = x.shape
    H, d, K = self.num_heads, self.head_dim, self.mini_batch_size
    order = layout.ttt_order(reverse)
    x = x[:, order]  # [B, L, D] in TTT order

    heads = lambda proj: proj(x).reshape(B, L, H, d)
    angles = rope_angles(jnp.asarray(layout.positions[order]), d, self.rope_theta)  # [L, d/2]
    q = apply_rope(l2_normalize(heads(self.q_proj)), angles)
    k = apply_rope(l2_normalize(heads(self.k_proj)), angles)
    v = reconstruction_target(heads(self.v_proj), k, self.ln_weight[...], self.ln_bias[...])
    gate = jnp.einsum("bld,hd->bhl", x, self.lr_weight[...].astype(x.dtype)) \
        + self.lr_bias[...][:, None]
    eta = self.base_lr * jax.nn.sigmoid(gate.astype(jnp.float32)) / (d * K)  # [B, H, L]

    nc = -(-L // K)
    pad = nc * K - L
    to_chunks = lambda t: jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(
        B, nc, K, H, d).transpose(0, 3, 1, 2, 4)  # [B, H, NC, K, d]
    eta = jnp.pad(eta, ((0, 0), (0, 0), (0, pad))).reshape(B, H, nc, K)
    return to_chunks(q), to_chunks(k), to_chunks(v), eta

  def __call__(self, x: Array, layout: VideoLayout, *, reverse: bool = False) -> Array:
    """x [B, L, D] in canonical order -> [B, L, D] in canonical order."""
    chex.assert_rank(x, 3)
    B, L, D = x.shape
    if (L, D) != (layout.seq_len, self.width):
      raise ValueError(f"TTT input has shape {x.shape}, expected [B, {layout.seq_len}, "
                       f"{self.width}] for {layout}")
    q, k, v, eta = self.inner_inputs(x, layout, reverse=reverse)
    z = inner_loop(self.inner, self.impl, q, k, v, eta, self.ln_weight[...],
                   self.ln_bias[...], *self.fast_weights(), remat_group=self.remat_group,
                   matmul_dtype=self.matmul_dtype, interpret=self.pallas_interpret)
    z = z.transpose(0, 2, 3, 1, 4).reshape(B, -1, D)[:, :L]  # [B, L, D] TTT order
    out = self.o_proj(self.post_norm(z))
    return out[:, layout.from_ttt_order(reverse)]


class BidirectionalTTT(nnx.Module):
  """TTT forwards and backwards over the video with gated residuals."""

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, **ttt_kwargs):
    self.ttt = TTT(width, num_heads, rngs=rngs, **ttt_kwargs)
    alpha = lambda: nnx.Param(jnp.full((width,), math.atanh(GATE_INIT), jnp.float32))
    self.alpha_fwd_text, self.alpha_fwd_video = alpha(), alpha()
    self.alpha_bwd_text, self.alpha_bwd_video = alpha(), alpha()

  @staticmethod
  def _gate(layout: VideoLayout, alpha_text: nnx.Param, alpha_video: nnx.Param) -> Array:
    is_video = jnp.asarray(layout.is_video)[:, None]  # [L, 1]
    return jnp.where(is_video, jnp.tanh(alpha_video[...]), jnp.tanh(alpha_text[...]))  # [L, D]

  def __call__(self, a: Array, layout: VideoLayout) -> Array:
    """a [B, L, D] (canonical order) -> a2 [B, L, D]."""
    gate_fwd = self._gate(layout, self.alpha_fwd_text, self.alpha_fwd_video)
    gate_bwd = self._gate(layout, self.alpha_bwd_text, self.alpha_bwd_video)
    a1 = a + (gate_fwd * self.ttt(a, layout)).astype(a.dtype)
    return a1 + (gate_bwd * self.ttt(a1, layout, reverse=True)).astype(a.dtype)
