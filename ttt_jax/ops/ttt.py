"""The TTT inner loop (Dalal et al. 2025, Sec. 2; Sun et al. 2024).

Every head carries a small "fast" model f(u; W) = u + LN(g(u; W)) whose
weights W are trained while the sequence is read. The sequence arrives as NC
mini-batches of K tokens. For mini-batch b with keys k_j, values v_j,
queries q_j and per-token inner learning rates eta_j:

    l_j(W)  = 1/2 || LN(g(k_j; W)) - (v_j - k_j) ||^2          inner loss
    W_b     = W_{b-1} - sum_j eta_j grad_W l_j(W_{b-1})          one GD step
    z_j     = f(q_j; W_b)                                         read-out

The read-out is NON-causal inside a mini-batch: every token of mini-batch b
sees W_b, the weights after the whole mini-batch's step (video is not
autoregressive), so the read-out goes straight through W_b (see `_step`);
the summed update is one [d, K] x [K, d] matmul per weight, never per-token
weights. The gradients of the inner loss are derived by hand
(LayerNorm and tanh-GELU backward below); outer gradients come from JAX
autodiff through the `lax.scan` over mini-batches.

Two inner models g:
  TTT-Linear  g(u) = u W + b                        W [d, d]
  TTT-MLP     g(u) = GELU_tanh(u W1 + b1) W2 + b2    W1 [d, 4d], W2 [4d, d]

Precision: the fast-weight state and all reductions are fp32 (fp64 if the
inputs are fp64); matmul operands are cast to `matmul_dtype` (e.g. bf16 on
accelerators) and accumulate in the state dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
DType = Any

LN_EPS = 1e-8  # epsilon of the per-head LayerNorm inside the op


# ----------------------------------------------------------------------------
# Hand-derived pieces of the inner gradient.
# ----------------------------------------------------------------------------


def layer_norm_fwd(
    z: Array, weight: Array, bias: Array, eps: float = LN_EPS
) -> tuple[Array, Array, Array]:
  """LayerNorm over the last axis; also returns x_hat and std for the VJP."""
  mu = jnp.mean(z, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(z - mu), axis=-1, keepdims=True)
  std = jnp.sqrt(var + eps)
  x_hat = (z - mu) / std
  return weight * x_hat + bias, x_hat, std


def layer_norm_vjp(g_y: Array, x_hat: Array, std: Array, weight: Array) -> Array:
  """d/dz of <g_y, LN(z)>: the input gradient of LayerNorm.

  With g = weight * g_y and n features:
    dz = (n g - sum(g) - x_hat sum(g x_hat)) / (n std).
  """
  n = x_hat.shape[-1]
  g = weight * g_y
  return (
      n * g
      - jnp.sum(g, axis=-1, keepdims=True)
      - x_hat * jnp.sum(g * x_hat, axis=-1, keepdims=True)
  ) / (n * std)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_C = 0.044715


def gelu_tanh(x: Array) -> Array:
  """GELU, tanh approximation (same as jax.nn.gelu(approximate=True))."""
  return 0.5 * x * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + _GELU_C * x**3)))


def gelu_tanh_grad(x: Array) -> Array:
  """Closed-form derivative of `gelu_tanh`."""
  u = _SQRT_2_OVER_PI * (x + _GELU_C * x**3)
  t = jnp.tanh(u)
  du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * x**2)
  return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du


# ----------------------------------------------------------------------------
# One mini-batch step of each inner model. Any leading axes are batch axes:
# [B, H] in the XLA scan, none inside a Pallas kernel (pallas_kernels/).
# ----------------------------------------------------------------------------


def _matmul(matmul_dtype: DType, acc_dtype: DType) -> Callable[..., Array]:
  """einsum with operands in `matmul_dtype`, accumulated in `acc_dtype`."""
  full = jnp.dtype(matmul_dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))
  precision = lax.Precision.HIGHEST if full else lax.Precision.DEFAULT

  def mm(spec: str, a: Array, b: Array) -> Array:
    return jnp.einsum(
        spec,
        a.astype(matmul_dtype),
        b.astype(matmul_dtype),
        precision=precision,
        preferred_element_type=acc_dtype,
    )

  return mm


def _linear_update(state, xk, xv, eta, ln_w, ln_b, *, eps, mm):
  """TTT-Linear g(u) = u W + b: sum_j eta_j grad l_j at `state`, per weight."""
  W, b = state  # [..., d, d], [..., 1, d]
  z = mm("...kd,...de->...ke", xk, W) + b  # [..., K, d]
  y, x_hat, std = layer_norm_fwd(z, ln_w, ln_b, eps)
  eg = eta * layer_norm_vjp(y - (xv - xk), x_hat, std, ln_w)  # eta_j grad_z l_j
  return mm("...kd,...ke->...de", xk, eg), jnp.sum(eg, axis=-2, keepdims=True)


def _linear_readout(state, xq, ln_w, ln_b, *, eps, mm):
  """f(q; W) = q + LN(q W + b): [..., K, d]."""
  W, b = state
  return xq + layer_norm_fwd(mm("...kd,...de->...ke", xq, W) + b, ln_w, ln_b, eps)[0]


def _mlp_update(state, xk, xv, eta, ln_w, ln_b, *, eps, mm):
  """TTT-MLP g(u) = GELU_tanh(u W1 + b1) W2 + b2: sum_j eta_j grad l_j."""
  W1, b1, W2, b2 = state  # [..., d, F], [..., 1, F], [..., F, d], [..., 1, d]
  z1 = mm("...kd,...df->...kf", xk, W1) + b1  # [..., K, F]
  x2 = gelu_tanh(z1)
  z2 = mm("...kf,...fd->...kd", x2, W2) + b2  # [..., K, d]
  y, x_hat, std = layer_norm_fwd(z2, ln_w, ln_b, eps)
  e2 = eta * layer_norm_vjp(y - (xv - xk), x_hat, std, ln_w)  # [..., K, d]
  e1 = mm("...kd,...fd->...kf", e2, W2) * gelu_tanh_grad(z1)  # [..., K, F]
  sum_k = lambda e: jnp.sum(e, axis=-2, keepdims=True)
  return (mm("...kd,...kf->...df", xk, e1), sum_k(e1),
          mm("...kf,...kd->...fd", x2, e2), sum_k(e2))


def _mlp_readout(state, xq, ln_w, ln_b, *, eps, mm):
  """f(q; W) = q + LN(GELU_tanh(q W1 + b1) W2 + b2): [..., K, d]."""
  W1, b1, W2, b2 = state
  x2 = gelu_tanh(mm("...kd,...df->...kf", xq, W1) + b1)
  return xq + layer_norm_fwd(mm("...kf,...fd->...kd", x2, W2) + b2, ln_w, ln_b, eps)[0]


def _step(update, readout, state, inputs, *, ln_w, ln_b, eps, mm):
  """One mini-batch: W_b = W_{b-1} - sum_j eta_j grad l_j(W_{b-1}); z = f(q; W_b).

  Every token's gradient is taken at W_{b-1} and all K queries are read out
  through W_b, so the step splits into a sum of per-token terms (`update`)
  and a per-token read-out (`readout`): kernels may cut a mini-batch into
  tiles of tokens and run either part tile by tile. Reading out through the
  updated weights directly costs K d F multiply-adds per layer, the same as
  the "dual form" q W - (q k^T)(eta grad) would spend on q W alone; the dual
  form's K x K products only pay off for a causal read-out inside the
  mini-batch, which video TTT does not use.
  """
  xq, xk, xv, eta = inputs  # [..., K, d] x3, [..., K, 1]
  grads = update(state, xk, xv, eta, ln_w, ln_b, eps=eps, mm=mm)
  new_state = tuple(w - g for w, g in zip(state, grads))
  return new_state, readout(new_state, xq, ln_w, ln_b, eps=eps, mm=mm)


_linear_step = functools.partial(_step, _linear_update, _linear_readout)
_mlp_step = functools.partial(_step, _mlp_update, _mlp_readout)


# ----------------------------------------------------------------------------
# Scan over mini-batches with activation checkpointing over groups.
# ----------------------------------------------------------------------------


def scan_remat(step: Callable, carry: Any, xs: Any, group: int | None) -> tuple[Any, Any]:
  """`lax.scan(step, carry, xs)`, rematerialised in groups of `group` steps.

  With a group size G only the carry at group boundaries is kept for the
  backward pass (NC / G states) plus one group's residuals while it is
  recomputed, instead of every step's residuals. NC need not divide by G:
  the last, shorter group is its own checkpointed scan.
  """
  if group is None:
    return lax.scan(step, carry, xs)
  if group < 1:
    raise ValueError(f"remat_group must be a positive int or None, got {group}")

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def run_group(c, xs_g):
    return lax.scan(step, c, xs_g)

  n = jax.tree.leaves(xs)[0].shape[0]
  n_full = (n // group) * group
  ys_parts = []
  if n_full:
    head = jax.tree.map(lambda x: x[:n_full].reshape(n_full // group, group, *x.shape[1:]), xs)
    carry, ys = lax.scan(run_group, carry, head)
    ys_parts.append(jax.tree.map(lambda y: y.reshape(n_full, *y.shape[2:]), ys))
  if n_full < n:
    carry, ys = run_group(carry, jax.tree.map(lambda x: x[n_full:], xs))
    ys_parts.append(ys)
  ys = ys_parts[0] if len(ys_parts) == 1 else jax.tree.map(
      lambda *p: jnp.concatenate(p, axis=0), *ys_parts)
  return carry, ys


# ----------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------


def _check(name: str, x: Array, shape: Sequence[int], layout: str) -> None:
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} {layout}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")


def _check_tokens(q, k, v, eta, ln_weight, ln_bias) -> tuple[int, int, int, int, int]:
  if q.ndim != 5:
    raise ValueError(f"q has shape {tuple(q.shape)}, expected rank 5 [B, H, NC, K, d]")
  B, H, NC, K, d = q.shape
  _check("k", k, q.shape, "[B, H, NC, K, d] like q")
  _check("v", v, q.shape, "[B, H, NC, K, d] like q")
  _check("eta", eta, (B, H, NC, K), "[B, H, NC, K]")
  _check("ln_weight", ln_weight, (H, d), "[H, d]")
  _check("ln_bias", ln_bias, (H, d), "[H, d]")
  return B, H, NC, K, d


def check_linear_weights(H: int, d: int, W: Array, b: Array) -> None:
  """TTT-Linear fast weights: W [H, d, d], b [H, 1, d]."""
  _check("W", W, (H, d, d), "[H, d, d]")
  _check("b", b, (H, 1, d), "[H, 1, d]")


def check_mlp_weights(H: int, d: int, W1: Array, b1: Array, W2: Array, b2: Array) -> int:
  """TTT-MLP fast weights: W1 [H, d, F], b1 [H, 1, F], W2 [H, F, d], b2 [H, 1, d]; returns F."""
  if W1.ndim != 3:
    raise ValueError(f"W1 has shape {tuple(W1.shape)}, expected rank 3 [H, d, F]")
  F = W1.shape[-1]
  _check("W1", W1, (H, d, F), "[H, d, F]")
  _check("b1", b1, (H, 1, F), "[H, 1, F]")
  _check("W2", W2, (H, F, d), "[H, F, d]")
  _check("b2", b2, (H, 1, d), "[H, 1, d]")
  return F


def _run(step_fn, q, k, v, eta, ln_weight, ln_bias, weights, *, remat_group,
         matmul_dtype, return_final_weights, eps):
  """Shared driver: broadcast state over B, scan over NC, restore layout."""
  B = q.shape[0]
  state_dtype = jnp.promote_types(jnp.float32, q.dtype)
  matmul_dtype = state_dtype if matmul_dtype is None else matmul_dtype
  state = tuple(
      jnp.broadcast_to(w.astype(state_dtype)[None], (B, *w.shape)) for w in weights)
  # Scan axis first: [NC, B, H, K, d] (eta [NC, B, H, K, 1]).
  xs = tuple(jnp.moveaxis(x.astype(state_dtype), 2, 0) for x in (q, k, v, eta[..., None]))
  step = functools.partial(
      step_fn,
      ln_w=ln_weight.astype(state_dtype)[None, :, None, :],  # [1, H, 1, d]
      ln_b=ln_bias.astype(state_dtype)[None, :, None, :],
      eps=eps,
      mm=_matmul(matmul_dtype, state_dtype),
  )
  final, out = scan_remat(step, state, xs, remat_group)
  out = jnp.moveaxis(out, 0, 2).astype(q.dtype)  # [B, H, NC, K, d]
  return (out, final) if return_final_weights else out


def ttt_linear(
    q: Array, k: Array, v: Array, eta: Array,
    ln_weight: Array, ln_bias: Array, W: Array, b: Array,
    *,
    remat_group: int | None = None,
    matmul_dtype: DType | None = None,
    return_final_weights: bool = False,
    eps: float = LN_EPS,
):
  """TTT-Linear inner loop over NC mini-batches of K tokens, every head.

  Args:
    q, k, v: [B, H, NC, K, d] queries, keys and values of each head.
    eta: [B, H, NC, K] per-token inner learning rates.
    ln_weight, ln_bias: [H, d] the per-head inner LayerNorm.
    W: [H, d, d], b: [H, 1, d] initial fast weights of each head.
    remat_group: checkpoint the scan in groups of this many mini-batches
      (None: keep every step's residuals).
    matmul_dtype: dtype of matmul operands (None: the fp32 state dtype).
    return_final_weights: also return the fast weights after the last step.
    eps: LayerNorm epsilon.

  Returns:
    z [B, H, NC, K, d], and if asked (W [B, H, d, d], b [B, H, 1, d]).
  """
  B, H, NC, K, d = _check_tokens(q, k, v, eta, ln_weight, ln_bias)
  check_linear_weights(H, d, W, b)
  return _run(_linear_step, q, k, v, eta, ln_weight, ln_bias, (W, b),
              remat_group=remat_group, matmul_dtype=matmul_dtype,
              return_final_weights=return_final_weights, eps=eps)


def ttt_mlp(
    q: Array, k: Array, v: Array, eta: Array,
    ln_weight: Array, ln_bias: Array,
    W1: Array, b1: Array, W2: Array, b2: Array,
    *,
    remat_group: int | None = None,
    matmul_dtype: DType | None = None,
    return_final_weights: bool = False,
    eps: float = LN_EPS,
):
  """TTT-MLP inner loop; like `ttt_linear` with a two-layer GELU inner model.

  Args:
    W1: [H, d, F], b1: [H, 1, F], W2: [H, F, d], b2: [H, 1, d] initial fast
      weights (F = 4d in the paper; any hidden width works).
    (the rest as in `ttt_linear`)

  Returns:
    z [B, H, NC, K, d], and if asked the final (W1, b1, W2, b2) with a
    leading batch axis.
  """
  B, H, NC, K, d = _check_tokens(q, k, v, eta, ln_weight, ln_bias)
  check_mlp_weights(H, d, W1, b1, W2, b2)
  return _run(_mlp_step, q, k, v, eta, ln_weight, ln_bias, (W1, b1, W2, b2),
              remat_group=remat_group, matmul_dtype=matmul_dtype,
              return_final_weights=return_final_weights, eps=eps)
