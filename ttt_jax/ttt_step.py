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


# ----------------------------------------------------------------------------
# TTT-MLP step with a hand-written VJP, for the XLA scan (`ttt_jax.ops.ttt`).
#
# Autodiff of `step` over `mlp_update` / `mlp_readout` differentiates the hand-derived inner gradient again
# (second order through LayerNorm and GELU) and leaves XLA a long chain of
# small elementwise ops, with transposes inside some. The functions below do
# the same math with the second-order terms derived by hand: the forward
# returns what the backward needs and the backward reuses it. (The kernels in
# pallas_kernels/ keep using `jax.vjp` of the functions above; nothing above
# this section changed.)
# ----------------------------------------------------------------------------


def gelu_tanh_derivs(x: Array) -> tuple[Array, Array, Array]:
  """`gelu_tanh`, its first and its second derivative, sharing one tanh."""
  x_sq = x * x
  t = jnp.tanh(_SQRT_2_OVER_PI * (x + _GELU_C * x * x_sq))
  du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * x_sq)
  sech2 = 1.0 - t * t
  half_x = 0.5 * x
  gelu = half_x * (1.0 + t)
  grad = 0.5 * (1.0 + t) + half_x * sech2 * du
  # d/dx [0.5 (1 + t) + 0.5 x (1 - t^2) du] with dt/dx = (1 - t^2) du.
  grad2 = sech2 * (du - x * t * du * du + (3.0 * _GELU_C * _SQRT_2_OVER_PI) * x_sq)
  return gelu, grad, grad2


def _sum_tokens(x: Array) -> Array:
  return jnp.sum(x, axis=-2, keepdims=True)


def _mean_features(x: Array) -> Array:
  return jnp.mean(x, axis=-1, keepdims=True)


def ln_fit_fwd(z, xk, xv, eta, ln_w, ln_b, *, eps):
  """e = eta * d/dz 1/2 ||LN(z) - (xv - xk)||^2 per token, and its residuals.

  The same quantity as `eta * layer_norm_vjp(LN(z) - (xv - xk), ...)` in the
  update functions above: with g = ln_w r, r = LN(z) - (xv - xk),
    h = (g - mean(g) - x_hat mean(g x_hat)) / std,   e = eta h.
  """
  y, x_hat, std = layer_norm_fwd(z, ln_w, ln_b, eps)
  r = y - (xv - xk)
  g = ln_w * r
  mg, mgx = _row_means(g, g * x_hat)
  h = (g - mg - x_hat * mgx) / std
  return eta * h, (x_hat, std, r, h, mgx, eta)


def ln_fit_e(res):
  """e of `ln_fit_fwd` from its residuals."""
  h, eta = res[3], res[5]
  return eta * h


def _row_means(*xs: Array) -> tuple[Array, ...]:
  """Means over the last axis of same-shaped arrays, as one stacked reduction."""
  return tuple(jnp.mean(jnp.stack(xs), axis=-1, keepdims=True))


def ln_fit_bwd(res, de, ln_w):
  """VJP of `ln_fit_fwd` for the cotangent de of e.

  Returns (dz, dr, deta, dln_w, dln_b); dr is the cotangent of r = LN(z) -
  (xv - xk) (so dxk += dr, dxv = -dr); dln_w and dln_b are per token (the
  caller sums them over tokens and batch axes).
  """
  x_hat, std, r, h, mgx, eta = res
  n = x_hat.shape[-1]
  inv = 1.0 / std
  m_deh, m_dex, m_de = _row_means(de * h, de * x_hat, de)
  deta = n * m_deh
  dh = eta * de
  a = eta * m_dex  # mean(dh x_hat)
  # h = P(g) / std with the projection P(u) = u - mean(u) - x_hat mean(u x_hat)
  # (self-adjoint): through g, through P's x_hat, and through 1 / std.
  dg = (dh - eta * m_de - x_hat * a) * inv
  dstd = -eta * deta * inv  # -sum(dh h) / std
  dr = ln_w * dg
  dx_hat = ln_w * dr - (dh * mgx + ln_w * r * a) * inv
  # x_hat = (z - mu) / std and std = sqrt(var + eps) as functions of z.
  m_dx, m_dxx = _row_means(dx_hat, dx_hat * x_hat)
  dz = (dx_hat - m_dx - x_hat * m_dxx) * inv + dstd * x_hat / n
  return dz, dr, deta, dg * r + dr * x_hat, dr


def _cat_tokens(*xs: Array) -> Array:
  return jnp.concatenate(xs, axis=-2)


def _tokens_last(x: Array) -> Array:
  """x [..., K, c] -> [..., c, K], materialised.

  For products that contract over tokens (x^T y): XLA would fold a plain
  transpose into the dot, which on CPU then runs as a slower transposed-lhs
  matmul; the barrier keeps the (small) transposed copy, so the dot is a
  plain row-major [c, K] x [K, F] product.
  """
  return lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


