"""Fused Pallas GPU (Triton) kernels for the TTT inner loop, both inner models.

`ttt_linear_pallas_gpu` and `ttt_mlp_pallas_gpu` are drop-in replacements
for `ttt_jax.ops.ttt_linear` / `ttt_mlp` (same arguments, semantics, output
dtypes and gradients; `remat_group` means the same memory/compute trade-off)
for NVIDIA GPUs (Triton: Ampere and newer, any the jaxlib Triton supports),
written against the Pallas Triton backend.

Design
------
One program per (batch, head) stream: grid = (B * H,). The program walks
the stream's NC mini-batches with a `fori_loop` and carries the fp32 fast
weights as loop values, i.e. in registers (spilling to local memory when
they do not fit), so they never round-trip through HBM between
mini-batches. This is the GPU counterpart of the TPU kernel's VMEM scratch:
Triton has no explicitly managed scratch memory and no sequential grid
axis, so the mini-batch loop lives inside the program.

Token tiles and large chunks. Triton keeps every tensor of a program in
registers, so a large mini-batch (K = 256 .. 2048, "large-chunk" TTT) cannot
be one tile. The kernels therefore cut each mini-batch into T = K / Kt tiles
of Kt tokens (`block_k`, default 64, or K if smaller) and use that the step
is a sum over tokens followed by a per-token read-out
(`pallas_kernels.minibatch`): the update sums the per-tile inner
gradients at W_{b-1}, then every tile is read out through W_b. Registers
then scale with Kt, not K, and any K that is a multiple of Kt works. Token
arrays are viewed as [B * H, NC * T, Kt, d] (a free reshape), eta as
[B * H, NC * T, Kt, 1]: the GPU has no lane-padding problem with a column.

Forward kernel (per stream): for each mini-batch n, optionally store the
starting weights (every G-th mini-batch, G = remat_group), sum the T tile
updates, subtract, and read out the T query tiles into z. The final weights
are written once at the end.

Backward kernel (per stream), mini-batches in reverse. The carry is the
cotangent of the weights after mini-batch n (seeded with the cotangent of
the final weights) plus the running LayerNorm-parameter gradients. For
mini-batch n the starting weights W_{n-1} are the checkpoint of its group
advanced by n mod G update-only steps (G = 1: the checkpoint itself);
recomputing from the group checkpoint for every mini-batch costs (G - 1) / 2
extra update passes per mini-batch on average, in exchange for only NC / G
stored weight sets and no extra on-chip state (a TTT-MLP weight set at
d = 64, F = 256 is 129 KiB: more than a GPU thread block can hold several
of). G = 1 (store all, no recompute) is the default, as for the TPU kernel.
Then `pallas_kernels.minibatch.backward` runs the mini-batch's VJP tile by
tile (read-out VJP at W_n, then update VJP at W_{n-1}), the same code the
TPU kernels run, built on `jax.vjp` of the op's own update / read-out.

Precision. fp32 state and every reduction; matmul operands in
`matmul_dtype`: bf16 (tensor cores, fp32 accumulation) or fp32 (IEEE fp32:
`Precision.HIGHEST`, as in the op; TF32 is not used). The backward's
matmuls use `pallas_kernels.common.kernel_matmul`, which also rounds the
cotangents to bf16 for bf16 runs (Triton matmuls take one operand dtype).

Constraints (checked, with named errors): Triton tensors have power-of-two
sizes and tensor-core matmuls need every dim >= 16, so d, F and the tile Kt
must be powers of two >= 16 and K a multiple of Kt; no fp64.
Registers: a program holds a few weight sets (state, its cotangent, the
recomputed W_n); `num_warps` (default 4 for TTT-Linear, 8 for TTT-MLP)
spreads them over more threads.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import minibatch
from pallas_kernels.common import (F32, LINEAR, MLP, InnerModel, check_dtypes, kernel_matmul,
                                   make_custom_vjp, remat_group_size, run_core,
                                   split_refs)
from ttt_jax.ttt_step import (LN_EPS, check_array, check_linear_weights, check_mlp_weights,
                              check_tokens, matmul)

Array = jax.Array
DType = Any

_MIN_DIM = 16  # smallest Triton tensor-core matmul dim
DEFAULT_BLOCK_K = 64


class _Tiles(minibatch.Tiles):
  """Token tiles of mini-batch n of one stream: tile t is row n * T + t of the
  [NC * T, Kt, ...] token and eta refs (dynamic n and t: loads at computed
  offsets)."""

  def __init__(self, tok_refs, n, T: int, **out_refs):
    super().__init__(tok_refs, T, **out_refs)
    self.n = n

  def index(self, t, eta=False):
    return self.n * self.T + t

  def loop(self, body, carry):
    if self.T == 1:  # inlined: the common case
      return body(0, carry)
    return jax.lax.fori_loop(0, self.T, body, carry)


def _fwd_kernel(*refs, step, n_w, T, n_chunks, group, save_ckpt):
  tok_refs, w0_refs, (z_ref,), wf_refs, ckpt_refs = split_refs(
      refs, 6, n_w, 1, n_w, n_w if save_ckpt else 0)

  def chunk(n, weights):
    if save_ckpt:
      @pl.when(jax.lax.rem(n, group) == 0)
      def _checkpoint():  # the weights this mini-batch (the first of its group) starts from
        for c, w in zip(ckpt_refs, weights):
          c[jax.lax.div(n, group)] = w

    return minibatch.forward(step, _Tiles(tok_refs, n, T, z_ref=z_ref), weights)

  final = jax.lax.fori_loop(0, n_chunks, chunk, tuple(w[...] for w in w0_refs))
  for o, w in zip(wf_refs, final):
    o[...] = w


def _bwd_kernel(*refs, step, n_w, T, n_chunks, group):
  tok_refs, ckpt_refs, (dz_ref,), dwf_refs, (dq_ref, dk_ref, dv_ref, deta_ref, dlnw_ref,
                                             dlnb_ref), dw0_refs = split_refs(
      refs, 6, n_w, 1, n_w, 6, n_w)
  grad_refs = (dz_ref, dq_ref, dk_ref, dv_ref, deta_ref)

  def chunk(i, carry):
    n = n_chunks - 1 - i
    dnew, dln = carry  # cotangents of W_n; of (ln_w, ln_b) so far
    # W_{n-1}: the group checkpoint advanced n mod G update-only steps.
    start = tuple(c[jax.lax.div(n, group)] for c in ckpt_refs)
    if group > 1:
      first = n - jax.lax.rem(n, group)
      start = jax.lax.fori_loop(
          0, jax.lax.rem(n, group),
          lambda j, w: minibatch.updated(step, _Tiles(tok_refs, first + j, T), w), start)
    return minibatch.backward(step, _Tiles(tok_refs, n, T, grad_refs=grad_refs), start, dnew, dln)

  ln = (tok_refs[4][...], tok_refs[5][...])
  dweights0, (dlnw, dlnb) = jax.lax.fori_loop(
      0, n_chunks, chunk,
      (tuple(d[...] for d in dwf_refs), tuple(jnp.zeros_like(x) for x in ln)))
  for o, d in zip(dw0_refs, dweights0):
    o[...] = d
  dlnw_ref[...] = dlnw
  dlnb_ref[...] = dlnb


# ----------------------------------------------------------------------------
# pallas_call builders.
# ----------------------------------------------------------------------------


def _whole(shape) -> pl.BlockSpec:
  """[BH, *shape]: stream bh's whole slice."""
  return pl.BlockSpec((None, *shape), lambda bh: (bh,) + (0,) * len(shape))


