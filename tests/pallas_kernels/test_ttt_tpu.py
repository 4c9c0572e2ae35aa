"""The Pallas TPU TTT kernels (TTT-Linear and TTT-MLP) against the pure-JAX ops.

Numerics run in Pallas TPU interpret mode on CPU (it simulates VMEM scratch,
the grid and the block pipeline). Lowering to Mosaic is checked with
`jax.export` for platform "tpu", which runs the Pallas -> Mosaic lowering
and serialises each kernel into a `tpu_custom_call`; compiling that Mosaic
module needs a TPU and is not exercised here.

Interpret mode costs seconds per kernel trace, so the shapes are few and
small: d = 128 only for TTT-Linear, TTT-MLP at d = 64, F = 4d = 256. Both
kernels share one implementation; `remat_group` (checkpoints every G-th
mini-batch, recompute inside the backward kernel) is covered with a G that
divides NC and one that does not (partial last group) in interpret mode,
and in the lowering tests.

Tolerances are relative to the largest magnitude of the reference array,
max|got - want| <= tol * max(1, max|want|): gradients here reach O(10-100),
and fp32 round-off scales with them.
  fp32: 1e-5 (values), 1e-4 (gradients): same operations, only the
    summation order of batched vs 2-D matmuls differs.
  bf16 matmul operands: values 2e-3, the op's forward operations are
    replayed exactly, so only a rare bf16 rounding flip of a matmul operand
    (one bf16 ulp, 2^-8 relative, of one product term) separates them.
    Gradients 3e-2: the kernel's backward rounds cotangents to bf16 before
    its matmuls (MXU-native, see the kernel docstring) where the op's
    autodiff keeps them fp32 on CPU; that is one extra bf16 rounding
    (0.4 %) per matmul, compounded over a few chained matmuls and steps
    (TTT-MLP chains two layers, still ~5e-3 observed). We also check the
    kernel's bf16 gradients are about as accurate as the op's bf16
    gradients, measured against the fp32 op.
"""

from __future__ import annotations

import base64
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.interpreters import mlir
from jax._src.lib.mlir import ir
from jax.experimental.mosaic.dialects import tpu as tpu_dialect
from jax.experimental.pallas import tpu as pltpu

from tests.pallas_kernels.kernel_testing import (assert_close, check_against_op,
                                                 check_bf16_against_op, check_bf16_tokens,
                                                 export_text, grad_structs, loss_of,
                                                 make_inputs, np_inputs, weight_shapes)
from pallas_kernels.tpu import ttt as kernel_mod
from pallas_kernels.tpu import ttt_linear_pallas, ttt_mlp_pallas
from ttt_jax.ops import ttt_linear

KERNELS = {"linear": ttt_linear_pallas, "mlp": ttt_mlp_pallas}


def kernel(kind):
  return functools.partial(KERNELS[kind], interpret=True)


# ----------------------------------------------------------------------------
# The shared step math.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("K", [16, 200, 512])
def test_eta_row_to_column_and_back_exactly(K):
  """`_eta_column` ([1, K] row -> [K, 1] column in 128-lane pieces; K = 200
  ends in a ragged piece) and its mirrored VJP are exact permutations."""
  row = jax.random.uniform(jax.random.key(0), (1, K))
  col, vjp = jax.vjp(kernel_mod._eta_column, row)
  np.testing.assert_array_equal(col, row.T)
  g = jax.random.normal(jax.random.key(1), (K, 1))
  np.testing.assert_array_equal(vjp(g)[0], g.T)


# ----------------------------------------------------------------------------
# Kernel vs op, interpret mode.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, shape, remat_group", [
    ("linear", (1, 1, 1, 8, 128), None),
    ("linear", (2, 2, 3, 16, 64), None),
    ("linear", (1, 2, 4, 16, 64), 2),  # G divides NC
    ("mlp", (1, 1, 2, 8, 64), None),
    ("mlp", (1, 2, 3, 16, 64), 2),  # partial group (3 = 2 + 1), walked first
], ids=lambda p: p if isinstance(p, str) else ("B%dH%dNC%dK%dd%d" % p if isinstance(p, tuple)
                                               else f"G{p}"))
def test_matches_op_fp32(kind, shape, remat_group):
  z, w = check_against_op(kind, kernel(kind), shape, tol_values=1e-5, tol_grads=1e-4,
                          remat_group=remat_group)
  if remat_group is not None:
    return  # the primal-only forward kernel does not depend on remat_group
  # The primal-only kernel (no checkpoint outputs) agrees with the autodiff one.
  z_plain, w_plain = kernel(kind)(*make_inputs(kind, *shape), return_final_weights=True)
  np.testing.assert_array_equal(z_plain, z)
  for got, want in zip(w_plain, w):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind, shape", [("linear", (2, 2, 3, 16, 64)),
                                         ("mlp", (1, 2, 3, 16, 64))])
