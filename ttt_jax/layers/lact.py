"""LaCT, large-chunk test-time training (Zhang et al. 2025, "Test-Time Training Done Right").

TTT with fast weights updated once per LARGE chunk of C tokens (hundreds to
thousands, where the paper's TTT uses 16..64) so that each update is a few
big matmuls that keep an accelerator busy. Per head the fast weights are a
SwiGLU network, in the [out, in] convention (rows are output units):

  f(x) = W2 (silu(W1 x) * (W3 x))      W1, W3 [F, d] (gate, up), W2 [d, F] (down)

(the release's w0 = W1, w2 = W3, w1 = W2). For chunk c with keys k_j, values
v_j, queries q_j and per-token learning rates eta_ij (one per fast weight W_i):

  L_i(W)  = -sum_j eta_ij <f(k_j; W), v_j>              negative dot-product loss
  G_i     = dL_i / dW_i at W_{c-1}                      closed form, below
  S_i     = NS_s(G_i) (Muon, s steps) or G_i (s = 0)    the step
  W_i     <- W_i - S_i, then each ROW rescaled to its norm in the initial W_i
  o_j     = f(q_j; W_c) for every j of chunk c          update, then apply

With the chunk's K, V [C, d], pre-activations P = K W1^T and U = K W3^T
[C, F], Hid = silu(P) * U, dHid = V W2 (the gradient of sum <f(k_j), v_j>
w.r.t. Hid) and silu'(p) = s(p) (1 + p (1 - s(p))), s the sigmoid:

  dL_2/dW2 = -(eta_2 V)^T Hid                            [d, F]
  dL_1/dW1 = -(dHid * U * silu'(P))^T (eta_1 K)          [F, d]
  dL_3/dW3 = -(dHid * silu(P))^T (eta_3 K)               [F, d]

Muon (Jordan et al. 2024): NS_s(G) divides G by its Frobenius norm and runs s
steps of the quintic Newton-Schulz iteration X <- aX + (b A + c A^2) X,
A = X X^T, (a, b, c) = (3.4445, -4.7750, 2.0315), on the orientation whose Gram
matrix A is the smaller one; it pushes the singular values of G towards ~1. So
with Muon the learning rates set only the RELATIVE weight of the tokens in a
chunk, as in the release (a common scale of eta cancels).

Read-out goes through the UPDATED weights of its own chunk (update-then-apply,
as `ttt_jax.ops.ttt` does): non-causal inside a chunk, causal at chunk
granularity; outputs of chunk c depend on tokens of chunks <= c only. (The
release's LLM layer reads chunk c out before updating on it, apply-then-update,
strictly causal; its bidirectional layer updates on the whole sequence, then
applies.) A ragged last chunk is zero-padded with eta = 0, so padding never
updates.

Outer gradients are JAX autodiff through the scan over chunks (`scan_remat`,
which can checkpoint groups of chunks); inside a chunk only the inner
gradient is written out, its derivative (second order) is autodiff. The
fast-weight state and all chunk math run in fp32 (fp64 for fp64 inputs).

`LaCT` follows the release's bidirectional LaCT layer (minimal_implementations/),
chunked: SiLU'd q/k/v projections without bias, L2-normalised q and k,
learning rates eta = softplus(W_lr x + b + softplus^-1(base_lr)) (3 per head,
one per fast weight; base_lr at zero logits), learned initial fast weights
per head, per-head RMSNorm of the output, output projection without bias.
Split like `Mamba2` for head-sharded runs: `project`, the pure `lact`, `merge`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.layers.gated_deltanet import l2_normalize
from ttt_jax.layers.linear import dense
from ttt_jax.layers.mamba2 import check_positive, compute_dtype, rms_norm
from ttt_jax.layers.rope import apply_rope
from ttt_jax.layers.sliding_window import sequence_rope_angles
from ttt_jax.ops.ttt import scan_remat
from ttt_jax.parallel.sharding import constrain, param

Array = jax.Array

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # Muon's quintic Newton-Schulz coefficients
NS_EPS = 1e-7  # added to the Frobenius norm before the iteration (Muon's)
WEIGHT_NORM_EPS = 1e-5  # W / (||row|| + eps) * ||initial row||, as the release
NORM_EPS = 1e-5  # the output RMSNorm's eps (the release's nn.RMSNorm(eps=1e-5))
DEFAULT_BASE_LR = 1e-2  # the release's bidirectional layer (its LLM layers: 1e-3)


# ---------------------------------------------------------------- helpers ----
def frobenius_norm(x: Array) -> Array:
  """||x||_F over the last two axes (keepdims), with gradient 0, not NaN, at x = 0."""
  ss = jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)
  nonzero = ss > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, ss, 1.0)), 0.0)


def newton_schulz(g: Array, steps: int) -> Array:
  """Muon's orthogonalisation of matrices g [..., m, n]: `steps` quintic Newton-Schulz steps.

  x = g / (||g||_F + eps) has spectral norm <= 1; each step maps every
  singular value s to a s + b s^3 + c s^5, towards ~1 (those not tiny end in
  about [0.7, 1.2] after 5 steps), keeping the singular vectors. Runs on g^T
  when m > n, so that the Gram matrix is min(m, n) square. In g's dtype (the
  release: bf16; here the fp32 state).
  """
  a, b, c = NS_COEFFS
  tall = g.shape[-2] > g.shape[-1]
  x = jnp.swapaxes(g, -1, -2) if tall else g
  x = x / (frobenius_norm(x) + NS_EPS)
  for _ in range(steps):
    A = x @ jnp.swapaxes(x, -1, -2)  # [.., min(m, n), min(m, n)]
    x = a * x + (b * A + c * A @ A) @ x
  return jnp.swapaxes(x, -1, -2) if tall else x


def row_norms(w: Array) -> Array:
  """The norm of each row (output unit) of w [..., out, in]: [..., out, 1]."""
  return jnp.sqrt(jnp.sum(jnp.square(w), axis=-1, keepdims=True))


def renormalize(w: Array, norms: Array) -> Array:
  """Each row of w [..., out, in] rescaled to `norms` [..., out, 1] (LaCT's "weight norm")."""
  return w / (row_norms(w) + WEIGHT_NORM_EPS) * norms


def swiglu(W1: Array, W2: Array, W3: Array, x: Array) -> Array:
  """f(x) = W2 (silu(W1 x) * (W3 x)) for tokens x [..., C, d], W [..., F, d] / [..., d, F]."""
  hidden = jax.nn.silu(jnp.einsum("...cd,...fd->...cf", x, W1)) * jnp.einsum(
      "...cd,...fd->...cf", x, W3)
  return jnp.einsum("...cf,...df->...cd", hidden, W2)


def swiglu_loss_grads(W1: Array, W2: Array, W3: Array, k: Array, v: Array, eta: Array
                      ) -> tuple[Array, Array, Array]:
  """dL_i/dW_i of L_i = -sum_j eta_ij <f(k_j), v_j>, closed form (see the module docstring).

  k, v [..., C, d]; eta [..., C, 3] (for W1, W2, W3); W1, W3 [..., F, d], W2 [..., d, F].
  """
  P = jnp.einsum("...cd,...fd->...cf", k, W1)  # gate pre-activation [.., C, F]
  U = jnp.einsum("...cd,...fd->...cf", k, W3)  # up projection
  sig = jax.nn.sigmoid(P)
  act = P * sig  # silu(P)
  dhid = jnp.einsum("...cd,...df->...cf", v, W2)  # d<f, v>/d hidden, per token
  gW2 = -jnp.einsum("...cd,...cf->...df", eta[..., 1:2] * v, act * U)
  dP = dhid * U * sig * (1 + P * (1 - sig))  # through silu'
  gW1 = -jnp.einsum("...cf,...cd->...fd", dP, eta[..., 0:1] * k)
  gW3 = -jnp.einsum("...cf,...cd->...fd", dhid * act, eta[..., 2:3] * k)
  return gW1, gW2, gW3


def check_lact(q: Array, k: Array, v: Array, eta: Array, W1: Array, W2: Array, W3: Array
               ) -> None:
  Bt, L, H, d = q.shape if q.ndim == 4 else (None,) * 4
  F = W1.shape[-2] if W1.ndim == 3 else None
  ok = (q.ndim == 4 and k.shape == q.shape and v.shape == q.shape
        and eta.shape in ((Bt, L, H), (Bt, L, H, 3))
        and W1.shape == (H, F, d) and W3.shape == (H, F, d) and W2.shape == (H, d, F))
  if not ok:
    raise ValueError(f"lact takes q = k = v [B, L, H, d], eta [B, L, H] or [B, L, H, 3], "
                     f"W1 = W3 [H, F, d], W2 [H, d, F]; got q {q.shape}, k {k.shape}, "
                     f"v {v.shape}, eta {eta.shape}, W1 {W1.shape}, W2 {W2.shape}, "
                     f"W3 {W3.shape}")


# ------------------------------------------------------------------ core ----
def lact(q: Array, k: Array, v: Array, eta: Array, W1: Array, W2: Array, W3: Array, *,
         chunk_size: int, muon_steps: int = 0, remat_group: int | None = None,
         return_final_weights: bool = False) -> Array | tuple[Array, tuple[Array, ...]]:
  """LaCT with SwiGLU fast weights over chunks of C tokens: causal at chunk granularity.

  Args:
    q, k, v: [B, L, H, d] queries, keys, values of each head (the layer gives
      unit q and k).
    eta: [B, L, H, 3] per-token learning rates of W1, W2, W3, or [B, L, H]
      one for all three.
    W1, W3: [H, F, d] gate and up weights, W2: [H, d, F] down weights: the
      initial fast weights of each head (shared by the batch); their row
      norms are the ones every update is rescaled to.
    chunk_size: C, tokens per update (min(C, L) is used); L need not divide.
    muon_steps: Newton-Schulz steps on each gradient (0: plain gradient step).
    remat_group: checkpoint the chunk scan in groups of this many chunks
      (None: keep every chunk's residuals); see `scan_remat`.
    return_final_weights: also return (W1, W2, W3) [B, H, ...] after the last chunk.
  Returns:
    o [B, L, H, d] in v's dtype, and (if asked) the final fast weights in fp32.
  """
  check_lact(q, k, v, eta, W1, W2, W3)
  check_positive("lact", chunk_size=chunk_size)
  if not (isinstance(muon_steps, int) and muon_steps >= 0):
    raise ValueError(f"lact muon_steps must be an int >= 0, got {muon_steps!r}")
  Bt, L, H, d = q.shape
  C = min(chunk_size, L)
  nc = -(-L // C)
  f = compute_dtype(v.dtype)
  if eta.ndim == 3:
    eta = jnp.broadcast_to(eta[..., None], (*eta.shape, 3))

  # Scan axis first: [nc, B, H, C, ...], still in the input dtype (each step casts its chunk).
  # Padding tokens get eta = 0 (and k = v = 0): no gradient, the weights pass unchanged.
  def chunks(t: Array) -> Array:
    t = jnp.pad(t, [(0, 0), (0, nc * C - L)] + [(0, 0)] * (t.ndim - 2))
    return jnp.moveaxis(t.reshape(Bt, nc, C, H, *t.shape[3:]), (1, 3), (0, 2))

  weights = tuple(w.astype(f) for w in (W1, W2, W3))
  norms = tuple(row_norms(w) for w in weights)  # [H, out, 1], differentiated (as the release)

  def update(grads: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
    """The step of each weight: its gradient, or Muon's orthogonalised gradient. The three
    run as one batch of [F, d] matrices: NS commutes with transposition (W2's is [d, F])."""
    if not muon_steps:
      return grads
    gW1, gW2, gW3 = grads
    u = newton_schulz(jnp.stack([gW1, jnp.swapaxes(gW2, -1, -2), gW3]), muon_steps)
    return u[0], jnp.swapaxes(u[1], -1, -2), u[2]

  def step(W: tuple[Array, ...], xs: tuple[Array, ...]) -> tuple[tuple[Array, ...], Array]:
    """Chunk c: W_{c-1} [B, H, ...] -> (W_c, o = f(q; W_c) [B, H, C, d])."""
    qc, kc, vc, ec = (t.astype(f) for t in xs)
    deltas = update(swiglu_loss_grads(*W, kc, vc, ec))
    W = tuple(renormalize(w - u, n) for w, u, n in zip(W, deltas, norms))
    return W, swiglu(*W, qc)

  W0 = tuple(jnp.broadcast_to(w[None], (Bt, *w.shape)) for w in weights)
  final, o = scan_remat(step, W0, tuple(map(chunks, (q, k, v, eta))), remat_group)
  o = jnp.moveaxis(o, (0, 2), (1, 3)).reshape(Bt, nc * C, H, d)[:, :L].astype(v.dtype)
  return (o, final) if return_final_weights else o


def inverse_softplus(y: float) -> float:
  """x with softplus(x) = y > 0."""
  return y + math.log(-math.expm1(-y))


# ----------------------------------------------------------------- layer ----
class LaCT(nnx.Module):
  """LaCT over [B, L, D] with SwiGLU fast weights per head, causal at chunk granularity.

  Args:
    width: model width D (= num_heads * head_dim).
    num_heads: H fast-weight heads of d = D / H.
    chunk_size: C, tokens per fast-weight update.
    hidden_ratio: F = hidden_ratio * d, the fast SwiGLU's hidden width.
    muon_steps: Newton-Schulz steps per update (0: plain gradient steps).
    base_lr: the per-token learning rate at zero logits.
    rope_theta: 1-D RoPE on the unit q and k over positions 0..L-1 (the
      release's LLM layer); None (default): none, as the release's
      bidirectional layer (the chunk order already orders the updates).
    remat_group: checkpoint the chunk scan every this many chunks.
    dtype: compute dtype of projections and output; param_dtype: of the parameters.
      The fast weights and chunk math run in fp32.
  """

  def __init__(self, width: int, num_heads: int, *, chunk_size: int = 2048,
               hidden_ratio: int = 4, muon_steps: int = 5,
               base_lr: float = DEFAULT_BASE_LR, rope_theta: float | None = None,
               remat_group: int | None = None, norm_eps: float = NORM_EPS,
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    check_positive("LaCT", width=width, num_heads=num_heads, chunk_size=chunk_size,
                   hidden_ratio=hidden_ratio)
    if width % num_heads:
      raise ValueError(f"LaCT width {width} is not divisible by num_heads {num_heads}")
    if not (isinstance(muon_steps, int) and muon_steps >= 0):
      raise ValueError(f"LaCT muon_steps must be an int >= 0, got {muon_steps!r}")
    if not base_lr > 0:
      raise ValueError(f"LaCT base_lr must be > 0, got {base_lr}")
    if remat_group is not None:
      check_positive("LaCT", remat_group=remat_group)
    H, d = num_heads, width // num_heads
    if rope_theta is not None and d % 2:
      raise ValueError(f"LaCT RoPE needs an even head dim, got {d} (or pass rope_theta=None)")
    F = hidden_ratio * d
    self.width, self.num_heads, self.head_dim, self.hidden = width, H, d, F
    self.chunk_size, self.muon_steps, self.remat_group = chunk_size, muon_steps, remat_group
    self.lr_offset = inverse_softplus(base_lr)
    self.rope_theta, self.norm_eps, self.dtype = rope_theta, norm_eps, dtype

    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj, self.k_proj, self.v_proj = (dense(width, width, ("embed", "heads"),
                                                   use_bias=False, **kw) for _ in range(3))
    self.lr_proj = dense(width, 3 * H, ("embed", "heads"), **kw)  # head-major [H, 3]
    # Initial fast weights [H, out, in], N(0, 1 / fan_in) as the release.
    normal = lambda fan_in: nnx.initializers.normal(1 / math.sqrt(fan_in))
    fast = lambda fan_in, shape: param(normal(fan_in), rngs, shape, param_dtype,
                                       ("heads", "kv", "kv"))
    self.W1 = fast(d, (H, F, d))  # gate
    self.W2 = fast(F, (H, d, F))  # down
    self.W3 = fast(d, (H, F, d))  # up
    # Over the head dim, shared by the heads: 'kv', as attention's per-head QK norms.
    self.norm_weight = param(nnx.initializers.ones, rngs, (d,), param_dtype, ("kv",))
    self.out_proj = dense(width, width, ("heads", "embed"), use_bias=False, **kw)

  def fast_weights(self) -> tuple[Array, Array, Array]:
    return self.W1[...], self.W2[...], self.W3[...]

  def project(self, x: Array) -> tuple[Array, Array, Array, Array]:
    """x [B, L, D] -> the core's q, k (unit, rotated if RoPE), v [B, L, H, d], eta [B, L, H, 3].

    eta is fp32: softplus(W_lr x + b + softplus^-1(base_lr)), for W1, W2, W3.
    """
    Bt, L, _ = x.shape
    H, d = self.num_heads, self.head_dim
    heads = lambda proj: constrain(jax.nn.silu(proj(x)).reshape(Bt, L, H, d),
                                   "act_batch", "act_length", "act_heads", "act_kv")
    q = l2_normalize(heads(self.q_proj).astype(jnp.float32))
    k = l2_normalize(heads(self.k_proj).astype(jnp.float32))
    if self.rope_theta is not None:
      angles = sequence_rope_angles(L, d, self.rope_theta)
      q, k = apply_rope(q, angles), apply_rope(k, angles)
    logits = self.lr_proj(x).astype(jnp.float32).reshape(Bt, L, H, 3)
    eta = jax.nn.softplus(logits + self.lr_offset)
    return q.astype(x.dtype), k.astype(x.dtype), heads(self.v_proj), eta

  def core(self, q: Array, k: Array, v: Array, eta: Array, W1: Array, W2: Array, W3: Array
           ) -> Array:
    """The per-head part: `lact` with this layer's chunking, o [B, L, H, d].

    Activations [B, L, H, ...] and fast weights [H, ...]: heads are independent,
    so it runs head-sharded as is (e.g. `ttt_jax.parallel.context.heads_parallel`).
    """
    return lact(q, k, v, eta, W1, W2, W3, chunk_size=self.chunk_size,
                muon_steps=self.muon_steps, remat_group=self.remat_group)

  def merge(self, o: Array) -> Array:
    """o [B, L, H, d] -> [B, L, D]: RMSNorm per head, out_proj."""
    Bt, L, H, d = o.shape
    o = rms_norm(o.astype(jnp.float32), self.norm_weight[...].astype(jnp.float32), self.norm_eps)
    return self.out_proj(o.reshape(Bt, L, H * d).astype(self.dtype))

  def __call__(self, x: Array) -> Array:
    """x [B, L, D] -> [B, L, D], causal at chunk granularity along L."""
    if x.ndim != 3 or x.shape[-1] != self.width:
      raise ValueError(f"LaCT takes [B, L, {self.width}], got {x.shape}")
    return self.merge(self.core(*self.project(x), *self.fast_weights()))
