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
autoregressive), so the read-out goes straight through W_b; the summed
update is one [d, K] x [K, d] matmul per weight, never per-token weights.
The per-mini-batch math (with the hand-derived inner gradients) lives in
`ttt_jax.ttt_step`, shared with the Pallas kernels; this module scans it
over the mini-batches. Outer gradients: for TTT-Linear, JAX autodiff through
that `lax.scan`; for TTT-MLP, each scan step is a `jax.custom_vjp` whose
backward is written out by hand (`ttt_step.mlp_shifted_bwd`: the second-order
terms through LayerNorm and GELU derived once, instead of autodiff of the
hand-derived inner gradient), which is several times cheaper on CPU. The
TTT-MLP step is "shifted" (it reads out mini-batch b-1 and updates on
mini-batch b, both through W_{b-1}), so that the products with the same
weights run as one matmul.

Two inner models g:
  TTT-Linear  g(u) = u W + b                        W [d, d]
  TTT-MLP     g(u) = GELU_tanh(u W1 + b1) W2 + b2    W1 [d, 4d], W2 [4d, d]

Precision: the fast-weight state and all reductions are fp32 (fp64 if the
inputs are fp64); matmul operands are cast to `matmul_dtype` (e.g. bf16 on
accelerators) and accumulate in the state dtype. q, k, v and eta stay in
their input dtype in memory; each scan step casts its own mini-batch.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from ttt_jax.ttt_step import (LN_EPS, check_linear_weights, check_mlp_weights, check_tokens,
                              linear_step, matmul, mlp_readout, mlp_shifted_bwd, mlp_shifted_fwd)

Array = jax.Array
DType = Any


# ----------------------------------------------------------------------------
# Scan over mini-batches with activation checkpointing over groups.
# ----------------------------------------------------------------------------


def scan_remat(step: Callable, carry: Any, xs: Any, group: int | None) -> tuple[Any, Any]:
  """`lax.scan(step, carry, xs)`, rematerialised in groups of `group` steps.

  With a group size G only the carry at group boundaries is kept for the
  backward pass (NC / G states) plus one group's residuals while it is
  recomputed, instead of every step's residuals. NC need not divide by G:
  the groups are G steps long but the last, which has the remaining 1..G.
  The last group is not rematerialised: the backward pass starts with it,
  so keeping its residuals from the forward pass adds nothing to the peak
  (one group's residuals) and saves recomputing it.
  """
  if group is None:
    return lax.scan(step, carry, xs)
  if group < 1:
    raise ValueError(f"remat_group must be a positive int or None, got {group}")

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def run_group(c, xs_g):
    return lax.scan(step, c, xs_g)

  n = jax.tree.leaves(xs)[0].shape[0]
  n_head = (n - 1) // group * group  # all but the last group
  if not n_head:
    return lax.scan(step, carry, xs)
  head = jax.tree.map(lambda x: x[:n_head].reshape(n_head // group, group, *x.shape[1:]), xs)
  carry, ys_head = lax.scan(run_group, carry, head)
  carry, ys_tail = lax.scan(step, carry, jax.tree.map(lambda x: x[n_head:], xs))
  ys = jax.tree.map(lambda h, t: jnp.concatenate([h.reshape(n_head, *h.shape[2:]), t], axis=0),
                    ys_head, ys_tail)
  return carry, ys


def _sum_to(x: Array, shape: tuple[int, ...]) -> Array:
  """Sum x over the axes along which `shape` (same rank) was broadcast."""
  axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, shape)) if b == 1 and a != 1)
  return jnp.sum(x, axis=axes, keepdims=True) if axes else x


def custom_vjp_step(fwd: Callable, bwd: Callable, *, eps: float, mm: Callable) -> Callable:
  """step(state, inputs, ln_w, ln_b) -> (new state, z) from a `*_shifted_fwd`
  of `ttt_jax.ttt_step`, whose VJP is the hand-written `*_shifted_bwd`, not
  autodiff of the hand-derived inner gradient."""

  @jax.custom_vjp
  def step(state, inputs, ln_w, ln_b):
    return fwd(state, inputs, ln_w, ln_b, eps=eps, mm=mm)[0]

  def step_fwd(state, inputs, ln_w, ln_b):
    out, res = fwd(state, inputs, ln_w, ln_b, eps=eps, mm=mm)
    return out, (res, ln_w)

  def step_bwd(res, cts):
    res, ln_w = res
    dstate, dinputs, dln_w, dln_b = bwd(res, cts, ln_w, mm=mm)
    return dstate, dinputs, _sum_to(dln_w, ln_w.shape), _sum_to(dln_b, ln_w.shape)

  step.defvjp(step_fwd, step_bwd)
  return step


