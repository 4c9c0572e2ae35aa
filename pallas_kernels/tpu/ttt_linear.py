"""Fused Pallas TPU (Mosaic) kernel for the TTT-Linear inner loop.

`ttt_linear_pallas` is a drop-in replacement for `ttt_jax.ops.ttt_linear`
(same arguments, semantics, output dtypes and gradients): the dual-form
mini-batch GD step on the fast weights W [d, d], b [1, d] of every (batch,
head) stream, with the non-causal read-out of each mini-batch through the
post-update weights, fp32 state and matmul operands in `matmul_dtype`.

Design
------
Layout. The wrapper flattens (B, H) into one stream axis BH = B * H (a free
reshape of the contiguous [B, H, ...] inputs): q, k, v -> [BH, NC, K, d],
eta -> [BH, NC, 1, K], ln_weight/ln_bias -> [H, 1, d]. Every block spans
the full two trailing dims of its array, so the TPU rule "the last two dims
of a block are divisible by (8, 128) or equal the array's dims" holds for
any K and d, and the kernel sees plain 2-D tiles:
  q, k, v, z  [K, d]      W  [d, d]      eta  [1, K]
  b, ln_weight, ln_bias  [1, d]
eta is stored as a lane-dense [1, K] row. The step needs it as a [K, 1]
column (it scales the rows of the [K, d] inner gradient), but a [.., K, 1]
array has a minor dim of 1, which the (8, 128) TPU tiling pads to 128 lanes
(always in VMEM, and in HBM under XLA's default tiled layouts): up to a
128x blow-up of eta and of its gradient. The kernel turns the
row into a column exactly with ops Mosaic lowers everywhere (see
`_eta_column`); autodiff turns the column cotangent back into a row. The
head of stream bh is bh % H, so the per-head W0, b0, ln_weight, ln_bias are
read through the index_map (no [B, H, ...] broadcast in HBM). K and d must
be multiples of 8 (the fp32 sublane tile: K and d are the row counts of the
[K, d], [K, K] and [d, d] tiles); d = 128 fills the 128 lanes, d = 64
(CogVideoX's head dim) uses half of each vreg but is legal.

Forward kernel. grid = (BH, NC) with dimension_semantics ("parallel",
"arbitrary"): the stream axis may be split across TensorCores, the
mini-batch axis runs in order on one core. W and b live in fp32 VMEM
scratch across the NC axis: loaded from W0/b0 at nc == 0, updated in place
by each step, written to the final-weight outputs (a block whose index does
not move along NC, hence resident in VMEM and written back once) at the
last nc. One grid step = one mini-batch of one stream: q/k/v/eta blocks are
pipelined (double-buffered) by Pallas while the previous mini-batch runs.

Residuals for the backward: the forward used under autodiff also writes the
weights each step STARTS from, W_{n-1} [BH, NC, d, d] and b_{n-1}
[BH, NC, 1, d] (fp32). This is the "checkpoint every mini-batch" end of the
memory/compute trade-off, chosen because
  * a checkpoint costs d*d*4 bytes per mini-batch per stream, no more than
    the mini-batch's own fp32 q, k, v (3*K*d*4) whenever d <= 3K (d = 64,
    K = 64: 16 KiB next to 48 KiB), and far less than the residuals that
    autodiff of the reference `lax.scan` keeps per step (every [K, d]
    intermediate plus the [K, K] attention, plus W);
  * the backward then needs no forward re-run: each reverse step re-derives
    its own mini-batch from W_{n-1} (inside jax.vjp) and nothing else, so
    the kernel stays one simple sequential pass with O(d^2) VMEM;
  * the alternative, a checkpoint every G mini-batches, would divide that
    HBM term by G but make every backward grid step re-run G forward steps
    into a [G, d, d] VMEM stash first, i.e. ~1 extra forward of compute and
    a G-times larger VMEM footprint; worth adding as an option only if the
    [BH, NC, d, d] buffer becomes the memory bottleneck (very long NC with
    d >> K).
Primal calls that are not differentiated use a kernel variant that writes
no residuals.

Backward kernel. Same grid, with the NC axis walked backwards through the
index_map (nc -> NC - 1 - nc). The cotangents of the carried weights, dW
[d, d] and db [1, d], live in fp32 VMEM scratch (seeded at the first
reverse step with the cotangent of the final weights, which is zero unless
the caller differentiates them), as do the running sums of the LayerNorm
parameter gradients. Each reverse step calls `jax.vjp` of the very same
per-mini-batch step function the forward kernel runs, on the VMEM-loaded
values, with cotangents ((dW, db), dz) and gets dW_{n-1}, db_{n-1}, dq,
dk, dv, deta, dln_weight, dln_bias in one go. dW0, db0 (per stream) and
dln_weight, dln_bias (per stream) are written at the last reverse step; the
wrapper sums them over B.

Shared math. Both kernels run `_kernel_step`: `_eta_column` followed by the
op's own `ttt_jax.ops.ttt._linear_step` (batch-polymorphic einsums, here on
plain 2-D tiles), so the XLA scan and the kernels share one definition of
the step. eta arrives as a [1, K] row because a [K, 1] block would pad to
128 lanes; `_eta_column` turns it into the column the step expects without
a lane->sublane relayout.

Matmul precision. With matmul_dtype = fp32 every matmul (forward and
backward) has fp32 operands at Precision.HIGHEST, as in the op. With
matmul_dtype = bf16 the forward matmuls are exactly the op's (bf16
operands, fp32 accumulation). In the backward, autodiff of the op pairs an
fp32 cotangent with a bf16 operand: a mixed-dtype matmul, which Mosaic's
matmul canonicalisation only accepts in its compatibility mode, and which
XLA:TPU at DEFAULT precision is expected to run as a single bf16 MXU pass
anyway. The kernel's matmul therefore carries a custom VJP
(`_kernel_matmul`) that rounds the cotangent to bf16 as well, so every
backward matmul is a native bf16 x bf16 -> fp32 MXU op. On CPU the op
computes those mixed matmuls in fp32, so bf16 gradients differ from the
op's by about one bf16 rounding of the cotangents (0.4 %; the tests bound
it and check the kernel's bf16 gradients are as accurate as the op's). For
fp32 the custom VJP is the same math as autodiff, arranged so no explicit
transposes are emitted.

Everything else (LayerNorm statistics, the inner gradient, the state and
all reductions) is fp32, as in the op; fp64 has no Pallas TPU lowering and
is rejected.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ttt_jax.ops.ttt import LN_EPS, _check, _check_tokens, _linear_step, _matmul

Array = jax.Array
DType = Any

_F32 = jnp.dtype(jnp.float32)
_BF16 = jnp.dtype(jnp.bfloat16)
# dtypes the kernels read and write natively; other token dtypes (f16, or f64
# for k/v when q is not f64) are cast to fp32 by the wrapper, which is exact
# for f16 and what the op does anyway.
_KERNEL_DTYPES = (_F32, _BF16)
_MATMUL_DTYPES = (_F32, _BF16)
_SUBLANES = 8  # fp32 rows per vreg: K and d are row counts of kernel tiles
_LANES = 128
# Smallest default scoped-VMEM limit across TPU generations; the kernels
# keep everything for one mini-batch in VMEM and are not tiled further.
_VMEM_BUDGET_BYTES = 16 * 2**20


# ----------------------------------------------------------------------------
# The per-mini-batch step (pure jnp; traced inside both kernels).
# ----------------------------------------------------------------------------


def _kernel_matmul(matmul_dtype: DType) -> Callable[..., Array]:
  """The op's `_matmul` with a hand-written VJP made of same-dtype 2-D matmuls.

  Forward: exactly `ttt_jax.ops.ttt._matmul(matmul_dtype, fp32)` (operands
  cast to matmul_dtype, fp32 accumulation, HIGHEST precision for fp32).
  Backward: dA = einsum("Z,Y->X", g, B), dB = einsum("X,Z->Y", A, g) through
  the same `_matmul`, so
    * for bf16 the fp32 cotangent is rounded to bf16 too and both cotangent
      matmuls are native bf16 x bf16 -> fp32 MXU ops (autodiff of the op
      would pair an fp32 cotangent with a bf16 operand: a mixed-dtype matmul
      that Mosaic only accepts in compatibility mode);
    * for fp32 it is the same math as autodiff, but with the operands put in
      the order whose dot_general result needs no transpose (autodiff emits
      a matmul followed by a [K, d] / [d, d] transpose for half of them).
  Specs are 2-D matmul-like einsums "X,Y->Z" in which every index appears in
  exactly two of the three terms.
  """
  base = _matmul(matmul_dtype, _F32)

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


def _eta_column(eta_row: Array) -> Array:
  """[1, K] row -> [K, 1] column, exactly.

  A reshape or transpose would move K from lanes to sublanes, a relayout
  Mosaic does not lower for every shape. Instead: broadcast the row down the
  sublanes, keep the diagonal and reduce over lanes (one nonzero term per
  row, so the sum is exact). iota, select and reductions lower on every TPU
  generation, and the autodiff transpose is the mirror image (a sublane
  reduction), which brings the [K, 1] cotangent back to a [1, K] row.
  """
  K = eta_row.shape[-1]
  rows = jax.lax.broadcasted_iota(jnp.int32, (K, K), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (K, K), 1)
  diag = jnp.where(rows == cols, jnp.broadcast_to(eta_row, (K, K)), 0.0)
  return jnp.sum(diag, axis=1, keepdims=True)


def _kernel_step(W, b, xq, xk, xv, eta_row, ln_w, ln_b, *, mm, eps):
  """The op's `_linear_step` on one stream's 2-D tiles, eta given as its [1, K] VMEM row."""
  return _linear_step((W, b), (xq, xk, xv, _eta_column(eta_row)),
                      ln_w=ln_w, ln_b=ln_b, eps=eps, mm=mm)


# ----------------------------------------------------------------------------
# Kernels.
# ----------------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, eta_ref, lnw_ref, lnb_ref, w0_ref, b0_ref,
                z_ref, wf_ref, bf_ref, *rest, step, save_history):
  if save_history:
    wh_ref, bh_ref, w_scr, b_scr = rest
  else:
    w_scr, b_scr = rest
  nc = pl.program_id(1)

  @pl.when(nc == 0)
  def _init():
    w_scr[...] = w0_ref[...]
    b_scr[...] = b0_ref[...]

  W, b = w_scr[...], b_scr[...]
  if save_history:  # the weights this mini-batch starts from
    wh_ref[...] = W
    bh_ref[...] = b
  (W_new, b_new), out = step(
      W, b, q_ref[...].astype(_F32), k_ref[...].astype(_F32),
      v_ref[...].astype(_F32), eta_ref[...], lnw_ref[...], lnb_ref[...])
  z_ref[...] = out.astype(z_ref.dtype)
  w_scr[...] = W_new
  b_scr[...] = b_new

  @pl.when(nc == pl.num_programs(1) - 1)
  def _final():
    wf_ref[...] = w_scr[...]
    bf_ref[...] = b_scr[...]


def _bwd_kernel(q_ref, k_ref, v_ref, eta_ref, lnw_ref, lnb_ref, wh_ref, bh_ref,
                dz_ref, dwf_ref, dbf_ref,
                dq_ref, dk_ref, dv_ref, deta_ref, dlnw_ref, dlnb_ref, dw0_ref, db0_ref,
                dw_scr, db_scr, dlnw_scr, dlnb_scr, *, step):
  i = pl.program_id(1)  # reverse step: mini-batch NC - 1 - i

  @pl.when(i == 0)
  def _init():
    dw_scr[...] = dwf_ref[...]
    db_scr[...] = dbf_ref[...]
    dlnw_scr[...] = jnp.zeros_like(dlnw_scr)
    dlnb_scr[...] = jnp.zeros_like(dlnb_scr)

  primals = (wh_ref[...], bh_ref[...], q_ref[...].astype(_F32),
             k_ref[...].astype(_F32), v_ref[...].astype(_F32), eta_ref[...],
             lnw_ref[...], lnb_ref[...])
  _, step_vjp = jax.vjp(step, *primals)
  dW, db, dq, dk, dv, deta, dlnw, dlnb = step_vjp(
      ((dw_scr[...], db_scr[...]), dz_ref[...].astype(_F32)))
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  deta_ref[...] = deta
  dw_scr[...] = dW
  db_scr[...] = db
  dlnw_scr[...] += dlnw
  dlnb_scr[...] += dlnb

  @pl.when(i == pl.num_programs(1) - 1)
  def _final():
    dw0_ref[...] = dw_scr[...]
    db0_ref[...] = db_scr[...]
    dlnw_ref[...] = dlnw_scr[...]
    dlnb_ref[...] = dlnb_scr[...]


# ----------------------------------------------------------------------------
# pallas_call builders.
# ----------------------------------------------------------------------------

_SQ = pl.squeezed


def _specs(H: int, NC: int, K: int, d: int, reverse: bool):
  """BlockSpecs over the grid (stream bh, step i); step i -> mini-batch."""
  chunk = (lambda i: NC - 1 - i) if reverse else (lambda i: i)
  return dict(
      tok=pl.BlockSpec((_SQ, _SQ, K, d), lambda bh, i: (bh, chunk(i), 0, 0)),
      row=pl.BlockSpec((_SQ, _SQ, 1, K), lambda bh, i: (bh, chunk(i), 0, 0)),
      chunk_mat=pl.BlockSpec((_SQ, _SQ, d, d), lambda bh, i: (bh, chunk(i), 0, 0)),
      chunk_vec=pl.BlockSpec((_SQ, _SQ, 1, d), lambda bh, i: (bh, chunk(i), 0, 0)),
      head_mat=pl.BlockSpec((_SQ, d, d), lambda bh, i: (bh % H, 0, 0)),
      head_vec=pl.BlockSpec((_SQ, 1, d), lambda bh, i: (bh % H, 0, 0)),
      stream_mat=pl.BlockSpec((_SQ, d, d), lambda bh, i: (bh, 0, 0)),
      stream_vec=pl.BlockSpec((_SQ, 1, d), lambda bh, i: (bh, 0, 0)),
  )


def _compiler_params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _forward_call(q, k, v, eta, ln_w, ln_b, W0, b0, *, H, z_dtype, step,
                  save_history, interpret):
  BH, NC, K, d = q.shape
  s = _specs(H, NC, K, d, reverse=False)
  sds = jax.ShapeDtypeStruct
  out_specs = [s["tok"], s["stream_mat"], s["stream_vec"]]
  out_shape = [sds((BH, NC, K, d), z_dtype), sds((BH, d, d), _F32), sds((BH, 1, d), _F32)]
  if save_history:
    out_specs += [s["chunk_mat"], s["chunk_vec"]]
    out_shape += [sds((BH, NC, d, d), _F32), sds((BH, NC, 1, d), _F32)]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, step=step, save_history=save_history),
      grid=(BH, NC),
      in_specs=[s["tok"], s["tok"], s["tok"], s["row"], s["head_vec"], s["head_vec"],
                s["head_mat"], s["head_vec"]],
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM((d, d), _F32), pltpu.VMEM((1, d), _F32)],
      compiler_params=_compiler_params(),
      interpret=interpret,
      name="ttt_linear_fwd" + ("_res" if save_history else ""),
  )(q, k, v, eta, ln_w, ln_b, W0, b0)


def _backward_call(q, k, v, eta, ln_w, ln_b, W_hist, b_hist, dz, dWf, dbf, *, H, step,
                   interpret):
  BH, NC, K, d = q.shape
  s = _specs(H, NC, K, d, reverse=True)
  sds = jax.ShapeDtypeStruct
  return pl.pallas_call(
      functools.partial(_bwd_kernel, step=step),
      grid=(BH, NC),
      in_specs=[s["tok"], s["tok"], s["tok"], s["row"], s["head_vec"], s["head_vec"],
                s["chunk_mat"], s["chunk_vec"], s["tok"], s["stream_mat"], s["stream_vec"]],
      out_specs=[s["tok"], s["tok"], s["tok"], s["row"], s["stream_vec"], s["stream_vec"],
                 s["stream_mat"], s["stream_vec"]],
      out_shape=[sds(q.shape, q.dtype), sds(k.shape, k.dtype), sds(v.shape, v.dtype),
                 sds(eta.shape, _F32), sds((BH, 1, d), _F32), sds((BH, 1, d), _F32),
                 sds((BH, d, d), _F32), sds((BH, 1, d), _F32)],
      scratch_shapes=[pltpu.VMEM((d, d), _F32), pltpu.VMEM((1, d), _F32),
                      pltpu.VMEM((1, d), _F32), pltpu.VMEM((1, d), _F32)],
      compiler_params=_compiler_params(),
      interpret=interpret,
      name="ttt_linear_bwd",
  )(q, k, v, eta, ln_w, ln_b, W_hist, b_hist, dz, dWf, dbf)


def _make_core(*, B: int, H: int, z_dtype: DType, matmul_dtype: DType, eps: float,
               interpret: Any) -> Callable[..., tuple[Array, Array, Array]]:
  """custom_vjp over the kernel layout: (q, k, v, eta, ln_w, ln_b, W0, b0) ->
  (z [BH, NC, K, d], W_final [BH, d, d], b_final [BH, 1, d])."""
  step = functools.partial(_kernel_step, mm=_kernel_matmul(matmul_dtype), eps=eps)
  call = functools.partial(_forward_call, H=H, z_dtype=z_dtype, step=step,
                           interpret=interpret)

  @jax.custom_vjp
  def core(q, k, v, eta, ln_w, ln_b, W0, b0):
    return tuple(call(q, k, v, eta, ln_w, ln_b, W0, b0, save_history=False))

  def core_fwd(q, k, v, eta, ln_w, ln_b, W0, b0):
    z, Wf, bf, W_hist, b_hist = call(q, k, v, eta, ln_w, ln_b, W0, b0, save_history=True)
    return (z, Wf, bf), (q, k, v, eta, ln_w, ln_b, W_hist, b_hist)

  def core_bwd(res, cts):
    q, k, v, eta, ln_w, ln_b, W_hist, b_hist = res
    dz, dWf, dbf = cts
    dq, dk, dv, deta, dlnw, dlnb, dW0, db0 = _backward_call(
        q, k, v, eta, ln_w, ln_b, W_hist, b_hist, dz.astype(z_dtype),
        dWf.astype(_F32), dbf.astype(_F32), H=H, step=step, interpret=interpret)
    per_head = lambda x: x.reshape(B, H, *x.shape[1:]).sum(0)  # streams -> heads
    return dq, dk, dv, deta, per_head(dlnw), per_head(dlnb), per_head(dW0), per_head(db0)

  core.defvjp(core_fwd, core_bwd)
  return core


# ----------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------


def _vmem_estimate_bytes(K: int, d: int, itemsize: int) -> int:
  """Rough VMEM need of the backward kernel (the larger one), in bytes."""
  pad = lambda n, m: -(-n // m) * m
  tok = pad(K, _SUBLANES) * pad(d, _LANES)
  mat = pad(d, _SUBLANES) * pad(d, _LANES)
  vec = _SUBLANES * pad(d, _LANES)
  row = _SUBLANES * pad(K, _LANES)
  kk = pad(K, _SUBLANES) * pad(K, _LANES)
  blocks = 7 * tok * itemsize + 2 * row * 4 + 3 * mat * 4 + 9 * vec * 4
  scratch = mat * 4 + 3 * vec * 4
  temps = (12 * tok + 5 * kk + 4 * mat) * 4  # live intermediates of the step VJP
  return 2 * blocks + scratch + temps  # in/out blocks are double-buffered


def _check_kernel_constraints(q, matmul_dtype, K: int, d: int) -> None:
  if jnp.dtype(q.dtype) == jnp.dtype(jnp.float64):
    raise ValueError(
        "ttt_linear_pallas: q is float64, so ttt_linear would run an fp64 state; "
        "Pallas TPU kernels have no fp64. Use ttt_jax.ops.ttt_linear for fp64.")
  if matmul_dtype not in _MATMUL_DTYPES:
    raise ValueError(
        f"ttt_linear_pallas: matmul_dtype must be float32 or bfloat16 (the MXU "
        f"operand dtypes this kernel supports), got {matmul_dtype}")
  for name, n in (("K (mini-batch size)", K), ("d (head dim)", d)):
    if n % _SUBLANES:
      raise ValueError(
          f"ttt_linear_pallas: {name} = {n} must be a multiple of {_SUBLANES}: it is "
          f"the row count of the kernel's fp32 [K, d], [K, K] and [d, d] VMEM tiles "
          f"(TPU sublane tile {_SUBLANES}). d a multiple of {_LANES} uses full vregs.")
  itemsize = jnp.dtype(q.dtype).itemsize if q.dtype in _KERNEL_DTYPES else 4
  need = _vmem_estimate_bytes(K, d, itemsize)
  if need > _VMEM_BUDGET_BYTES:
    raise ValueError(
        f"ttt_linear_pallas: K = {K}, d = {d} needs about {need / 2**20:.1f} MiB of VMEM "
        f"per grid step (one mini-batch, W and its cotangent are held whole), over "
        f"the {_VMEM_BUDGET_BYTES // 2**20} MiB budget; use ttt_jax.ops.ttt_linear "
        f"or a smaller mini-batch / head dim.")


def ttt_linear_pallas(
    q: Array, k: Array, v: Array, eta: Array,
    ln_weight: Array, ln_bias: Array, W: Array, b: Array,
    *,
    matmul_dtype: DType | None = None,
    return_final_weights: bool = False,
    eps: float = LN_EPS,
    interpret: bool | pltpu.InterpretParams = False,
):
  """TTT-Linear inner loop as fused Pallas TPU kernels; see `ttt_linear`.

  Args:
    q, k, v: [B, H, NC, K, d] queries, keys and values of each head.
    eta: [B, H, NC, K] per-token inner learning rates.
    ln_weight, ln_bias: [H, d] the per-head inner LayerNorm.
    W: [H, d, d], b: [H, 1, d] initial fast weights of each head.
    matmul_dtype: dtype of matmul operands, float32 or bfloat16 (None: fp32).
    return_final_weights: also return the fast weights after the last step
      (differentiable like z).
    eps: LayerNorm epsilon.
    interpret: run the kernels in Pallas TPU interpret mode (on CPU). True
      means `pltpu.InterpretParams()`; an `InterpretParams` is passed through.
      Kernels traced under `pltpu.force_tpu_interpret_mode()` are
      interpreted as well.

  Returns:
    z [B, H, NC, K, d] in q's dtype, and if asked (W [B, H, d, d],
    b [B, H, 1, d]) in fp32.

  Raises:
    ValueError: for shapes or dtypes the kernels do not support (see
      `_check_kernel_constraints`) and for mismatched shapes (as the op).
  """
  B, H, NC, K, d = _check_tokens(q, k, v, eta, ln_weight, ln_bias)
  _check("q", q, q.shape, "[B, H, NC, K, d]")  # dtype check
  _check("W", W, (H, d, d), "[H, d, d]")
  _check("b", b, (H, 1, d), "[H, 1, d]")
  matmul_dtype = _F32 if matmul_dtype is None else jnp.dtype(matmul_dtype)
  _check_kernel_constraints(q, matmul_dtype, K, d)
  if interpret is True:
    interpret = pltpu.InterpretParams()

  kernel_dtype = lambda x: x if x.dtype in _KERNEL_DTYPES else x.astype(_F32)
  tokens = lambda x: kernel_dtype(x).reshape(B * H, NC, K, d)  # free reshapes
  q_k = tokens(q)
  core = _make_core(B=B, H=H, z_dtype=q_k.dtype, matmul_dtype=matmul_dtype, eps=eps,
                    interpret=interpret)
  z, W_final, b_final = core(
      q_k, tokens(k), tokens(v),
      eta.astype(_F32).reshape(B * H, NC, 1, K),
      ln_weight.astype(_F32).reshape(H, 1, d), ln_bias.astype(_F32).reshape(H, 1, d),
      W.astype(_F32), b.astype(_F32))
  z = z.reshape(B, H, NC, K, d).astype(q.dtype)
  if return_final_weights:
    return z, (W_final.reshape(B, H, d, d), b_final.reshape(B, H, 1, d))
  return z