def _per_head(shape, H: int) -> pl.BlockSpec:
  """[H, *shape] per-head array, read by stream bh as head bh % H."""
  return pl.BlockSpec((None, *shape), lambda bh: (bh % H,) + (0,) * len(shape))


def _compiler_params(num_warps: int):
  # num_stages=1: the loops carry state, nothing to software-pipeline across
  # iterations but the next tile's loads, which would cost shared memory.
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=1)


def _forward_call(q, k, v, eta, ln_w, ln_b, weights0, *, save_ckpt, step, name, H, NC,
                  group, num_warps, interpret):
  BH, rows, Kt, d = q.shape
  shapes = [w.shape[1:] for w in weights0]
  n_groups = -(-NC // group)
  tok = _whole((rows, Kt, d))
  sds = jax.ShapeDtypeStruct
  out_specs = [tok] + [_whole(s) for s in shapes]
  out_shape = [sds(q.shape, q.dtype)] + [sds((BH, *s), F32) for s in shapes]
  if save_ckpt:
    out_specs += [_whole((n_groups, *s)) for s in shapes]
    out_shape += [sds((BH, n_groups, *s), F32) for s in shapes]
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, step=step, n_w=len(shapes), T=rows // NC,
                        n_chunks=NC, group=group, save_ckpt=save_ckpt),
      grid=(BH,),
      in_specs=[tok, tok, tok, _whole((rows, Kt, 1)), _per_head((1, d), H),
                _per_head((1, d), H)] + [_per_head(s, H) for s in shapes],
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=_compiler_params(num_warps),
      interpret=interpret,
      name=f"{name}_gpu_fwd" + ("_res" if save_ckpt else ""),
  )(q, k, v, eta, ln_w, ln_b, *weights0)
  n_w = len(shapes)
  return outs[0], tuple(outs[1:1 + n_w]), tuple(outs[1 + n_w:])


