"""Fused Pallas TPU (Mosaic) kernels for the TTT inner loop, both inner models.

`ttt_linear_pallas` and `ttt_mlp_pallas` are drop-in replacements for
`ttt_jax.ops.ttt_linear` and `ttt_jax.ops.ttt_mlp` (same arguments,
semantics, output dtypes and gradients; `remat_group` means the same
memory/compute trade-off, see "Residuals"): the mini-batch GD step
on the fast weights of every (batch, head) stream, with the non-causal
read-out of each mini-batch through the post-update weights, fp32 state and
matmul operands in `matmul_dtype`.

One forward and one backward kernel serve both inner models. They are
parametrised by the inner model (`pallas_kernels.common.InnerModel`: the
op's own update and read-out) and by the tuple of fast-weight arrays; every
scratch buffer and in/out BlockSpec for the weights is built from those
arrays' shapes (per head):
  TTT-Linear  weights (W [d, d], b [1, d])
  TTT-MLP     weights (W1 [d, F], b1 [1, F], W2 [F, d], b2 [1, d])
Below, "the weights" is the whole tuple.

Design
------
Layout. The wrapper flattens (B, H) into one stream axis BH = B * H (a free
reshape of the contiguous [B, H, ...] inputs): q, k, v -> [BH, NC, K, d],
eta -> [BH, NC, 1, K], ln_weight/ln_bias -> [H, 1, d]. Every block spans
the full two trailing dims of its array, so the TPU rule "the last two dims
of a block are divisible by (8, 128) or equal the array's dims" holds for
any K, d and F, and the kernels see plain 2-D tiles:
  q, k, v, z  [K, d]     eta  [1, K]     ln_weight, ln_bias  [1, d]
  each fast weight its own tile ([d, d], [1, d] / [d, F], [1, F], [F, d], [1, d])
eta is stored as a lane-dense [1, K] row. The step needs it as a [K, 1]
column (it scales the rows of the [K, d] / [K, F] inner gradients), but a
[.., K, 1] array has a minor dim of 1, which the (8, 128) TPU tiling pads to
128 lanes (always in VMEM, and in HBM under XLA's default tiled layouts): up
to a 128x blow-up of eta and of its gradient. The kernel turns the row into
a column exactly with ops Mosaic lowers everywhere (see `_eta_column`);
its custom VJP turns the column cotangent back into a row. The head of stream bh
is bh % H, so the per-head initial weights, ln_weight and ln_bias are read
through the index_map (no [B, H, ...] broadcast in HBM). K, d and F must be
multiples of 8 (the fp32 sublane tile: they are the row counts of the
[K, d], [d, d], [d, F] and [F, d] tiles); d = 128 fills the 128
lanes, d = 64 (CogVideoX's head dim) uses half of each vreg but is legal.

Forward kernel. grid = (BH, NC) with dimension_semantics ("parallel",
"arbitrary"): the stream axis may be split across TensorCores, the
mini-batch axis runs in order on one core. The weights live in fp32 VMEM
scratch (one buffer per array) across the NC axis: loaded from the initial
weights at nc == 0, updated in place by each step, written to the
final-weight outputs (blocks whose index does not move along NC, hence
resident in VMEM and written back once) at the last nc. One grid step = one
mini-batch of one stream: q/k/v/eta blocks are pipelined (double-buffered)
by Pallas while the previous mini-batch runs.

Residuals for the backward. The forward used under autodiff also writes
checkpoints: the weights that every G-th mini-batch STARTS from, an fp32
[BH, ceil(NC / G), *shape] array per weight (the output block index is
nc // G, written at nc % G == 0), where G = remat_group (None: G = 1, a
checkpoint per mini-batch, no recompute). Primal calls that are not
differentiated use a kernel variant that writes no checkpoints.

Per stream and mini-batch, in fp32 bytes, with K = 64, d = 64, F = 4d = 256:
  the mini-batch's own q, k, v     3 K d           48 KiB (24 KiB in bf16)
  TTT-Linear checkpoint            d^2 + d         16.3 KiB
  TTT-MLP checkpoint               2dF + F + d     129.3 KiB  (= 8d^2 + 5d)
  for reference, autodiff of the op's lax.scan without remat keeps the
  carried weights and the step's [K, d] and [K, F] intermediates:
  ~240 KiB (TTT-Linear), ~1.9 MiB (TTT-MLP) per mini-batch (measured with
  jax's saved_residuals, inputs included).
  * TTT-Linear: a checkpoint per mini-batch (G = 1) costs a third of the
    fp32 inputs, and the backward then needs no forward re-run: each reverse
    step re-derives its own mini-batch from its starting weights (inside
    jax.vjp) and nothing else, one simple sequential pass with O(d^2) VMEM.
  * TTT-MLP: a checkpoint per mini-batch is 2.7x the fp32 inputs (5.4x
    bf16 ones), and it is an HBM buffer that lives from the forward to the
    backward: e.g. 48 heads x 1024 mini-batches (65k tokens) x 129 KiB =
    6.1 GiB per layer call and sample. Still well below the XLA scan's
    residuals without remat, but the dominant activation of the layer.
    Hence remat_group = G: only every G-th starting state is stored (/ G
    in HBM; G = 4 brings TTT-MLP to 32 KiB per mini-batch, below its fp32
    inputs) and the backward kernel re-runs the G - 1 forward steps inside
    each group from its checkpoint. Cost: (G - 1) / G of one extra forward
    pass in total (the op's `remat_group` re-runs whole groups: one extra
    forward), G weight sets of
    VMEM stash (129 KiB each at d = 64, F = 256) and G-times larger token
    blocks in the backward; `_check_kernel_constraints` rejects a G whose
    VMEM estimate exceeds the budget. G = 1 remains the default for both
    models, matching the op, whose remat_group=None keeps every step's
    residuals; pass remat_group (the dispatcher `ttt_jax.ops.inner_loop` forwards
    the layer's) when the checkpoints are the memory bottleneck.

Backward kernel. grid = (BH, ceil(NC / G)), walking the groups of G
mini-batches backwards through the index_map (group = NG - 1 - g); token,
eta and dz blocks span the G mini-batches of a group, the checkpoint block
is the group's. The cotangents of the carried weights live in fp32 VMEM
scratch (seeded at the first reverse step with the cotangent of the final
weights, which is zero unless the caller differentiates them), as do the
running sums of the LayerNorm parameter gradients. Per group: the
checkpoint is copied to stash[0] and the first n - 1 forward steps are
re-run into stash[1 .. n-1] (n = G, or the remainder for the last group
when G does not divide NC: a partial block, whose out-of-range rows are
never read, guarded by pl.when; Pallas drops its out-of-range writes).
Then for j = n - 1 .. 0 the kernel runs `pallas_kernels.minibatch.backward`
at stash[j] and mini-batch j with the carried weight cotangent and dz_j:
jax.vjp of the op's own read-out and update (one VJP each when the
mini-batch is one tile), giving dweights_{j-1}, dq, dk, dv, deta and the
LayerNorm-parameter gradients. With G = 1 there is no stash and no loop:
the checkpoint block is the starting state. The per-stream gradients of the
initial weights and of ln_weight, ln_bias are written at the last reverse
step; the wrapper sums them over B.

Shared math. Both kernels run `pallas_kernels.minibatch` (forward, backward
and the update-only recompute of one mini-batch in token tiles) over the
op's own update and read-out (batch-polymorphic einsums, here on plain 2-D
tiles), with `_eta_column` in front of the update; the GPU kernels run the
same functions, so the XLA scan and all kernels share one definition of the
step.

Large mini-batches ("large-chunk" TTT, K in the hundreds or thousands). The
mini-batch's token blocks ([K, d], lane-padded) are held whole in VMEM, but
the step runs in token tiles of Kt = min(K, 512) (static slices; K above
512 must be a multiple of it): the update is summed over tiles, then each
tile is read out, so [Kt, F] intermediates and 128 x 128 eta selects are
all that one tile adds. Up to an estimated 16 MiB (the smallest default
scoped-VMEM limit) the kernels keep the default limit; above it they
request 48 MiB, and beyond that they refuse with a named error. In fp32 at
d = 64 that is about 18 / 27 MiB at K = 2048 (TTT-Linear / TTT-MLP) and
32 / 41 MiB at K = 4096.

Matmul precision. With matmul_dtype = fp32 every matmul (forward and
backward) has fp32 operands at Precision.HIGHEST, as in the op. With
matmul_dtype = bf16 the forward matmuls are exactly the op's (bf16
operands, fp32 accumulation). In the backward, autodiff of the op pairs an
fp32 cotangent with a bf16 operand: a mixed-dtype matmul, which Mosaic's
matmul canonicalisation only accepts in its compatibility mode, and which
XLA:TPU at DEFAULT precision is expected to run as a single bf16 MXU pass
anyway. The kernel's matmul therefore carries a custom VJP
(`pallas_kernels.common.kernel_matmul`) that rounds the cotangent to bf16 as well, so every
backward matmul is a native bf16 x bf16 -> fp32 MXU op. On CPU the op
computes those mixed matmuls in fp32, so bf16 gradients differ from the
op's by about one bf16 rounding of the cotangents per matmul (0.4 %; the
tests bound it and check the kernel's bf16 gradients are about as accurate
as the op's). For fp32 the custom VJP is the same math as autodiff,
arranged so no explicit transposes are emitted.

Everything else (LayerNorm statistics, GELU, the inner gradients, the state
and all reductions) is fp32, as in the op; fp64 has no Pallas TPU lowering
and is rejected.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import minibatch
from pallas_kernels.common import (F32, LINEAR, MLP, InnerModel, check_dtypes, kernel_matmul,
                                   make_custom_vjp, remat_group_size, run_core,
                                   split_refs, to_kernel_dtype)
from ttt_jax.ttt_step import (LN_EPS, check_array, check_linear_weights, check_mlp_weights,
                              check_tokens, matmul)

Array = jax.Array
DType = Any

_SUBLANES = 8  # fp32 rows per vreg: K, d and F are row counts of kernel tiles
_LANES = 128
# The kernels keep everything for one mini-batch (one group of G in the
# backward) in VMEM and are not tiled further. Up to the smallest default
# scoped-VMEM limit across TPU generations (16 MiB) they keep the default;
# above it (large mini-batches) they ask for up to 48 MiB, which fits the
# physical VMEM of v5e / v6e (128 MiB), v5p (95 MiB) and v7x (64 MiB).
_DEFAULT_VMEM_BYTES = 16 * 2**20
_VMEM_LIMIT_BYTES = 48 * 2**20


# Live [Kt, F] intermediates (beyond the [Kt, d] ones) of a step's VJP, for
# the VMEM estimate.
_KF_TEMPS = {LINEAR.name: 0, MLP.name: 14}
# Token tile: mini-batches up to this size are one tile, larger ones must be
# multiples of it (see "Large mini-batches").
_TILE_K = 512


def tile_size(K: int) -> int:
  return min(K, _TILE_K)


# ----------------------------------------------------------------------------
# The per-mini-batch step (pure jnp; traced inside both kernels).
# ----------------------------------------------------------------------------


def _diagonal(x: Array, axis: int) -> Array:
  """[1, n] row -> [n, 1] column (axis=1) or back (axis=0), exactly.

  A reshape or transpose would move the n values between lanes and
  sublanes, a relayout Mosaic does not lower for every shape. Instead:
  broadcast to [n, n], keep the diagonal and reduce over `axis` (one
  nonzero term per row or column, so the sum is exact). iota, select and
  reductions lower on every TPU generation.
  """
  n = max(x.shape)
  rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return jnp.sum(jnp.where(rows == cols, jnp.broadcast_to(x, (n, n)), 0.0), axis=axis,
                 keepdims=True)


def _pieces(x: Array, axis: int) -> list[Array]:
  """x cut along `axis` into 128-long pieces: the [n, n] selects stay one
  vreg-tile wide (a [K, K] one would be 16 MiB at K = 2048)."""
  return [jax.lax.slice_in_dim(x, j, min(j + _LANES, x.shape[axis]), axis=axis)
          for j in range(0, x.shape[axis], _LANES)]


def _join(pieces: list[Array], axis: int) -> Array:
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=axis)


@jax.custom_vjp
def _eta_column(eta_row: Array) -> Array:
  """[1, K] row -> [K, 1] column, exactly, piece by piece (see `_diagonal`).

  The custom VJP is the mirror image (column pieces -> row pieces), so
  autodiff emits no pads or transposes of the pieces.
  """
  return _join([_diagonal(p, axis=1) for p in _pieces(eta_row, axis=1)], axis=0)


def _eta_column_fwd(eta_row):
  return _eta_column(eta_row), None


def _eta_column_bwd(_, g_col):
  return (_join([_diagonal(p, axis=0) for p in _pieces(g_col, axis=0)], axis=1),)


_eta_column.defvjp(_eta_column_fwd, _eta_column_bwd)


class _Tiles(minibatch.Tiles):
  """Token tiles of one mini-batch held in VMEM blocks: rows [t Kt, (t+1) Kt)
  of the [K, d] token tiles and lanes of the [1, K] eta row, by static
  slices (the tile loop is a Python loop). `j` picks the mini-batch of a
  group block ([G, K, d]) in the backward; None for the forward's [K, d]."""

  def __init__(self, tok_refs, Kt: int, T: int, j=None, **out_refs):
    super().__init__(tok_refs, T, **out_refs)
    self.Kt, self.j = Kt, j

  def index(self, t, eta=False):
    rows = pl.ds(t * self.Kt, self.Kt)
    idx = (slice(None), rows) if eta else (rows, slice(None))
    return idx if self.j is None else (self.j, *idx)

  def loop(self, body, carry):
    for t in range(self.T):
      carry = body(t, carry)
    return carry