def test_matches_op_bf16_matmul(kind, shape):
  check_bf16_against_op(kind, kernel(kind), shape)


def test_bf16_tokens():
  check_bf16_tokens(kernel("linear"), (1, 1, 2, 8, 64))


@pytest.mark.parametrize("kind, K", [("linear", 512), ("mlp", 200), ("mlp", 1024)])
def test_large_chunk_matches_op(kind, K):
  """Large-chunk TTT: hundreds of tokens per inner step, eta turned into a
  column in 128-lane pieces (K = 200: a ragged last one); K = 1024 runs as
  two 512-token tiles (update summed over tiles, then each read out)."""
  check_against_op(kind, kernel(kind), (1, 1, 2, K, 64), tol_values=1e-5, tol_grads=1e-4)


def test_large_chunk_raises_the_vmem_limit():
  """Mini-batches whose VMEM estimate exceeds the 16 MiB default scoped limit
  ask Mosaic for 48 MiB (TTT-MLP, K = 2048 here); small ones keep the default."""
  def scoped_vmem(K):
    structs = grad_structs("mlp", 1, 2, 2, K, 64, jnp.bfloat16)
    text = export_text(ttt_mlp_pallas, "tpu", *structs)
    return re.findall(r'\\22scoped_memory_configs\\22: \[\{\\22memory_space\\22:1, '
                      r'\\22offset\\22: 0, \\22size\\22: (\d+)\}', text)

  assert scoped_vmem(64) == []
  assert scoped_vmem(2048) == [str(48 * 2**20)]


def test_force_tpu_interpret_mode_context():
  args = make_inputs("linear", 1, 1, 2, 8, 64)
  with pltpu.force_tpu_interpret_mode():
    z = ttt_linear_pallas(*args)  # interpret=False: the context decides
  assert_close(z, ttt_linear(*args), 1e-5, "z")


# ----------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, kwargs, call_kw, match", [
    ("linear", dict(K=12), {}, r"K \(mini-batch size\) = 12 must be a multiple of 8"),
    ("linear", dict(d=60), {}, r"d \(head dim\) = 60 must be a multiple of 8"),
    ("linear", dict(dtype=np.float64), {}, "ttt_linear_pallas: q is float64"),
    ("linear", {}, dict(matmul_dtype=jnp.float16), "matmul_dtype must be float32 or bfloat16"),
    ("mlp", dict(K=8192, d=64), {}, "need about 69.4 MiB of VMEM .* over the 48 MiB limit"),
    ("linear", dict(K=1000), {}, r"K \(mini-batch size\) = 1000 must be at most 512 or a multiple of it"),
    ("mlp", dict(F=100), {}, r"F \(MLP hidden width\) = 100 must be a multiple of 8"),
    ("mlp", dict(dtype=np.float64), {}, "ttt_mlp_pallas: q is float64"),
    ("mlp", dict(K=64, d=512), {}, "ttt_mlp_pallas: .* MiB of VMEM"),
    # G = 128 stashes 128 weight sets of 204 KiB (lane-padded) in VMEM.
    ("mlp", dict(NC=128, K=64), dict(remat_group=128), "remat_group 128 need about"),
    ("mlp", {}, dict(remat_group=0), "remat_group must be a positive int or None, got 0"),
    ("linear", {}, dict(remat_group=1.5), "remat_group must be a positive int or None"),
])
def test_rejects_unsupported(kind, kwargs, call_kw, match):
  with pytest.raises(ValueError, match=match):
    KERNELS[kind](*np_inputs(kind, **kwargs), interpret=True, **call_kw)


def test_rejects_bad_shapes_like_the_op():
  args = list(np_inputs("linear"))
  args[6] = np.zeros((1, 64, 32), np.float32)  # W
  with pytest.raises(ValueError, match=r"W has shape \(1, 64, 32\), expected \(1, 64, 64\)"):
    ttt_linear_pallas(*args, interpret=True)
  args = list(np_inputs("mlp"))
  args[8] = np.zeros((1, 128, 64), np.float32)  # W2 [H, F, d] with F = 256
  with pytest.raises(ValueError, match=r"W2 has shape \(1, 128, 64\), expected \(1, 256, 64\)"):
    ttt_mlp_pallas(*args, interpret=True)
  args[6] = np.zeros((64, 256), np.float32)  # W1 of rank 2
  with pytest.raises(ValueError, match=r"W1 has shape \(64, 256\), expected rank 3"):
    ttt_mlp_pallas(*args, interpret=True)