# A "shifted" step reads out mini-batch b-1 and takes the gradient step on
# mini-batch b: both go through the same weights W_{b-1}, so each product with
# those weights runs once on the K queries and K keys stacked ([2K, d] rows),
# and in the backward the weight gradients of the read-out and of the update
# come out of one matmul whose contraction runs over both. The scan carries
# W_{b-1} -> W_b and emits z_{b-1}; `ttt_jax.ops.ttt` feeds it the queries one
# mini-batch late and reads out the last mini-batch after the scan.
#
#   shifted_fwd(state, (xq_{b-1}, xk_b, xv_b, eta_b), ln_w, ln_b, *, eps, mm)
#       -> ((W_b, z_{b-1}), residuals)
#   shifted_bwd(residuals, (dW_b, dz_{b-1}), ln_w, *, mm)
#       -> (dW_{b-1}, (dxq, dxk, dxv, deta), dln_w, dln_b)
# with the LayerNorm cotangents per token (the caller sums them). The state
# carries W2 transposed, W2t [..., d, F], so that every product is a
# [rows, d] x [d, F] or a [rows, F] x [d, F]^T matmul and every weight
# gradient a [d, rows] x [rows, F] one, the forms XLA's CPU matmuls run fastest.


def mlp_shifted_fwd(state, inputs, ln_w, ln_b, *, eps, mm):
  """TTT-MLP shifted step: `mlp_readout` at W_{b-1}, then `mlp_update`; W2 as W2t."""
  W1, b1, W2t, b2 = state
  xq, xk, xv, eta = inputs
  K = xq.shape[-2]
  z1_all = mm("...kd,...df->...kf", _cat_tokens(xq, xk), W1) + b1  # [..., 2K, F]
  # One tanh per element for GELU and its derivative (XLA would recompute it in
  # each consumer): t = tanh(sqrt(2/pi) (z + 0.044715 z^3)), materialised.
  t = lax.optimization_barrier(jnp.tanh(_SQRT_2_OVER_PI * (z1_all + _GELU_C * z1_all**3)))
  x2_all = 0.5 * z1_all * (1.0 + t)  # = gelu_tanh(z1_all)
  z2_all = mm("...kf,...df->...kd", x2_all, W2t) + b2
  yq, xq_hat, q_std = layer_norm_fwd(z2_all[..., :K, :], ln_w, ln_b, eps)
  e2, fit_res = ln_fit_fwd(z2_all[..., K:, :], xk, xv, eta, ln_w, ln_b, eps=eps)
  p = mm("...kd,...df->...kf", e2, W2t)
  z1, t1 = z1_all[..., K:, :], t[..., K:, :]
  e1 = p * (0.5 * (1.0 + t1) + 0.5 * z1 * (1.0 - t1 * t1)
            * (_SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_C * z1 * z1)))  # p * gelu_tanh_grad(z1)
  new = (W1 - mm("...dk,...kf->...df", _tokens_last(xk), e1), b1 - _sum_tokens(e1),
         W2t - mm("...dk,...kf->...df", _tokens_last(e2), x2_all[..., K:, :]),
         b2 - _sum_tokens(e2))
  # Of the [K, F]-sized intermediates only z1 and p are kept; the GELU terms
  # are recomputed in the backward (cheaper than storing and reloading them).
  return (new, xq + yq), (W1, W2t, xq, xk, z1_all, p, fit_res, xq_hat, q_std)


def mlp_shifted_bwd(res, cts, ln_w, *, mm):
  """VJP of `mlp_shifted_fwd` (see the comment above)."""
  W1, W2t, xq, xk, z1_all, p, fit_res, xq_hat, q_std = res
  (dW1, db1, dW2t, db2), dout = cts
  K = dout.shape[-2]
  e2 = ln_fit_e(fit_res)
  x2_all, gp_all, gpp_all = gelu_tanh_derivs(z1_all)
  x2, gpq, gp, gpp = x2_all[..., K:, :], gp_all[..., :K, :], gp_all[..., K:, :], gpp_all[..., K:, :]
  gq = ln_w * dout
  m_gq, m_gqx = _row_means(gq, gq * xq_hat)
  dzq2 = (gq - m_gq - xq_hat * m_gqx) / q_std  # = layer_norm_vjp(dout, xq_hat, q_std, ln_w)
  # Update: the cotangents of G1 = xk^T e1, sum e1, G2 = x2^T e2, sum e2 are
  # -(dW1, db1, dW2, db2); e1 = p * GELU'(z1) with p = e2 W2^T.
  de1 = -(mm("...kd,...df->...kf", xk, dW1) + db1)
  dp = de1 * gp
  de2 = mm("...kf,...df->...kd", dp, W2t) - (mm("...kf,...df->...kd", x2, dW2t) + db2)
  dz2, dr, deta, dlnw, dlnb = ln_fit_bwd(fit_res, de2, ln_w)
  # z2 = GELU(z1) W2 + b2 and z1 = x W1 + b1 for the queries and keys together.
  dz2_all = _cat_tokens(dzq2, dz2)
  dx2_all = mm("...kd,...df->...kf", dz2_all, W2t)
  dx2 = dx2_all[..., K:, :] - mm("...kd,...df->...kf", e2, dW2t)
  dz1_all = _cat_tokens(dx2_all[..., :K, :] * gpq, dx2 * gp + de1 * p * gpp)
  dx_all = mm("...kf,...df->...kd", dz1_all, W1)
  dxk = dx_all[..., K:, :] + dr - mm("...kf,...df->...kd", p * gp, dW1)
  dW1 = dW1 + mm("...dk,...kf->...df", _tokens_last(_cat_tokens(xq, xk)), dz1_all)
  dW2t = (dW2t + mm("...dk,...kf->...df", _tokens_last(dz2_all), x2_all)
          + mm("...dk,...kf->...df", _tokens_last(e2), dp))
  dstate = (dW1, db1 + _sum_tokens(dz1_all), dW2t, db2 + _sum_tokens(dz2_all))
  return (dstate, (dout + dx_all[..., :K, :], dxk, -dr, deta),
          dout * xq_hat + dlnw, dout + dlnb)