def _run_autodiff(step_fn, q, k, v, eta, ln_weight, ln_bias, weights, *, remat_group,
                  matmul_dtype, return_final_weights, eps):
  """Driver for a `ttt_jax.ttt_step` step differentiated by JAX autodiff.

  Broadcasts the state over B, scans over NC, restores the layout.
  """
  B = q.shape[0]
  state_dtype = jnp.promote_types(jnp.float32, q.dtype)
  matmul_dtype = state_dtype if matmul_dtype is None else matmul_dtype
  state = tuple(
      jnp.broadcast_to(w.astype(state_dtype)[None], (B, *w.shape)) for w in weights)
  # Scan axis first: [NC, B, H, K, d] (eta [NC, B, H, K, 1]), still in the input dtype:
  # each step casts its own mini-batch, so no fp32 copy of the whole sequence exists.
  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (q, k, v, eta[..., None]))
  step = functools.partial(
      step_fn,
      ln_w=ln_weight.astype(state_dtype)[None, :, None, :],  # [1, H, 1, d]
      ln_b=ln_bias.astype(state_dtype)[None, :, None, :],
      eps=eps,
      mm=matmul(matmul_dtype, state_dtype),
  )
  cast_step = lambda carry, x: step(carry, tuple(t.astype(state_dtype) for t in x))
  final, out = scan_remat(cast_step, state, xs, remat_group)
  out = jnp.moveaxis(out, 0, 2).astype(q.dtype)  # [B, H, NC, K, d]
  return (out, final) if return_final_weights else out


def _run_mlp(q, k, v, eta, ln_weight, ln_bias, weights, *, remat_group,
             matmul_dtype, return_final_weights, eps):
  """TTT-MLP driver: the shifted step with the hand-written VJP.

  Scan step b reads out mini-batch b-1 and updates on mini-batch b, both at
  W_{b-1} (see the shifted steps in `ttt_jax.ttt_step`): the queries go in
  one mini-batch late (step 0 reads out zeros, dropped), the last
  mini-batch is read out after the scan, and the scan carries W2 transposed.
  """
  B = q.shape[0]
  state_dtype = jnp.promote_types(jnp.float32, q.dtype)
  matmul_dtype = state_dtype if matmul_dtype is None else matmul_dtype
  mm = matmul(matmul_dtype, state_dtype)
  W1, b1, W2, b2 = (
      jnp.broadcast_to(w.astype(state_dtype)[None], (B, *w.shape)) for w in weights)
  state = (W1, b1, jnp.swapaxes(W2, -1, -2), b2)
  # Scan axis first: [NC, B, H, K, d] (eta [NC, B, H, K, 1]), still in the input dtype:
  # each step casts its own mini-batch, so no fp32 copy of the whole sequence exists.
  xq, xk, xv, xeta = (jnp.moveaxis(x, 2, 0) for x in (q, k, v, eta[..., None]))
  xq_late = jnp.concatenate([jnp.zeros_like(xq[:1]), xq[:-1]], axis=0)
  ln_w = ln_weight.astype(state_dtype)[None, :, None, :]  # [1, H, 1, d]
  ln_b = ln_bias.astype(state_dtype)[None, :, None, :]
  step = custom_vjp_step(mlp_shifted_fwd, mlp_shifted_bwd, eps=eps, mm=mm)
  cast_step = lambda carry, x: step(carry, tuple(t.astype(state_dtype) for t in x), ln_w, ln_b)
  final, out = scan_remat(cast_step, state, (xq_late, xk, xv, xeta), remat_group)
  W1, b1, W2t, b2 = final
  final = (W1, b1, jnp.swapaxes(W2t, -1, -2), b2)
  last = mlp_readout(final, xq[-1].astype(state_dtype), ln_w, ln_b, eps=eps, mm=mm)
  out = jnp.concatenate([out[1:], last[None]], axis=0)
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
  B, H, NC, K, d = check_tokens(q, k, v, eta, ln_weight, ln_bias)
  check_linear_weights(H, d, W, b)
  return _run_autodiff(linear_step, q, k, v, eta, ln_weight, ln_bias, (W, b),
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
  B, H, NC, K, d = check_tokens(q, k, v, eta, ln_weight, ln_bias)
  check_mlp_weights(H, d, W1, b1, W2, b2)
  return _run_mlp(q, k, v, eta, ln_weight, ln_bias, (W1, b1, W2, b2),
                  remat_group=remat_group, matmul_dtype=matmul_dtype,
                  return_final_weights=return_final_weights, eps=eps)
