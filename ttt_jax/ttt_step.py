"""The per-mini-batch math of the TTT inner loop, shared by every implementation.

One mini-batch b of K tokens (keys k_j, values v_j, queries q_j, per-token
inner learning rates eta_j) takes one gradient step of the fast weights W
and reads every query out through the updated weights:

    l_j(W)  = 1/2 || LN(g(k_j; W)) - (v_j - k_j) ||^2          inner loss
    W_b     = W_{b-1} - sum_j eta_j grad_W l_j(W_{b-1})          one GD step
    z_j     = f(q_j; W_b) = q_j + LN(g(q_j; W_b))                read-out

with the per-head LayerNorm LN (eps `LN_EPS`) and the inner model g:
  TTT-Linear  g(u) = u W + b                        W [d, d]
  TTT-MLP     g(u) = GELU_tanh(u W1 + b1) W2 + b2    W1 [d, F], W2 [F, d]

The inner gradients are derived by hand (LayerNorm and tanh-GELU backward
below). Any leading axes of the arrays are batch axes: [B, H] in the XLA
scan (`ttt_jax.ops.ttt`), none inside a Pallas kernel (`pallas_kernels`).
Both import this module and nothing else of each other, so the import graph
has no cycle: ops -> kernels -> ttt_step, ops -> ttt_step.

Also here: the shape checks of the inner loop's arguments, which the XLA op
and the kernels apply alike.
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


def matmul(matmul_dtype: DType, acc_dtype: DType) -> Callable[..., Array]:
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


def linear_update(state, xk, xv, eta, ln_w, ln_b, *, eps, mm):
  """TTT-Linear g(u) = u W + b: sum_j eta_j grad l_j at `state`, per weight."""
  W, b = state  # [..., d, d], [..., 1, d]
  z = mm("...kd,...de->...ke", xk, W) + b  # [..., K, d]
  y, x_hat, std = layer_norm_fwd(z, ln_w, ln_b, eps)
  eg = eta * layer_norm_vjp(y - (xv - xk), x_hat, std, ln_w)  # eta_j grad_z l_j
  return mm("...kd,...ke->...de", xk, eg), jnp.sum(eg, axis=-2, keepdims=True)


def linear_readout(state, xq, ln_w, ln_b, *, eps, mm):
  """f(q; W) = q + LN(q W + b): [..., K, d]."""
  W, b = state
  return xq + layer_norm_fwd(mm("...kd,...de->...ke", xq, W) + b, ln_w, ln_b, eps)[0]


def mlp_update(state, xk, xv, eta, ln_w, ln_b, *, eps, mm):
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


def mlp_readout(state, xq, ln_w, ln_b, *, eps, mm):
  """f(q; W) = q + LN(GELU_tanh(q W1 + b1) W2 + b2): [..., K, d]."""
  W1, b1, W2, b2 = state
  x2 = gelu_tanh(mm("...kd,...df->...kf", xq, W1) + b1)
  return xq + layer_norm_fwd(mm("...kf,...fd->...kd", x2, W2) + b2, ln_w, ln_b, eps)[0]


def step(update, readout, state, inputs, *, ln_w, ln_b, eps, mm):
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


linear_step = functools.partial(step, linear_update, linear_readout)
mlp_step = functools.partial(step, mlp_update, mlp_readout)



# ----------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------


def check_array(name: str, x: Array, shape: Sequence[int], layout: str) -> None:
  if tuple(x.shape) != tuple(shape):
    raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)} {layout}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")


def check_tokens(q, k, v, eta, ln_weight, ln_bias) -> tuple[int, int, int, int, int]:
  if q.ndim != 5:
    raise ValueError(f"q has shape {tuple(q.shape)}, expected rank 5 [B, H, NC, K, d]")
  B, H, NC, K, d = q.shape
  check_array("k", k, q.shape, "[B, H, NC, K, d] like q")
  check_array("v", v, q.shape, "[B, H, NC, K, d] like q")
  check_array("eta", eta, (B, H, NC, K), "[B, H, NC, K]")
  check_array("ln_weight", ln_weight, (H, d), "[H, d]")
  check_array("ln_bias", ln_bias, (H, d), "[H, d]")
  return B, H, NC, K, d


def check_linear_weights(H: int, d: int, W: Array, b: Array) -> None:
  """TTT-Linear fast weights: W [H, d, d], b [H, 1, d]."""
  check_array("W", W, (H, d, d), "[H, d, d]")
  check_array("b", b, (H, 1, d), "[H, 1, d]")


def check_mlp_weights(H: int, d: int, W1: Array, b1: Array, W2: Array, b2: Array) -> int:
  """TTT-MLP fast weights: W1 [H, d, F], b1 [H, 1, F], W2 [H, F, d], b2 [H, 1, d]; returns F."""
  if W1.ndim != 3:
    raise ValueError(f"W1 has shape {tuple(W1.shape)}, expected rank 3 [H, d, F]")
  F = W1.shape[-1]
  check_array("W1", W1, (H, d, F), "[H, d, F]")
  check_array("b1", b1, (H, 1, F), "[H, 1, F]")
  check_array("W2", W2, (H, F, d), "[H, F, d]")
  check_array("b2", b2, (H, 1, d), "[H, 1, d]")
  return F