# ----------------------------------------------------------------------------
# Kernels, generic over the tuple of n_w fast-weight refs.
# ----------------------------------------------------------------------------


def _fwd_kernel(*refs, step, n_w, group, save_ckpt, Kt):
  tok_refs, w0_refs, (z_ref,), wf_refs, ckpt_refs, w_scr = split_refs(
      refs, 6, n_w, 1, n_w, n_w if save_ckpt else 0, n_w)
  nc = pl.program_id(1)

  @pl.when(nc == 0)
  def _init():
    for s, w0 in zip(w_scr, w0_refs):
      s[...] = w0[...]

  weights = tuple(s[...] for s in w_scr)

  if save_ckpt:
    @pl.when(jax.lax.rem(nc, group) == 0 if group > 1 else True)
    def _checkpoint():  # the weights this mini-batch (the first of its group) starts from
      for c, w in zip(ckpt_refs, weights):
        c[...] = w

  K = z_ref.shape[0]
  new_weights = minibatch.forward(step, _Tiles(tok_refs, Kt, K // Kt, z_ref=z_ref),
                                  weights)
  for s, w in zip(w_scr, new_weights):
    s[...] = w

  @pl.when(nc == pl.num_programs(1) - 1)
  def _final():
    for o, s in zip(wf_refs, w_scr):
      o[...] = s[...]


def _loop(n: int, body: Callable[[Any], None], *, reverse: bool = False) -> None:
  """body(j) for j in range(n) (reversed if asked); no loop at all for n == 1."""
  if n == 1:
    body(0)
  elif n > 1:
    def f(i, carry):
      body(n - 1 - i if reverse else i)
      return carry
    jax.lax.fori_loop(0, n, f, None)


def _bwd_kernel(*refs, step, n_w, group, n_chunks, Kt):
  stash_n = n_w if group > 1 else 0
  tok_refs, ckpt_refs, (dz_ref,), dwf_refs, \
      (dq_ref, dk_ref, dv_ref, deta_ref, dlnw_ref, dlnb_ref), dw0_refs, \
      dw_scr, stash, (dlnw_scr, dlnb_scr) = split_refs(
          refs, 6, n_w, 1, n_w, 6, n_w, n_w, stash_n, 2)
  g = pl.program_id(1)  # reverse step: group NG - 1 - g
  n_groups = -(-n_chunks // group)
  T = dz_ref.shape[1] // Kt
  grad_refs = (dz_ref, dq_ref, dk_ref, dv_ref, deta_ref)

  @pl.when(g == 0)
  def _init():
    for s, dwf in zip(dw_scr, dwf_refs):
      s[...] = dwf[...]
    dlnw_scr[...] = jnp.zeros_like(dlnw_scr)
    dlnb_scr[...] = jnp.zeros_like(dlnb_scr)

  # Mini-batches of this group that exist (fewer than G only in the last
  # group, when G does not divide NC); Python True where no guard is needed.
  if n_chunks % group:
    n_valid = jnp.minimum(group, n_chunks - (n_groups - 1 - g) * group)
    valid = lambda j: j < n_valid
  else:
    valid = lambda j: True

  if group == 1:
    start = lambda j: tuple(c[...] for c in ckpt_refs)
  else:
    start = lambda j: tuple(s[j] for s in stash)
    for s, c in zip(stash, ckpt_refs):
      s[0] = c[...]

    def recompute(j):  # stash[j + 1] = the weights after mini-batch j
      @pl.when(valid(j + 1))
      def _():
        new_weights = minibatch.updated(step, _Tiles(tok_refs, Kt, T, j=j), start(j))
        for s, w in zip(stash, new_weights):
          s[j + 1] = w

    _loop(group - 1, recompute)

  def reverse_step(j):
    @pl.when(valid(j))
    def _():
      zeros = (jnp.zeros_like(dlnw_scr), jnp.zeros_like(dlnb_scr))
      dstart, (dlnw, dlnb) = minibatch.backward(
          step, _Tiles(tok_refs, Kt, T, j=j, grad_refs=grad_refs), start(j),
          tuple(s[...] for s in dw_scr), zeros)
      for s, dw in zip(dw_scr, dstart):
        s[...] = dw
      dlnw_scr[...] += dlnw
      dlnb_scr[...] += dlnb

  _loop(group, reverse_step, reverse=True)

  @pl.when(g == n_groups - 1)
  def _final():
    for o, s in zip(dw0_refs, dw_scr):
      o[...] = s[...]
    dlnw_ref[...] = dlnw_scr[...]
    dlnb_ref[...] = dlnb_scr[...]


# ----------------------------------------------------------------------------
# pallas_call builders.
# ----------------------------------------------------------------------------

_SQ = pl.squeezed


def _zeros(shape) -> tuple[int, ...]:
  return (0,) * len(shape)


def _tok_spec(rows: int, cols: int, lead: Any, chunk: Callable) -> pl.BlockSpec:
  """[BH, NC, rows, cols] token-like array; per grid step one mini-batch
  (lead = squeezed: [rows, cols] refs) or a group of `lead` ([lead, rows, cols])."""
  return pl.BlockSpec((_SQ, lead, rows, cols), lambda bh, i: (bh, chunk(i), 0, 0))


def _head_spec(shape, H: int) -> pl.BlockSpec:
  """[H, *shape] per-head array, read by stream bh as head bh % H."""
  return pl.BlockSpec((_SQ, *shape), lambda bh, i: (bh % H, *_zeros(shape)))


def _stream_spec(shape) -> pl.BlockSpec:
  """[BH, *shape] per-stream array, resident across the grid's second axis."""
  return pl.BlockSpec((_SQ, *shape), lambda bh, i: (bh, *_zeros(shape)))


def _ckpt_spec(shape, index: Callable) -> pl.BlockSpec:
  """[BH, NG, *shape] checkpoints; grid step i uses checkpoint index(i)."""
  return pl.BlockSpec((_SQ, _SQ, *shape), lambda bh, i: (bh, index(i), *_zeros(shape)))


def _compiler_params(vmem_limit: int):
  return pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                              vmem_limit_bytes=vmem_limit)


def _forward_call(q, k, v, eta, ln_w, ln_b, weights0, *, save_ckpt, H, step, group, Kt, name,
                  vmem_limit, interpret):
  BH, NC, K, d = q.shape
  shapes = [w.shape[1:] for w in weights0]
  n_groups = -(-NC // group)
  chunk = lambda i: i
  tok, row = _tok_spec(K, d, _SQ, chunk), _tok_spec(1, K, _SQ, chunk)
  vec = _head_spec((1, d), H)
  sds = jax.ShapeDtypeStruct
  out_specs = [tok] + [_stream_spec(s) for s in shapes]
  out_shape = [sds((BH, NC, K, d), q.dtype)] + [sds((BH, *s), F32) for s in shapes]
  if save_ckpt:
    # lax.div, not //: jnp's floor division of ints emits lax.sign, whose
    # Mosaic lowering queries the TPU generation (unavailable when exporting
    # from a CPU host); for the non-negative i it is the same.
    out_specs += [_ckpt_spec(s, lambda i: jax.lax.div(i, group)) for s in shapes]
    out_shape += [sds((BH, n_groups, *s), F32) for s in shapes]
  outs = pl.pallas_call(
      functools.partial(_fwd_kernel, step=step, n_w=len(shapes), group=group,
                        save_ckpt=save_ckpt, Kt=Kt),
      grid=(BH, NC),
      in_specs=[tok, tok, tok, row, vec, vec] + [_head_spec(s, H) for s in shapes],
      out_specs=out_specs,
      out_shape=out_shape,
      scratch_shapes=[pltpu.VMEM(s, F32) for s in shapes],
      compiler_params=_compiler_params(vmem_limit),
      interpret=interpret,
      name=f"{name}_fwd" + ("_res" if save_ckpt else ""),
  )(q, k, v, eta, ln_w, ln_b, *weights0)
  n_w = len(shapes)
  return outs[0], tuple(outs[1:1 + n_w]), tuple(outs[1 + n_w:])


def _backward_call(q, k, v, eta, ln_w, ln_b, ckpts, dz, dweights_f, *, H, step, group, Kt,
                   name, vmem_limit, interpret):
  BH, NC, K, d = q.shape
  shapes = [w.shape[2:] for w in ckpts]
  n_groups = -(-NC // group)
  rev = lambda i: n_groups - 1 - i
  tok, row = _tok_spec(K, d, group, rev), _tok_spec(1, K, group, rev)
  vec = _head_spec((1, d), H)
  svec = _stream_spec((1, d))
  sds = jax.ShapeDtypeStruct
  scratch = [pltpu.VMEM(s, F32) for s in shapes]  # cotangents of the weights
  if group > 1:
    scratch += [pltpu.VMEM((group, *s), F32) for s in shapes]  # recomputed states
  scratch += [pltpu.VMEM((1, d), F32), pltpu.VMEM((1, d), F32)]
  outs = pl.pallas_call(
      functools.partial(_bwd_kernel, step=step, n_w=len(shapes), group=group, n_chunks=NC,
                        Kt=Kt),
      grid=(BH, n_groups),
      in_specs=([tok, tok, tok, row, vec, vec] + [_ckpt_spec(s, rev) for s in shapes]
                + [tok] + [_stream_spec(s) for s in shapes]),
      out_specs=[tok, tok, tok, row, svec, svec] + [_stream_spec(s) for s in shapes],
      out_shape=([sds(q.shape, q.dtype), sds(k.shape, k.dtype), sds(v.shape, v.dtype),
                  sds(eta.shape, F32), sds((BH, 1, d), F32), sds((BH, 1, d), F32)]
                 + [sds((BH, *s), F32) for s in shapes]),
      scratch_shapes=scratch,
      compiler_params=_compiler_params(vmem_limit),
      interpret=interpret,
      name=f"{name}_bwd",
  )(q, k, v, eta, ln_w, ln_b, *ckpts, dz, *dweights_f)
  return (*outs[:6], tuple(outs[6:]))


# ----------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------


def _vmem_estimate_bytes(model: InnerModel, K: int, d: int, weight_shapes, itemsize: int,
                         group: int) -> int:
  """Rough VMEM need of the backward kernel (the larger one), in bytes."""
  pad = lambda n, m: -(-n // m) * m
  tile = lambda rows, cols: pad(rows, _SUBLANES) * pad(cols, _LANES)  # fp32 elements
  F = max(s[-1] for s in weight_shapes)  # hidden width (d for TTT-Linear)
  Kt = tile_size(K)
  tok, row, vec = tile(K, d), tile(1, K), tile(1, d)
  wset = sum(tile(*s) for s in weight_shapes)  # one copy of the fast weights
  # q, k, v, dz in and dq, dk, dv out (G mini-batches each), eta and deta,
  # checkpoint, final-weight cotangent and dweights0, ln params and their grads.
  blocks = 7 * group * tok * itemsize + 2 * group * row * 4 + 3 * wset * 4 + 4 * vec * 4
  scratch = (1 + (group if group > 1 else 0)) * wset * 4 + 2 * vec * 4
  # One token tile's intermediates at a time ([Kt, d], [Kt, F]), the weight
  # sets of the step (start, updated, their cotangents) and the eta selects.
  piece = min(Kt, _LANES)
  temps = (12 * tile(Kt, d) + _KF_TEMPS[model.name] * tile(Kt, F) + 4 * wset
           + 2 * tile(piece, piece)) * 4
  return 2 * blocks + scratch + temps  # in/out blocks are double-buffered


def _check_kernel_constraints(model: InnerModel, q, matmul_dtype, K: int, d: int,
                              weight_shapes, group: int) -> int:
  """Named ValueErrors for what the kernels cannot run; returns the VMEM limit."""
  fn = f"{model.name}_pallas"
  check_dtypes(fn, model.name, q, matmul_dtype)
  if K > _TILE_K and K % _TILE_K:
    raise ValueError(f"{fn}: K (mini-batch size) = {K} must be at most {_TILE_K} or a "
                     f"multiple of it: larger mini-batches run in {_TILE_K}-token tiles")
  dims = [("K (mini-batch size)", K), ("d (head dim)", d)]
  if model is MLP:
    dims.append(("F (MLP hidden width)", weight_shapes[0][-1]))
  for what, n in dims:
    if n % _SUBLANES:
      raise ValueError(
          f"{fn}: {what} = {n} must be a multiple of {_SUBLANES}: it is the row "
          f"count of some of the kernel's fp32 VMEM tiles ([K, d], [d, d], [d, F], "
          f"[F, d]; TPU sublane tile {_SUBLANES}). d a multiple of {_LANES} uses full vregs.")
  itemsize = to_kernel_dtype(q).dtype.itemsize
  need = _vmem_estimate_bytes(model, K, d, weight_shapes, itemsize, group)
  if need > _VMEM_LIMIT_BYTES:
    raise ValueError(
        f"{fn}: K = {K}, d = {d}, weights {[tuple(s) for s in weight_shapes]}, "
        f"remat_group {group} need about {need / 2**20:.1f} MiB of VMEM per grid step "
        f"(one mini-batch, or a group of remat_group in the backward, the fast weights "
        f"and their cotangents are held whole), over the {_VMEM_LIMIT_BYTES // 2**20} "
        f"MiB limit; use ttt_jax.ops.{model.name}, a smaller remat_group, mini-batch "
        f"or head dim.")
  # Raise the scoped-VMEM limit only where the default may not do.
  return None if need <= _DEFAULT_VMEM_BYTES else _VMEM_LIMIT_BYTES


def _ttt_pallas(model: InnerModel, q, k, v, eta, ln_weight, ln_bias, weights, B, H, NC, K,
                d, *, matmul_dtype, return_final_weights, remat_group, eps, interpret):
  """Shared wrapper: checks, kernel layout, custom_vjp core, output layout."""
  check_array("q", q, q.shape, "[B, H, NC, K, d]")  # dtype check
  group = remat_group_size(remat_group, NC)
  matmul_dtype = F32 if matmul_dtype is None else jnp.dtype(matmul_dtype)
  vmem_limit = _check_kernel_constraints(model, q, matmul_dtype, K, d,
                                         [w.shape[1:] for w in weights], group)
  if interpret is True:
    interpret = pltpu.InterpretParams()
  step = minibatch.Step.make(model, mm=matmul(matmul_dtype, F32),
                             mm_vjp=kernel_matmul(matmul_dtype), eps=eps, eta_column=_eta_column)
  calls = dict(H=H, step=step, group=group, Kt=tile_size(K), name=model.name,
               vmem_limit=vmem_limit, interpret=interpret)
  core = make_custom_vjp(functools.partial(_forward_call, **calls),
                         functools.partial(_backward_call, **calls), B=B, H=H)
  return run_core(core, q, k, v, eta, ln_weight, ln_bias, weights,
                  token_shape=(B * H, NC, K, d), eta_shape=(B * H, NC, 1, K),
                  return_final_weights=return_final_weights)


def ttt_linear_pallas(
    q: Array, k: Array, v: Array, eta: Array,
    ln_weight: Array, ln_bias: Array, W: Array, b: Array,
    *,
    matmul_dtype: DType | None = None,
    return_final_weights: bool = False,
    remat_group: int | None = None,
    eps: float = LN_EPS,
    interpret: bool | pltpu.InterpretParams = False,
):
  """TTT-Linear inner loop as fused Pallas TPU kernels; see `ttt_jax.ops.ttt_linear`.

  Args:
    q, k, v: [B, H, NC, K, d] queries, keys and values of each head.
    eta: [B, H, NC, K] per-token inner learning rates.
    ln_weight, ln_bias: [H, d] the per-head inner LayerNorm.
    W: [H, d, d], b: [H, 1, d] initial fast weights of each head.
    matmul_dtype: dtype of matmul operands, float32 or bfloat16 (None: fp32).
    return_final_weights: also return the fast weights after the last step
      (differentiable like z).
    remat_group: store the fast weights for the backward only every this
      many mini-batches and recompute the others inside the backward kernel
      (None: every mini-batch, no recompute); see the module docstring. The
      same trade-off as the op's remat_group; never changes the results.
    eps: LayerNorm epsilon.
    interpret: run the kernels in Pallas TPU interpret mode (on CPU). True
      means `pltpu.InterpretParams()`; an `InterpretParams` is passed through.
      Kernels traced under `pltpu.force_tpu_interpret_mode()` are
      interpreted as well.

  Returns:
    z [B, H, NC, K, d] in q's dtype, and if asked (W [B, H, d, d],
    b [B, H, 1, d]) in fp32.

  Raises:
    ValueError: for shapes, dtypes or remat_group values the kernels do not
      support (see `_check_kernel_constraints`) and for mismatched shapes
      (as the op).
  """
  B, H, NC, K, d = check_tokens(q, k, v, eta, ln_weight, ln_bias)
  check_linear_weights(H, d, W, b)
  return _ttt_pallas(LINEAR, q, k, v, eta, ln_weight, ln_bias, (W, b), B, H, NC, K, d,
                     matmul_dtype=matmul_dtype, return_final_weights=return_final_weights,
                     remat_group=remat_group, eps=eps, interpret=interpret)


def ttt_mlp_pallas(
    q: Array, k: Array, v: Array, eta: Array,
    ln_weight: Array, ln_bias: Array,
    W1: Array, b1: Array, W2: Array, b2: Array,
    *,
    matmul_dtype: DType | None = None,
    return_final_weights: bool = False,
    remat_group: int | None = None,
    eps: float = LN_EPS,
    interpret: bool | pltpu.InterpretParams = False,
):
  """TTT-MLP inner loop as fused Pallas TPU kernels; see `ttt_jax.ops.ttt_mlp`.

  Args:
    W1: [H, d, F], b1: [H, 1, F], W2: [H, F, d], b2: [H, 1, d] initial fast
      weights (F = 4d in the paper; any multiple of 8 works).
    (the rest as in `ttt_linear_pallas`; remat_group matters most here: a
    TTT-MLP checkpoint is 2dF + F + d floats per mini-batch and stream)

  Returns:
    z [B, H, NC, K, d] in q's dtype, and if asked the final (W1, b1, W2, b2)
    in fp32 with a leading batch axis.
  """
  B, H, NC, K, d = check_tokens(q, k, v, eta, ln_weight, ln_bias)
  check_mlp_weights(H, d, W1, b1, W2, b2)
  return _ttt_pallas(MLP, q, k, v, eta, ln_weight, ln_bias, (W1, b1, W2, b2), B, H, NC, K,
                     d, matmul_dtype=matmul_dtype, return_final_weights=return_final_weights,
                     remat_group=remat_group, eps=eps, interpret=interpret)