def _backward_call(q, k, v, eta, ln_w, ln_b, ckpts, dz, dfinal, *, step, name, H, NC, group,
                   num_warps, interpret):
  BH, rows, Kt, d = q.shape
  shapes = [w.shape[2:] for w in ckpts]
  n_groups = ckpts[0].shape[1]
  tok, col = _whole((rows, Kt, d)), _whole((rows, Kt, 1))
  vec = _per_head((1, d), H)
  sds = jax.ShapeDtypeStruct
  outs = pl.pallas_call(
      functools.partial(_bwd_kernel, step=step, n_w=len(shapes), T=rows // NC,
                        n_chunks=NC, group=group),
      grid=(BH,),
      in_specs=([tok, tok, tok, col, vec, vec] + [_whole((n_groups, *s)) for s in shapes]
                + [tok] + [_whole(s) for s in shapes]),
      out_specs=[tok, tok, tok, col, _whole((1, d)), _whole((1, d))]
      + [_whole(s) for s in shapes],
      out_shape=([sds(q.shape, q.dtype), sds(k.shape, k.dtype), sds(v.shape, v.dtype),
                  sds(eta.shape, F32), sds((BH, 1, d), F32), sds((BH, 1, d), F32)]
                 + [sds((BH, *s), F32) for s in shapes]),
      compiler_params=_compiler_params(num_warps),
      interpret=interpret,
      name=f"{name}_gpu_bwd",
  )(q, k, v, eta, ln_w, ln_b, *ckpts, dz, *dfinal)
  return (*outs[:6], tuple(outs[6:]))


# ----------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------


def _is_pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def tile_size(K: int, block_k: int) -> int:
  """Kt: the token tile, min(K, block_k)."""
  return min(K, block_k)


def _check_kernel_constraints(model: InnerModel, q, matmul_dtype, K: int, d: int,
                              weight_shapes, block_k: int) -> int:
  """Named ValueErrors for what the Triton kernels cannot run; returns Kt."""
  fn = f"{model.name}_pallas_gpu"
  check_dtypes(fn, model.name, q, matmul_dtype)
  if not _is_pow2(block_k) or block_k < _MIN_DIM:
    raise ValueError(f"{fn}: block_k = {block_k} must be a power of two >= {_MIN_DIM}")
  Kt = tile_size(K, block_k)
  dims = [("Kt = min(K, block_k) (token tile)", Kt), ("d (head dim)", d)]
  if model is MLP:
    dims.append(("F (MLP hidden width)", weight_shapes[0][-1]))
  for what, n in dims:
    if not _is_pow2(n) or n < _MIN_DIM:
      raise ValueError(
          f"{fn}: {what} = {n} must be a power of two >= {_MIN_DIM}: Triton tensors "
          f"have power-of-two sizes and its tensor-core matmuls need dims >= {_MIN_DIM} "
          f"(K = {K}, block_k = {block_k}).")
  if K % Kt:
    raise ValueError(f"{fn}: K (mini-batch size) = {K} must be a multiple of the token "
                     f"tile Kt = min(K, block_k) = {Kt}")
  return Kt


