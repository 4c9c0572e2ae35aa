"""Mamba 2 (Dao & Gu 2024, "Transformers are SSMs"): a baseline the paper put in the TTT slot.

The paper compares TTT-MLP with Mamba 2, Gated DeltaNet and sliding-window
attention in the same place of the DiT block. Per head h (of H, in group
g(h) = h // (H / G) of G) Mamba 2 is a selective state space model with a
scalar decay per token:

  h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T        state h [P, N]
  y_t = h_t C_t + D_h x_t                              y [P]

`ssd` computes the SSM part with the chunked SSD algorithm ("state space
duality"): inside each chunk of Q tokens the quadratic, attention-like form
(C B^T times the segment-sum decay mask), across chunks one state per chunk,
handed on by a scan. O(L Q) work and memory, fp32 (or wider) throughout.

`Mamba2` is mamba_ssm's Mamba2 layer: projections -> (z, x, B, C, dt); a
short causal depthwise conv + SiLU on x, B, C; dt = softplus(dt + dt_bias);
A = -exp(A_log); the SSM with the D skip; gated RMSNorm rmsnorm(y * silu(z))
over groups of the inner width (RMSNormGated, norm_before_gate=False); output
projection. The reference's fused in_proj (and conv over the concatenated
x, B, C) is split into z / x / bc / dt projections and two convs, the same
function (a depthwise conv works channel by channel), so that every weight
has its own logical axes: the heads-major widths shard with the heads, B and
C (shared by the heads of a group) stay replicated. The layer comes in three
parts for head-sharded runs (e.g. under jax.shard_map): `Mamba2.project`
(per-head arrays), the pure `mamba2_heads`, `Mamba2.merge` (back to [B, L, D]).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from ttt_jax.layers.linear import dense
from ttt_jax.parallel.sharding import param

Array = jax.Array

NORM_EPS = 1e-5  # RMSNormGated's eps in mamba_ssm (and fla's norm_eps)


# ---------------------------------------------------------------- helpers ----
def compute_dtype(dtype: Any) -> Any:
  """fp32, or the input's dtype where wider (float64 in tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def segsum(a: Array) -> Array:
  """Log-decays a [..., Q] -> [..., Q, Q]: out[i, j] = a_{j+1} + ... + a_i for i >= j, -inf above.

  exp(segsum(a)) is the causal decay mask from token j to token i. The sums
  are taken directly (a masked cumsum), not as cumsum_i - cumsum_j, which
  loses digits once the running sum is large.
  """
  Q = a.shape[-1]
  i = jnp.arange(Q)
  terms = jnp.where(i[:, None] > i[None, :], a[..., :, None], 0.0)  # [..., k, j]: a_k for k > j
  sums = jnp.cumsum(terms, axis=-2)  # [..., i, j] = sum_{j < k <= i} a_k
  return jnp.where(i[:, None] >= i[None, :], sums, -jnp.inf)


def causal_conv(x: Array, kernel: Array, bias: Array | None = None) -> Array:
  """Depthwise causal conv, x [B, L, C], kernel [K, C] -> [B, L, C] (zeros before the start).

  out_t = sum_j kernel[j] x_{t-K+1+j} (+ bias): kernel[K-1] weighs the current
  token, as torch's Conv1d(groups=C, padding=K-1) cropped to the first L outputs.
  """
  K, L = kernel.shape[0], x.shape[1]
  kernel = kernel.astype(x.dtype)
  padded = jnp.pad(x, ((0, 0), (K - 1, 0), (0, 0)))  # [B, K-1+L, C]
  out = sum(padded[:, j:j + L] * kernel[j] for j in range(K))
  return out if bias is None else out + bias.astype(x.dtype)


def rms_norm(x: Array, weight: Array, eps: float = NORM_EPS) -> Array:
  """RMSNorm over the last axis, in x's dtype (callers pass fp32)."""
  return x * lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps) * weight


def uniform_init(low: float, high: float) -> Callable:
  """U[low, high) initialiser (torch's default conv init is U[-1/sqrt(fan_in), 1/sqrt(fan_in)))."""
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, low, high)


def dt_bias_init(dt_min: float, dt_max: float, floor: float = 1e-4) -> Callable:
  """dt_bias = softplus^-1(dt) for dt log-uniform in [dt_min, dt_max] (floored), as mamba_ssm,
  so that softplus(0 + dt_bias) starts each head at its own time scale."""

  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)

  return init


