"""Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024, "Gated Delta Networks"): a baseline of the paper.

Another of the layers the paper compares TTT-MLP with in the same DiT slot.
Per head, a linear fast-weight memory S [dv, dk] with a gated delta rule,
i.e. one step of online gradient descent on ||S k - v||^2 after a decay:

  S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T
  o_t = S_t (q_t / sqrt(dk))

g_t <= 0 is the log-decay, beta_t in (0, 1) the step size; q and k are unit
vectors (the layer L2-normalises them), and q is scaled by dk^-1/2 as fla's
and the paper's kernels do (softmax-attention convention).

`gated_delta_rule` computes it chunk-wise (the WY / UT form of DeltaNet):
within a chunk of Q tokens the delta-rule corrections are a unit
lower-triangular Q x Q system, solved once for the "pseudo-values" W, after
which outputs are attention-like matmuls and the state is updated once per
chunk in a scan. With S0 the state before the chunk, gamma_t the cumulative
log-decay inside it and Gamma_t = exp(gamma_t):

  w_t  = beta_t (v_t - exp(g_t) S_{t-1} k_t)             (so S_t = exp(g_t) S_{t-1} + w_t k_t^T)
  (I + A) W = beta V - beta Gamma K S0^T,   A_ti = beta_t exp(gamma_t - gamma_i) k_t.k_i (i < t)
  O  = Gamma Q S0^T + (Q K^T * exp(gamma_t - gamma_i), i <= t) W
  S_Q = Gamma_Q S0 + W^T (K * exp(gamma_Q - gamma_i))

`GatedDeltaNet` is fla's GatedDeltaNet layer (one head dim for k and v):
q/k/v projections, short causal depthwise conv + SiLU each, L2-normalised q
and k, beta = sigmoid(W_b x), g = -exp(A_log) softplus(W_a x + dt_bias), the
core, per-head RMSNorm(o) * silu(W_g x), output projection. Split like
`Mamba2` for head-sharded runs: `project`, the pure `gated_delta_rule`, `merge`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.scipy.linalg import solve_triangular

from ttt_jax.layers.mamba2 import (NORM_EPS, a_log_init, causal_conv, check_positive,
                                   compute_dtype, dt_bias_init, rms_norm, segsum, uniform_init)
from ttt_jax.layers.linear import dense
from ttt_jax.parallel.sharding import param

Array = jax.Array

L2_EPS = 1e-6  # fla's l2norm: x / sqrt(sum x^2 + eps)


def l2_normalize(x: Array, eps: float = L2_EPS) -> Array:
  return x * lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + eps)


def gated_delta_rule(q: Array, k: Array, v: Array, g: Array, beta: Array, *,
                     chunk_size: int = 64, initial_state: Array | None = None,
                     return_final_state: bool = False, scale: float | None = None
                     ) -> Array | tuple[Array, Array]:
  """The gated delta rule, chunked: causal over L, computed in fp32 (or wider).

  Args:
    q, k: [Bt, L, H, dk] queries and keys (unit vectors for a stable rule).
    v: [Bt, L, H, dv] values.
    g: [Bt, L, H] log-decay (<= 0).
    beta: [Bt, L, H] step sizes in (0, 1).
    chunk_size: Q, tokens per chunk (min(Q, L) is used); L need not divide.
    initial_state: S [Bt, H, dv, dk] before the first token (default zeros).
    return_final_state: also return S after the last token.
    scale: factor on q (default dk ** -0.5, as fla and the paper's kernels).
  Returns:
    o [Bt, L, H, dv] in v's dtype, and (if asked) the final S [Bt, H, dv, dk] in fp32.

  Holds the decay mask and the triangular system [Bt, H, L/Q, Q, Q] in fp32; fp32
  matmuls follow jax_default_matmul_precision (TF32 / bf16 passes on GPU / TPU
  unless raised).
  """
  Bt, L, H, dk = q.shape
  dv = v.shape[-1]
  if (k.shape != q.shape or v.shape != (Bt, L, H, dv) or g.shape != (Bt, L, H)
      or beta.shape != g.shape):
    raise ValueError(f"gated_delta_rule takes q = k [Bt, L, H, dk], v [Bt, L, H, dv], "
                     f"g = beta [Bt, L, H]; got q {q.shape}, k {k.shape}, v {v.shape}, "
                     f"g {g.shape}, beta {beta.shape}")
  if chunk_size < 1:
    raise ValueError(f"gated_delta_rule chunk_size must be >= 1, got {chunk_size}")
  Q = min(chunk_size, L)
  nc = -(-L // Q)
  f = compute_dtype(v.dtype)
  scale = dk ** -0.5 if scale is None else scale

  # Padding tokens get g = 0, beta = 0 (and k = 0): S_t = S_{t-1}, the state passes unchanged.
  def chunks(t: Array) -> Array:
    """[Bt, L, H, ...] -> zero-padded [Bt, H, nc, Q, ...]."""
    t = jnp.pad(t.astype(f), [(0, 0), (0, nc * Q - L)] + [(0, 0)] * (t.ndim - 2))
    return jnp.moveaxis(t.reshape(Bt, nc, Q, H, *t.shape[3:]), 3, 1)

  q, k, v = chunks(q) * scale, chunks(k), chunks(v)  # [Bt, H, nc, Q, d]
  g, beta = chunks(g), chunks(beta)  # [Bt, H, nc, Q]
  gamma = jnp.cumsum(g, axis=-1)  # log-decay from the chunk start through token t
  decay = jnp.exp(segsum(g))  # exp(gamma_t - gamma_i) for i <= t, else 0 [Bt, H, nc, Q, Q]

  # Pseudo-values W = U - Wk S0^T: one unit lower-triangular solve for both right-hand sides.
  A = beta[..., None] * jnp.einsum("...tk,...ik->...ti", k, k) * decay  # [.., Q, Q]
  A = jnp.where(jnp.tri(Q, k=-1, dtype=bool), A, 0.0)  # strictly lower; unit diagonal implied
  rhs = jnp.concatenate([beta[..., None] * v, (beta * jnp.exp(gamma))[..., None] * k], axis=-1)
  solved = solve_triangular(A, rhs, lower=True, unit_diagonal=True)  # [Bt, H, nc, Q, dv + dk]
  U, Wk = solved[..., :dv], solved[..., dv:]

  # Everything else that does not depend on S0, for all chunks at once.
  qk = jnp.einsum("...tk,...ik->...ti", q, k) * decay  # causal, decayed scores [.., Q, Q]
  q_decayed = q * jnp.exp(gamma)[..., None]  # Gamma Q [.., Q, dk]
  k_to_end = k * decay[..., -1, :, None]  # K * exp(gamma_Q - gamma_i) [.., Q, dk]
  chunk_decay = jnp.exp(gamma[..., -1])  # Gamma_Q [Bt, H, nc]

  def step(S: Array, xs: tuple[Array, ...]) -> tuple[Array, Array]:
    """One chunk given the state S [Bt, H, dv, dk] before it -> (state after, o [Bt, H, Q, dv])."""
    U, Wk, qk, q_decayed, k_to_end, d = xs
    W = U - jnp.einsum("bhck,bhvk->bhcv", Wk, S)  # [Bt, H, Q, dv]
    o = jnp.einsum("bhck,bhvk->bhcv", q_decayed, S) + jnp.einsum("bhci,bhiv->bhcv", qk, W)
    S = d[..., None, None] * S + jnp.einsum("bhcv,bhck->bhvk", W, k_to_end)
    return S, o

  S0 = (jnp.zeros((Bt, H, dv, dk), f) if initial_state is None
        else initial_state.astype(f))
  over_chunks = lambda t: jnp.moveaxis(t, 2, 0)  # [nc, Bt, H, ...]
  S, o = lax.scan(step, S0, tuple(map(over_chunks, (U, Wk, qk, q_decayed, k_to_end, chunk_decay))))
  o = jnp.moveaxis(o, 0, 2)  # [Bt, H, nc, Q, dv]
  o = jnp.moveaxis(o, 1, 3).reshape(Bt, nc * Q, H, dv)[:, :L].astype(v.dtype)  # [Bt, L, H, dv]
  return (o, S) if return_final_state else o


class GatedDeltaNet(nnx.Module):
  """Gated DeltaNet mixer over [B, L, D], causal along L.

  Args:
    width: model width D.
    num_heads: H.
    head_dim: dk = dv per head (default width // num_heads).
    conv_width: K of the causal depthwise convs on q, k, v.
    chunk_size: Q of the chunked rule.
    dt_min, dt_max, dt_init_floor: range of the initial softplus(dt_bias).
    a_init_range: A ~ U[a_init_range] at initialisation (fla: (0, 16)).
    dtype: compute dtype of projections and output; param_dtype: of the parameters.
      The delta rule itself runs in fp32.
  """

  def __init__(self, width: int, num_heads: int, *, head_dim: int | None = None,
               conv_width: int = 4, chunk_size: int = 64, dt_min: float = 1e-3,
               dt_max: float = 1e-1, dt_init_floor: float = 1e-4,
               a_init_range: tuple[float, float] = (0.0, 16.0), norm_eps: float = NORM_EPS,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    check_positive("GatedDeltaNet", width=width, num_heads=num_heads, conv_width=conv_width,
                   chunk_size=chunk_size)
    if head_dim is None:
      if width % num_heads:
        raise ValueError(f"GatedDeltaNet width {width} is not divisible by num_heads {num_heads}"
                         f" (or pass head_dim)")
      head_dim = width // num_heads
    check_positive("GatedDeltaNet", head_dim=head_dim)
    if not 0 < dt_min <= dt_max:
      raise ValueError(f"GatedDeltaNet needs 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    self.width, self.num_heads, self.head_dim = width, num_heads, head_dim
    self.chunk_size, self.norm_eps, self.dtype = chunk_size, norm_eps, dtype

    H, d, K = num_heads, head_dim, conv_width
    init = nnx.initializers.lecun_normal()
    linear = lambda n_in, n_out, names: dense(n_in, n_out, names, init=init, use_bias=False,
                                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = linear(width, H * d, ("embed", "heads"))
    self.k_proj = linear(width, H * d, ("embed", "heads"))
    self.v_proj = linear(width, H * d, ("embed", "heads"))
    self.a_proj = linear(width, H, ("embed", "heads"))  # decay gate
    self.b_proj = linear(width, H, ("embed", "heads"))  # beta
    self.g_proj = linear(width, H * d, ("embed", "heads"))  # output gate
    conv = uniform_init(-1 / math.sqrt(K), 1 / math.sqrt(K))  # torch Conv1d's default (fan_in K)
    conv_kernel = lambda: param(conv, rngs, (K, H * d), param_dtype, ("in_features", "heads"))
    self.conv_q, self.conv_k, self.conv_v = conv_kernel(), conv_kernel(), conv_kernel()
    self.dt_bias = param(dt_bias_init(dt_min, dt_max, dt_init_floor), rngs, (H,), param_dtype,
                         ("heads",))
    self.A_log = param(a_log_init(*a_init_range), rngs, (H,), param_dtype, ("heads",))
    # Over the head dim, shared by the heads: 'kv', as attention's per-head QK norms.
    self.norm_weight = param(nnx.initializers.ones, rngs, (d,), param_dtype, ("kv",))
    self.out_proj = linear(H * d, width, ("heads", "embed"))

  def project(self, x: Array) -> tuple[tuple[Array, ...], Array]:
    """x [B, L, D] -> the core's arguments (q, k, v, g, beta) and the output gate [B, L, H, d].

    q, k [B, L, H, d] unit vectors; v [B, L, H, d]; g, beta [B, L, H] fp32.
    """
    Bt, L, _ = x.shape
    H, d = self.num_heads, self.head_dim
    heads = lambda proj, kernel: jax.nn.silu(causal_conv(proj(x), kernel[...])).reshape(Bt, L, H, d)
    q = l2_normalize(heads(self.q_proj, self.conv_q).astype(jnp.float32)).astype(x.dtype)
    k = l2_normalize(heads(self.k_proj, self.conv_k).astype(jnp.float32)).astype(x.dtype)
    v = heads(self.v_proj, self.conv_v)
    f32 = jnp.float32
    beta = jax.nn.sigmoid(self.b_proj(x).astype(f32))  # [B, L, H]
    g = -jnp.exp(self.A_log[...].astype(f32)) * jax.nn.softplus(
        self.a_proj(x).astype(f32) + self.dt_bias[...].astype(f32))  # [B, L, H]
    return (q, k, v, g, beta), self.g_proj(x).reshape(Bt, L, H, d)

  def core(self, q: Array, k: Array, v: Array, g: Array, beta: Array) -> Array:
    """The per-head rule: `gated_delta_rule` at this layer's chunk size, o [B, L, H, d]."""
    return gated_delta_rule(q, k, v, g, beta, chunk_size=self.chunk_size)

  def merge(self, o: Array, gate: Array) -> Array:
    """o, gate [B, L, H, d] -> [B, L, D]: RMSNorm(o) per head * silu(gate), out_proj."""
    Bt, L, H, d = o.shape
    o = rms_norm(o.astype(jnp.float32), self.norm_weight[...].astype(jnp.float32), self.norm_eps)
    o = o * jax.nn.silu(gate.astype(jnp.float32))
    return self.out_proj(o.reshape(Bt, L, H * d).astype(self.dtype))

  def __call__(self, x: Array) -> Array:
    """x [B, L, D] -> [B, L, D], causal along L."""
    if x.ndim != 3 or x.shape[-1] != self.width:
      raise ValueError(f"GatedDeltaNet takes [B, L, {self.width}], got {x.shape}")
    heads, gate = self.project(x)
    return self.merge(self.core(*heads), gate)
