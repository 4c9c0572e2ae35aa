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
parameters and tanh-gated residuals (`ttt_jax.layers.bidirectional`).
"""

from __future__ import annotations

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.layout import VideoLayout
from ttt_jax.layers.rope import apply_rope, rope_angles
from ttt_jax.ops import inner_loop
from ttt_jax.ops.dispatch import check_kind_impl
from ttt_jax.parallel.context import heads_parallel
from ttt_jax.layers.bidirectional import Bidirectional
from ttt_jax.layers.linear import dense, layer_norm
from ttt_jax.parallel.sharding import constrain, gathered, param as sharded_param

Array = jax.Array

DEFAULT_BASE_LR = {"linear": 1.0, "mlp": 0.1}
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
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj = (dense(width, width, ("embed", "heads"), init=init,
                                                   **kw) for _ in range(3))
    self.o_proj = dense(width, width, ("heads", "embed"), init=init, **kw)
    param = lambda fn, shape, *names: sharded_param(fn, rngs, shape, param_dtype, names)
    # Per-head inner learning-rate gate and inner LayerNorm.
    self.lr_weight = param(init, (num_heads, width), "heads", "embed")  # [H, D]
    self.lr_bias = param(zeros, (num_heads,), "heads")  # [H]
    self.ln_weight = param(ones, (num_heads, d), "heads", "kv")  # [H, d]
    self.ln_bias = param(zeros, (num_heads, d), "heads", "kv")
    # Initial fast weights, learned by the outer loop.
    if inner == "linear":
      self.W = param(init, (num_heads, d, d), "heads", "kv", "kv")
      self.b = param(zeros, (num_heads, 1, d), "heads", None, "kv")
    else:
      f = mlp_ratio * d
      self.W1 = param(init, (num_heads, d, f), "heads", "kv", "kv")
      self.b1 = param(zeros, (num_heads, 1, f), "heads", None, "kv")
      self.W2 = param(init, (num_heads, f, d), "heads", "kv", "kv")
      self.b2 = param(zeros, (num_heads, 1, d), "heads", None, "kv")
    self.post_norm = layer_norm(width, POST_NORM_EPS, **kw)

  def fast_weights(self) -> tuple[Array, ...]:
    names = ("W", "b") if self.inner == "linear" else ("W1", "b1", "W2", "b2")
    return tuple(getattr(self, n)[...] for n in names)

  def project(self, x: Array) -> tuple[Array, Array, Array, Array]:
    """x [B, L, D] -> q, k, v [B, L, H, d] and the inner learning-rate logits [B, L, H].

    Per token, so in any order and on a sequence-sharded x.
    """
    B, L, _ = x.shape
    H, d = self.num_heads, self.head_dim
    heads = lambda proj: constrain(proj(x).reshape(B, L, H, d),
                                   "act_batch", "act_length", "act_heads", "act_kv")
    lr_weight = gathered(self.lr_weight[...], "heads", "embed")
    logits = jnp.einsum("bld,hd->blh", x, lr_weight.astype(x.dtype)) + self.lr_bias[...]
    return heads(self.q_proj), heads(self.k_proj), heads(self.v_proj), logits

  def arrange(self, q: Array, k: Array, v: Array, logits: Array, ln_weight: Array,
              ln_bias: Array, layout: VideoLayout, reverse: bool = False
              ) -> tuple[Array, Array, Array, Array]:
    """Canonical per-head inputs -> the inner loop's q, k, v' [B, h, NC, K, d], eta [B, h, NC, K].

    Works on any subset of h heads (with their ln parameters [h, d]): tokens
    go to TTT order, q and k are L2-normalised and rotated, v' is
    `reconstruction_target(v, k)` (the op's v' - k is the normalised target),
    eta is zero on padding (the layout's and the last mini-batch's).
    """
    B, L, h, d = q.shape
    K = self.mini_batch_size
    order = layout.ttt_order(reverse)
    angles = rope_angles(jnp.asarray(layout.positions[order]), d, self.rope_theta)  # [L, d/2]
    q = apply_rope(l2_normalize(q[:, order]), angles)
    k = apply_rope(l2_normalize(k[:, order]), angles)
    v = reconstruction_target(v[:, order], k, ln_weight, ln_bias)
    real = jnp.asarray(~layout.is_pad[order])[None, :, None]  # [1, L, 1]
    eta = jnp.where(real, self.base_lr * jax.nn.sigmoid(logits[:, order].astype(jnp.float32))
                    / (d * K), 0.0)  # [B, L, h]

    nc = -(-L // K)
    pad = nc * K - L
    to_chunks = lambda t: jnp.pad(t, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(
        B, nc, K, h, d).transpose(0, 3, 1, 2, 4)  # [B, h, NC, K, d]
    eta = jnp.pad(eta, ((0, 0), (0, pad), (0, 0))).reshape(B, nc, K, h).transpose(0, 3, 1, 2)
    return to_chunks(q), to_chunks(k), to_chunks(v), eta

  def solve(self, q: Array, k: Array, v: Array, logits: Array, ln_weight: Array,
            ln_bias: Array, *weights: Array, layout: VideoLayout, reverse: bool = False
            ) -> Array:
    """The per-head part: canonical [B, L, h, d] inputs -> inner-loop read-outs [B, L, h, d].

    Heads are independent, so under context parallelism this runs on a
    device's own heads and whole sequence (`heads_parallel`).
    """
    B, L, h, d = q.shape
    z = inner_loop(self.inner, self.impl,
                   *self.arrange(q, k, v, logits, ln_weight, ln_bias, layout, reverse),
                   ln_weight, ln_bias, *weights, remat_group=self.remat_group,
                   matmul_dtype=self.matmul_dtype, interpret=self.pallas_interpret)
    z = z.transpose(0, 2, 3, 1, 4).reshape(B, -1, h, d)[:, :L]  # [B, L, h, d] TTT order
    return z[:, layout.from_ttt_order(reverse)]

  def __call__(self, x: Array, layout: VideoLayout, *, reverse: bool = False) -> Array:
    """x [B, L, D] in canonical order -> [B, L, D] in canonical order."""
    chex.assert_rank(x, 3)
    B, L, D = x.shape
    if (L, D) != (layout.seq_len, self.width):
      raise ValueError(f"TTT input has shape {x.shape}, expected [B, {layout.seq_len}, "
                       f"{self.width}] for {layout}")
    z = heads_parallel(functools.partial(self.solve, layout=layout, reverse=reverse),
                       self.project(x), (self.ln_weight[...], self.ln_bias[...],
                                         *self.fast_weights()))
    return self.o_proj(self.post_norm(z.reshape(B, L, D)))


class BidirectionalTTT(Bidirectional):
  """TTT forwards and backwards over the video with gated residuals (the paper's block)."""

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs, **ttt_kwargs):
    super().__init__(width, "ttt", TTT(width, num_heads, rngs=rngs, **ttt_kwargs))