def a_log_init(low: float, high: float) -> Callable:
  """A_log = log(A), A ~ U[low, high) floored at 1e-4 (log stays finite): per-head decay rates."""

  def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    a = jax.random.uniform(key, shape, jnp.float32, low, high)
    return jnp.log(jnp.maximum(a, 1e-4)).astype(dtype)

  return init


def check_positive(owner: str, **values: int) -> None:
  for name, value in values.items():
    if not (isinstance(value, int) and value >= 1):
      raise ValueError(f"{owner} {name} must be a positive integer, got {value!r}")


# ------------------------------------------------------------------- SSD ----
def ssd(x: Array, dt: Array, A: Array, B: Array, C: Array, *, chunk_size: int = 64,
        initial_state: Array | None = None, return_final_state: bool = False
        ) -> Array | tuple[Array, Array]:
  """The Mamba 2 SSM (no D skip), chunked: causal over L, computed in fp32 (or wider).

  Args:
    x: [Bt, L, H, P] inputs per head.
    dt: [Bt, L, H] step sizes, already softplus'ed (> 0).
    A: [H] decay rates (< 0); the per-token log-decay is dt_t A_h.
    B, C: [Bt, L, G, N] input / output projections of the state, G groups
      (head h uses group h // (H / G)).
    chunk_size: Q, tokens per chunk (min(Q, L) is used); L need not divide.
    initial_state: [Bt, H, P, N] state before the first token (default zeros).
    return_final_state: also return the state after the last token.
  Returns:
    y [Bt, L, H, P] in x's dtype, and (if asked) the final state [Bt, H, P, N] in fp32.

  Holds the decay mask [Bt, L/Q, H, Q, Q] and the chunk states [Bt, L/Q, H, P, N]
  in fp32; fp32 matmuls follow jax_default_matmul_precision (TF32 / bf16 passes on
  GPU / TPU unless raised).
  """
  Bt, L, H, P = x.shape
  G, N = B.shape[-2:]
  if dt.shape != (Bt, L, H) or A.shape != (H,) or B.shape != (Bt, L, G, N) or C.shape != B.shape:
    raise ValueError(f"ssd takes x [Bt, L, H, P], dt [Bt, L, H], A [H], B = C [Bt, L, G, N]; "
                     f"got x {x.shape}, dt {dt.shape}, A {A.shape}, B {B.shape}, C {C.shape}")
  if H % G:
    raise ValueError(f"ssd: {H} heads are not divisible into {G} groups")
  if chunk_size < 1:
    raise ValueError(f"ssd chunk_size must be >= 1, got {chunk_size}")
  R, Q = H // G, min(chunk_size, L)  # heads per group, chunk length
  nc = -(-L // Q)
  f = compute_dtype(x.dtype)

  # Padding tokens get dt = 0: decay exp(0) = 1 and no input, so they leave the state as it is.
  pad = lambda t: jnp.pad(t.astype(f), [(0, 0), (0, nc * Q - L)] + [(0, 0)] * (t.ndim - 2))
  dt = pad(dt)  # [Bt, Lp, H]
  xdt = (pad(x) * dt[..., None]).reshape(Bt, nc, Q, G, R, P)  # dt_t x_t [Bt, nc, Q, G, R, P]
  B = pad(B).reshape(Bt, nc, Q, G, N)
  C = pad(C).reshape(Bt, nc, Q, G, N)
  a = jnp.moveaxis((dt * A.astype(f)).reshape(Bt, nc, Q, G, R), 2, -1)  # [Bt, nc, G, R, Q]

  # Within a chunk: y_l = sum_{s <= l} (C_l . B_s) exp(a_{s+1} + ... + a_l) dt_s x_s.
  decay = jnp.exp(segsum(a))  # [Bt, nc, G, R, Q (l), Q (s)]
  scores = jnp.einsum("bclgn,bcsgn->bcgls", C, B)  # [Bt, nc, G, Q, Q], once per group
  y = jnp.einsum("bcgrls,bcsgrp->bclgrp", scores[:, :, :, None] * decay, xdt)  # [.., Q, G, R, P]

  # Each chunk's own contribution to the state after it, and its total decay.
  to_end = decay[..., -1, :]  # exp(a_{s+1} + ... + a_{Q-1}) [Bt, nc, G, R, Q]
  states = jnp.einsum("bcsgn,bcgrs,bcsgrp->bcgrpn", B, to_end, xdt)  # [Bt, nc, G, R, P, N]
  a_cum = jnp.cumsum(a, axis=-1)  # [Bt, nc, G, R, Q]
  chunk_decay = jnp.exp(a_cum[..., -1])  # [Bt, nc, G, R]

  # Across chunks: h_c = chunk_decay_c h_{c-1} + states_c, keeping the state entering each chunk.
  h0 = (jnp.zeros((Bt, G, R, P, N), f) if initial_state is None
        else initial_state.astype(f).reshape(Bt, G, R, P, N))

  def step(h: Array, xs: tuple[Array, Array]) -> tuple[Array, Array]:
    d, s = xs  # [Bt, G, R], [Bt, G, R, P, N]
    return d[..., None, None] * h + s, h

  h_last, h_in = lax.scan(step, h0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(states, 1, 0)))
  h_in = jnp.moveaxis(h_in, 0, 1)  # [Bt, nc, G, R, P, N]

  # The entering state, decayed to token l and read out by C_l.
  y = y + jnp.einsum("bclgn,bcgrpn,bcgrl->bclgrp", C, h_in, jnp.exp(a_cum))
  y = y.reshape(Bt, nc * Q, H, P)[:, :L].astype(x.dtype)  # [Bt, L, H, P]
  return (y, h_last.reshape(Bt, H, P, N)) if return_final_state else y