# ----------------------------------------------------------------------------
# Lowering to Mosaic (no TPU needed).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, token_dtype, matmul_dtype, d, remat_group, K", [
    ("linear", jnp.float32, None, 64, None, 64),
    ("linear", jnp.bfloat16, jnp.bfloat16, 64, None, 64),
    ("linear", jnp.float32, jnp.bfloat16, 128, 3, 64),
    ("linear", jnp.bfloat16, jnp.bfloat16, 64, None, 2048),  # large chunk, 16 eta pieces
    ("mlp", jnp.float32, None, 64, None, 64),
    ("mlp", jnp.bfloat16, jnp.bfloat16, 64, 3, 64),  # 8 = 3 + 3 + 2: guarded partial group
    ("mlp", jnp.float32, jnp.bfloat16, 128, 4, 64),
    ("mlp", jnp.bfloat16, jnp.bfloat16, 64, None, 2048),  # large chunk: 4 tiles of 512
])
def test_exports_for_tpu(kind, token_dtype, matmul_dtype, d, remat_group, K):
  B, H, NC = 2, 4, 8
  structs = grad_structs(kind, B, H, NC, K, d, token_dtype)
  fn = functools.partial(KERNELS[kind], matmul_dtype=matmul_dtype, remat_group=remat_group)
  name = f"ttt_{kind}"

  text = export_text(fn, "tpu", *structs)
  assert text.count("tpu_custom_call") == 1
  assert f'kernel_name = "{name}_fwd"' in text

  grad = jax.grad(loss_of(fn), argnums=tuple(range(len(structs))))
  text = export_text(grad, "tpu", *structs)
  assert text.count("tpu_custom_call") == 2  # forward with checkpoints + backward
  assert f'kernel_name = "{name}_fwd_res"' in text
  assert f'kernel_name = "{name}_bwd"' in text
  # Checkpoints: one weight set per group of remat_group mini-batches.
  n_ckpt = -(-NC // (remat_group or 1))
  first = weight_shapes(kind, H, d)[0][1:]
  assert f"tensor<{B * H}x{n_ckpt}x{first[0]}x{first[1]}xf32>" in text


def mosaic_matmuls(text: str) -> list[list[str]]:
  """Per Mosaic kernel in an exported module (decoded from its base64
  bytecode body), one "lhs x rhs -> out[/fp32]" string per tpu.matmul."""
  kernels = []
  for body in re.findall(r"\\22body\\22: \\22([A-Za-z0-9+/=]+)\\22", text):
    ctx = mlir.make_ir_context()
    tpu_dialect.register_dialect(ctx)
    with ctx:
      ctx.allow_unregistered_dialects = True  # the 'stable_mosaic' version marker
      module = str(ir.Module.parse(base64.b64decode(body)))
    matmuls = []
    for line in re.findall(r"tpu\.matmul[^\n]*", module):
      a, b, _, out = re.search(r": \(vector<\w+x(\w+)>, vector<\w+x(\w+)>, vector<\w+x(\w+)>\) -> "
                               r"vector<\w+x(\w+)>", line).groups()
      fp32 = "/fp32" if "contract_precision<fp32>" in line else ""
      matmuls.append(f"{a} x {b} -> {out}{fp32}")
    kernels.append(matmuls)
  return kernels


@pytest.mark.parametrize("kind, matmul_dtype, n_fwd", [
    ("linear", None, 3), ("linear", jnp.bfloat16, 3), ("mlp", jnp.bfloat16, 7)])
def test_mosaic_matmuls(kind, matmul_dtype, n_fwd):
  """Inside the lowered Mosaic kernels every matmul is native: fp32 ones at
  full fp32 contract precision, bf16 ones bf16 x bf16 -> fp32 also in the
  backward (common.kernel_matmul rounds cotangents to bf16). Forward: update
  (2 / 5 matmuls) + read-out (1 / 2); backward: the step's VJP, 3x forward."""
  structs = grad_structs(kind, 1, 2, 2, 64, 64, jnp.float32)
  fn = functools.partial(KERNELS[kind], matmul_dtype=matmul_dtype)
  want = "bf16 x bf16 -> f32" if matmul_dtype else "f32 x f32 -> f32/fp32"
  [fwd] = mosaic_matmuls(export_text(fn, "tpu", *structs))
  assert fwd == [want] * n_fwd
  grad = jax.grad(loss_of(fn), argnums=tuple(range(len(structs))))
  fwd_res, bwd = mosaic_matmuls(
      export_text(grad, "tpu", *structs))
  assert fwd_res == [want] * n_fwd
  assert bwd == [want] * 3 * n_fwd
