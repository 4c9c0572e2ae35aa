"""What the TPU and GPU TTT kernels share: inner models, matmul, custom_vjp.

Both backends run the op's own per-mini-batch math from `ttt_jax.ttt_step`
(one definition of each inner model, traced inside the kernels on plain 2-D
tiles, through `pallas_kernels.minibatch`), save the fast weights every G-th
mini-batch starts from in the forward, and walk the mini-batches backwards
in a second kernel. What differs is the memory hierarchy, hence the layout
and the loops; this module holds the rest.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from ttt_jax.ttt_step import linear_readout, linear_update, matmul, mlp_readout, mlp_update

Array = jax.Array
DType = Any

F32 = jnp.dtype(jnp.float32)
BF16 = jnp.dtype(jnp.bfloat16)
# dtypes the kernels read and write natively; other token dtypes (f16, or f64
# for k/v when q is not f64) are cast to fp32 by the wrappers, which is exact
# for f16 and what the op does anyway.
KERNEL_DTYPES = (F32, BF16)
MATMUL_DTYPES = (F32, BF16)


@dataclasses.dataclass(frozen=True)
class InnerModel:
  """An inner model as the kernels see it: the op's two halves of a step.

  update(weights, xk, xv, eta, ln_w, ln_b, *, eps, mm) -> per-weight sums of
    eta_j grad l_j over the tokens given (a sum over tokens: any split of a
    mini-batch into tiles adds up to the whole).
  readout(weights, xq, ln_w, ln_b, *, eps, mm) -> f(q; weights) per token.
  """
  name: str  # the op's name: "ttt_linear" / "ttt_mlp"
  update: Callable[..., Any]
  readout: Callable[..., Any]


LINEAR = InnerModel("ttt_linear", linear_update, linear_readout)
MLP = InnerModel("ttt_mlp", mlp_update, mlp_readout)


def kernel_matmul(matmul_dtype: DType) -> Callable[..., Array]:
  """The op's `matmul` with a hand-written VJP made of same-dtype 2-D matmuls.

  Forward: exactly `ttt_jax.ttt_step.matmul(matmul_dtype, fp32)` (operands
  cast to matmul_dtype, fp32 accumulation, HIGHEST precision for fp32).
  Backward: dA = einsum("Z,Y->X", g, B), dB = einsum("X,Z->Y", A, g) through
  the same `matmul`, so
    * for bf16 the fp32 cotangent is rounded to bf16 too and both cotangent
      matmuls are native bf16 x bf16 -> fp32 ops (autodiff of the op would
      pair an fp32 cotangent with a bf16 operand: a mixed-dtype matmul that
      Mosaic only accepts in compatibility mode and Triton not at all);
    * for fp32 it is the same math as autodiff, but with the operands put in
      the order whose dot_general result needs no transpose.
  Specs are 2-D matmul-like einsums "X,Y->Z" in which every index appears in
  exactly two of the three terms. Use it under `jax.vjp` only: Pallas TPU
  lowers the custom_vjp wrapper itself, Pallas Triton does not.
  """
  base = matmul(matmul_dtype, F32)

  def ordered(lhs_spec, rhs_spec, out_spec, lhs, rhs):
    # Put the operand whose free index leads the output first, so the
    # dot_general result needs no transpose.
    if lhs_spec.find(out_spec[0]) < 0:
      lhs_spec, rhs_spec, lhs, rhs = rhs_spec, lhs_spec, rhs, lhs
    return base(f"{lhs_spec},{rhs_spec}->{out_spec}", lhs, rhs)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def mm_2d(spec, a, b):
    return base(spec, a, b)

  def mm_fwd(spec, a, b):
    return base(spec, a, b), (a, b)

  def mm_bwd(spec, res, g):
    a, b = res
    ins, z = spec.split("->")
    x, y = ins.split(",")
    # `base` casts g and the operands to matmul_dtype; the results are cast
    # through matmul_dtype like the transpose of the op's operand casts.
    da = ordered(z, y, x, g, b).astype(matmul_dtype).astype(a.dtype)
    db = ordered(x, z, y, a, g).astype(matmul_dtype).astype(b.dtype)
    return da, db

  mm_2d.defvjp(mm_fwd, mm_bwd)
  # The shared step writes batch-polymorphic "...kd,...de->...ke" specs; the
  # kernel's operands are plain 2-D tiles.
  return lambda spec, a, b: mm_2d(spec.replace("...", ""), a, b)


def split_refs(refs: Sequence[Any], *sizes: int) -> list[tuple[Any, ...]]:
  """Cut a flat kernel ref list into consecutive groups of the given sizes."""
  assert sum(sizes) == len(refs), (sizes, len(refs))
  out, i = [], 0
  for n in sizes:
    out.append(tuple(refs[i:i + n]))
    i += n
  return out


def remat_group_size(remat_group: Any, n_chunks: int) -> int:
  """G: checkpoints every G-th mini-batch (None: every one), at most NC."""
  if remat_group is not None and (isinstance(remat_group, bool) or not isinstance(
      remat_group, numbers.Integral) or remat_group < 1):
    raise ValueError(f"remat_group must be a positive int or None, got {remat_group!r}")
  return 1 if remat_group is None else min(int(remat_group), n_chunks)


def check_dtypes(fn: str, op_name: str, q: Array, matmul_dtype: DType) -> None:
  """fp64 state and matmul dtypes other than f32/bf16 have no kernel."""
  if jnp.dtype(q.dtype) == jnp.dtype(jnp.float64):
    raise ValueError(
        f"{fn}: q is float64, so {op_name} would run an fp64 state; the Pallas "
        f"kernels have no fp64. Use ttt_jax.ops.{op_name} for fp64.")
  if matmul_dtype not in MATMUL_DTYPES:
    raise ValueError(
        f"{fn}: matmul_dtype must be float32 or bfloat16 (the matmul operand "
        f"dtypes the kernels support), got {matmul_dtype}")


def to_kernel_dtype(x: Array) -> Array:
  return x if x.dtype in KERNEL_DTYPES else x.astype(F32)


def make_custom_vjp(forward: Callable[..., Any], backward: Callable[..., Any], *,
                    B: int, H: int) -> Callable[..., Any]:
  """Wire a forward and a backward kernel into one differentiable function.

  forward(q, k, v, eta, ln_w, ln_b, weights0, save_ckpt) -> (z, final weights,
    checkpoints); checkpoints is () unless save_ckpt.
  backward(q, k, v, eta, ln_w, ln_b, checkpoints, dz, dfinal) -> (dq, dk, dv,
    deta, dln_w, dln_b, dweights0) with the last three per stream ([B * H, ...]).
  The returned core(q, k, v, eta, ln_w, ln_b, weights0) -> (z, final) has
  per-head ([H, ...]) gradients for ln_w, ln_b and weights0: the per-stream
  ones summed over B.
  """

  @jax.custom_vjp
  def core(q, k, v, eta, ln_w, ln_b, weights0):
    z, final, _ = forward(q, k, v, eta, ln_w, ln_b, weights0, save_ckpt=False)
    return z, final

  def core_fwd(q, k, v, eta, ln_w, ln_b, weights0):
    z, final, ckpts = forward(q, k, v, eta, ln_w, ln_b, weights0, save_ckpt=True)
    return (z, final), (q, k, v, eta, ln_w, ln_b, ckpts)

  def core_bwd(res, cts):
    q, k, v, eta, ln_w, ln_b, ckpts = res
    dz, dfinal = cts
    dq, dk, dv, deta, dlnw, dlnb, dweights0 = backward(
        q, k, v, eta, ln_w, ln_b, ckpts, dz.astype(q.dtype),
        tuple(x.astype(F32) for x in dfinal))
    per_head = lambda x: x.reshape(B, H, *x.shape[1:]).sum(0)  # streams -> heads
    return (dq, dk, dv, deta, per_head(dlnw), per_head(dlnb),
            tuple(per_head(x) for x in dweights0))

  core.defvjp(core_fwd, core_bwd)
  return core


def run_core(core: Callable[..., Any], q, k, v, eta, ln_weight, ln_bias, weights, *,
             token_shape: Sequence[int], eta_shape: Sequence[int],
             return_final_weights: bool):
  """The op's layout in and out around a `make_custom_vjp` core: token
  arrays reshaped (free, contiguous) to token_shape, eta to eta_shape, the
  per-head LayerNorm to [H, 1, d]; fp32 everywhere but the token dtype."""
  B, H, NC, K, d = q.shape
  tokens = lambda x: to_kernel_dtype(x).reshape(token_shape)
  z, final = core(
      tokens(q), tokens(k), tokens(v), eta.astype(F32).reshape(eta_shape),
      ln_weight.astype(F32).reshape(H, 1, d), ln_bias.astype(F32).reshape(H, 1, d),
      tuple(w.astype(F32) for w in weights))
  z = z.reshape(q.shape).astype(q.dtype)
  if return_final_weights:
    return z, tuple(w.reshape(B, H, *w.shape[1:]) for w in final)
  return z