def mamba2_heads(x: Array, dt: Array, A: Array, B: Array, C: Array, D: Array, *,
                 chunk_size: int = 64) -> Array:
  """The per-head core of the layer: ssd + D skip, y [Bt, L, H, P] in x's dtype.

  x [Bt, L, H, P], dt [Bt, L, H], A [H], B, C [Bt, L, G, N], D [H]; heads are
  independent (given their groups' B, C), so this runs head-sharded as is.
  """
  y = ssd(x, dt, A, B, C, chunk_size=chunk_size)
  skip = D.astype(compute_dtype(x.dtype))[:, None] * x  # [Bt, L, H, P]
  return (y + skip).astype(x.dtype)


# ----------------------------------------------------------------- layer ----
class Mamba2(nnx.Module):
  """Mamba 2 mixer over [B, L, D], causal along L.

  Args:
    width: model width D.
    num_heads: H; the inner width expand * D splits into H heads of P.
    state_dim: N, the SSM state size per head (per group for B and C).
    num_groups: G, groups of heads sharing B and C (and a gated-norm group).
    expand: inner width = expand * width.
    conv_width: K of the causal depthwise conv on x, B, C.
    chunk_size: Q of the SSD algorithm.
    dt_min, dt_max, dt_init_floor: range of the initial step sizes.
    a_init_range: A ~ U[a_init_range] at initialisation.
    dtype: compute dtype of projections and output; param_dtype: of the parameters.
      The SSM itself runs in fp32.
  """

  def __init__(self, width: int, num_heads: int, *, state_dim: int = 64, num_groups: int = 1,
               expand: int = 1, conv_width: int = 4, chunk_size: int = 64,
               dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4,
               a_init_range: tuple[float, float] = (1.0, 16.0), norm_eps: float = NORM_EPS,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    check_positive("Mamba2", width=width, num_heads=num_heads, state_dim=state_dim,
                   num_groups=num_groups, expand=expand, conv_width=conv_width,
                   chunk_size=chunk_size)
    inner = expand * width
    if inner % num_heads:
      raise ValueError(f"Mamba2 inner width {inner} (expand {expand} x width {width}) is not "
                       f"divisible by num_heads {num_heads}")
    if num_heads % num_groups:
      raise ValueError(f"Mamba2 num_heads {num_heads} is not divisible by num_groups {num_groups}")
    if not 0 < dt_min <= dt_max:
      raise ValueError(f"Mamba2 needs 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    self.width, self.num_heads, self.inner = width, num_heads, inner
    self.head_dim, self.state_dim, self.num_groups = inner // num_heads, state_dim, num_groups
    self.chunk_size, self.norm_eps, self.dtype = chunk_size, norm_eps, dtype

    H, G, N, K = num_heads, num_groups, state_dim, conv_width
    init = nnx.initializers.lecun_normal()
    linear = lambda n_in, n_out, names: dense(n_in, n_out, names, init=init, use_bias=False,
                                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.z_proj = linear(width, inner, ("embed", "heads"))  # gate z, [D, H*P]
    self.x_proj = linear(width, inner, ("embed", "heads"))  # SSM input x, [D, H*P]
    self.bc_proj = linear(width, 2 * G * N, ("embed", "kv"))  # [B; C], [D, 2*G*N]
    self.dt_proj = linear(width, H, ("embed", "heads"))  # [D, H]
    conv = uniform_init(-1 / math.sqrt(K), 1 / math.sqrt(K))  # torch Conv1d's default (fan_in K)
    self.conv_x_kernel = param(conv, rngs, (K, inner), param_dtype, ("in_features", "heads"))
    self.conv_x_bias = param(conv, rngs, (inner,), param_dtype, ("heads",))
    self.conv_bc_kernel = param(conv, rngs, (K, 2 * G * N), param_dtype, ("in_features", "kv"))
    self.conv_bc_bias = param(conv, rngs, (2 * G * N,), param_dtype, ("kv",))
    self.dt_bias = param(dt_bias_init(dt_min, dt_max, dt_init_floor), rngs, (H,), param_dtype,
                         ("heads",))
    self.A_log = param(a_log_init(*a_init_range), rngs, (H,), param_dtype, ("heads",))
    self.D = param(nnx.initializers.ones, rngs, (H,), param_dtype, ("heads",))
    self.norm_weight = param(nnx.initializers.ones, rngs, (inner,), param_dtype, ("norm",))
    self.out_proj = linear(inner, width, ("heads", "embed"))

  def project(self, x: Array) -> tuple[tuple[Array, ...], Array]:
    """x [B, L, D] -> the core's arguments (x, dt, A, B, C, D) and the gate z [B, L, H, P].

    x [B, L, H, P], dt [B, L, H] (fp32, softplus'ed), A [H] (fp32, < 0),
    B, C [B, L, G, N], D [H].
    """
    Bt, L, _ = x.shape
    H, P, G, N = self.num_heads, self.head_dim, self.num_groups, self.state_dim
    z = self.z_proj(x).reshape(Bt, L, H, P)
    xs = jax.nn.silu(causal_conv(self.x_proj(x), self.conv_x_kernel[...], self.conv_x_bias[...]))
    bc = jax.nn.silu(causal_conv(self.bc_proj(x), self.conv_bc_kernel[...],
                                 self.conv_bc_bias[...])).reshape(Bt, L, 2, G, N)
    f32 = jnp.float32
    dt = jax.nn.softplus(self.dt_proj(x).astype(f32) + self.dt_bias[...].astype(f32))  # [B, L, H]
    A = -jnp.exp(self.A_log[...].astype(f32))  # [H]
    return (xs.reshape(Bt, L, H, P), dt, A, bc[:, :, 0], bc[:, :, 1], self.D[...]), z

  def core(self, x: Array, dt: Array, A: Array, B: Array, C: Array, D: Array) -> Array:
    """The per-head SSM: `mamba2_heads` at this layer's chunk size, y [B, L, H, P]."""
    return mamba2_heads(x, dt, A, B, C, D, chunk_size=self.chunk_size)

  def merge(self, y: Array, z: Array) -> Array:
    """y, z [B, L, H, P] -> [B, L, D]: rmsnorm(y * silu(z)) over each group's heads, out_proj."""
    Bt, L, H, P = y.shape
    gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    weight = self.norm_weight[...].astype(jnp.float32).reshape(self.num_groups, -1)
    gated = rms_norm(gated.reshape(Bt, L, self.num_groups, -1), weight, self.norm_eps)
    return self.out_proj(gated.reshape(Bt, L, H * P).astype(self.dtype))

  def __call__(self, x: Array) -> Array:
    """x [B, L, D] -> [B, L, D], causal along L."""
    if x.ndim != 3 or x.shape[-1] != self.width:
      raise ValueError(f"Mamba2 takes [B, L, {self.width}], got {x.shape}")
    heads, z = self.project(x)
    return self.merge(self.core(*heads), z)