def _ttt_pallas_gpu(model: InnerModel, q, k, v, eta, ln_weight, ln_bias, weights, B, H, NC,
                    K, d, *, matmul_dtype, return_final_weights, remat_group, eps, block_k,
                    num_warps, interpret):
  """Shared wrapper: checks, kernel layout, custom_vjp core, output layout."""
  check_array("q", q, q.shape, "[B, H, NC, K, d]")  # dtype check
  group = remat_group_size(remat_group, NC)
  matmul_dtype = F32 if matmul_dtype is None else jnp.dtype(matmul_dtype)
  Kt = _check_kernel_constraints(model, q, matmul_dtype, K, d, [w.shape[1:] for w in weights],
                                 block_k)
  if num_warps is None:
    num_warps = 4 if model is LINEAR else 8
  rows = NC * (K // Kt)
  step = minibatch.Step.make(model, mm=matmul(matmul_dtype, F32),
                             mm_vjp=kernel_matmul(matmul_dtype), eps=eps)
  calls = dict(step=step, name=model.name, H=H, NC=NC, group=group, num_warps=num_warps,
               interpret=interpret)
  core = make_custom_vjp(functools.partial(_forward_call, **calls),
                         functools.partial(_backward_call, **calls), B=B, H=H)
  return run_core(core, q, k, v, eta, ln_weight, ln_bias, weights,
                  token_shape=(B * H, rows, Kt, d), eta_shape=(B * H, rows, Kt, 1),
                  return_final_weights=return_final_weights)


def ttt_linear_pallas_gpu(
    q: Array, k: Array, v: Array, eta: Array,
    ln_weight: Array, ln_bias: Array, W: Array, b: Array,
    *,
    matmul_dtype: DType | None = None,
    return_final_weights: bool = False,
    remat_group: int | None = None,
    eps: float = LN_EPS,
    block_k: int = DEFAULT_BLOCK_K,
    num_warps: int | None = None,
    interpret: bool = False,
):
  """TTT-Linear inner loop as fused Pallas Triton kernels; see `ttt_jax.ops.ttt_linear`.

  Args:
    q, k, v: [B, H, NC, K, d] queries, keys and values of each head.
    eta: [B, H, NC, K] per-token inner learning rates.
    ln_weight, ln_bias: [H, d] the per-head inner LayerNorm.
    W: [H, d, d], b: [H, 1, d] initial fast weights of each head.
    matmul_dtype: dtype of matmul operands, float32 or bfloat16 (None: fp32).
    return_final_weights: also return the fast weights after the last step
      (differentiable like z).
    remat_group: store the fast weights for the backward only every this
      many mini-batches and recompute the others in the backward kernel
      (None: every mini-batch); never changes the results.
    eps: LayerNorm epsilon.
    block_k: token tile; mini-batches larger than this are processed in
      tiles of block_k tokens (large-chunk TTT).
    num_warps: Triton warps per program (None: 4 for TTT-Linear, 8 for TTT-MLP).
    interpret: run the kernels in Pallas interpret mode (e.g. on CPU).

  Returns:
    z [B, H, NC, K, d] in q's dtype, and if asked (W [B, H, d, d],
    b [B, H, 1, d]) in fp32.

  Raises:
    ValueError: for shapes, dtypes or remat_group values the kernels do not
      support (naming the constraint) and for mismatched shapes (as the op).
  """
  B, H, NC, K, d = check_tokens(q, k, v, eta, ln_weight, ln_bias)
  check_linear_weights(H, d, W, b)
  return _ttt_pallas_gpu(LINEAR, q, k, v, eta, ln_weight, ln_bias, (W, b), B, H, NC, K, d,
                         matmul_dtype=matmul_dtype, return_final_weights=return_final_weights,
                         remat_group=remat_group, eps=eps, block_k=block_k,
                         num_warps=num_warps, interpret=interpret)


def ttt_mlp_pallas_gpu(
    q: Array, k: Array, v: Array, eta: Array,
    ln_weight: Array, ln_bias: Array,
    W1: Array, b1: Array, W2: Array, b2: Array,
    *,
    matmul_dtype: DType | None = None,
    return_final_weights: bool = False,
    remat_group: int | None = None,
    eps: float = LN_EPS,
    block_k: int = DEFAULT_BLOCK_K,
    num_warps: int | None = None,
    interpret: bool = False,
):
  """TTT-MLP inner loop as fused Pallas Triton kernels; see `ttt_jax.ops.ttt_mlp`.

  Args:
    W1: [H, d, F], b1: [H, 1, F], W2: [H, F, d], b2: [H, 1, d] initial fast
      weights (F = 4d in the paper; a power of two >= 16).
    (the rest as in `ttt_linear_pallas_gpu`)

  Returns:
    z [B, H, NC, K, d] in q's dtype, and if asked the final (W1, b1, W2, b2)
    in fp32 with a leading batch axis.
  """
  B, H, NC, K, d = check_tokens(q, k, v, eta, ln_weight, ln_bias)
  check_mlp_weights(H, d, W1, b1, W2, b2)
  return _ttt_pallas_gpu(MLP, q, k, v, eta, ln_weight, ln_bias, (W1, b1, W2, b2), B, H, NC,
                         K, d, matmul_dtype=matmul_dtype,
                         return_final_weights=return_final_weights, remat_group=remat_group,
                         eps=eps, block_k=block_k, num_warps=num_warps, interpret=interpret)
