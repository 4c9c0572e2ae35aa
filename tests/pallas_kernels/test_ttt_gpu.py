"""The Pallas GPU (Triton) TTT kernels against the pure-JAX ops.

Numerics run in Pallas interpret mode on CPU: the kernel body (the
mini-batch loop, the token-tile loops, the loads and stores at computed
offsets) is evaluated as ordinary JAX ops per program of the grid.
Lowering is checked with `jax.export` for platform "cuda", which runs the
Pallas -> Triton lowering and serialises each kernel's Triton IR into a
`__gpu$xla.gpu.triton` custom call; compiling that IR to PTX needs a GPU
and is not exercised here.

Tolerances (see kernel_testing): fp32 values 1e-5, gradients 1e-4: the same
operations as the op, only the summation order of batched vs 2-D matmuls
and, with token tiles, of the per-tile update sums differs. bf16 as for the
TPU kernels (the backward rounds cotangents to bf16 before its matmuls).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax._src.lib.mlir import ir
from jax._src.pallas.triton import lowering as triton_lowering

from pallas_kernels.gpu import ttt as kernel_mod
from pallas_kernels.gpu import ttt_linear_pallas_gpu, ttt_mlp_pallas_gpu
from tests.pallas_kernels.kernel_testing import (TRITON_CALL, check_against_op,
                                                 check_bf16_against_op, check_bf16_tokens,
                                                 export_text, grad_structs, loss_of,
                                                 make_inputs, np_inputs, weight_shapes)

KERNELS = {"linear": ttt_linear_pallas_gpu, "mlp": ttt_mlp_pallas_gpu}


def kernel(kind):
  return functools.partial(KERNELS[kind], interpret=True)


def shape_id(p):
  if isinstance(p, tuple):
    return "B%dH%dNC%dK%dd%d" % p
  if isinstance(p, dict):
    return "-".join(f"{k}{v}" for k, v in p.items()) or "default"
  return str(p)


# ----------------------------------------------------------------------------
# Kernel vs op, interpret mode.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, shape, kw", [
    ("linear", (1, 1, 1, 16, 128), {}),  # NC = 1
    ("linear", (2, 2, 3, 16, 64), {}),  # B > 1: per-head weights shared by streams
    ("linear", (1, 2, 5, 64, 64), dict(remat_group=2)),  # partial last group (5 = 2+2+1)
    ("linear", (1, 2, 3, 64, 64), dict(block_k=16)),  # 4 token tiles per mini-batch
    ("mlp", (1, 1, 1, 16, 64), {}),
    ("mlp", (1, 2, 3, 16, 64), dict(remat_group=2)),
    ("mlp", (1, 1, 4, 64, 32), dict(remat_group=3, block_k=32)),  # tiles and groups
], ids=shape_id)
def test_matches_op_fp32(kind, shape, kw):
  z, w = check_against_op(kind, kernel(kind), shape, tol_values=1e-5, tol_grads=1e-4, **kw)
  # The primal-only kernel (no checkpoint outputs) agrees with the autodiff one.
  z_plain, w_plain = kernel(kind)(*make_inputs(kind, *shape), return_final_weights=True, **kw)
  np.testing.assert_array_equal(z_plain, z)
  for got, want in zip(w_plain, w):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind, K", [("linear", 512), ("linear", 2048), ("mlp", 512)])
def test_large_chunk_matches_op(kind, K):
  """Large-chunk TTT: K tokens per inner step, processed in 64-token tiles
  (the update summed over tiles, then every tile read out)."""
  check_against_op(kind, kernel(kind), (1, 1, 2, K, 64), tol_values=1e-5, tol_grads=1e-4)


@pytest.mark.parametrize("kind, shape", [("linear", (2, 2, 3, 16, 64)),
                                         ("mlp", (1, 2, 3, 16, 64))])
def test_matches_op_bf16_matmul(kind, shape):
  check_bf16_against_op(kind, kernel(kind), shape)


def test_bf16_tokens():
  check_bf16_tokens(kernel("linear"), (1, 1, 2, 16, 64))


def test_tiles_do_not_change_the_result():
  """block_k only changes the order of the update's sum: 1e-6 apart."""
  args = make_inputs("mlp", 1, 1, 3, 64, 32)
  whole = kernel("mlp")(*args, block_k=64)
  for block_k in (16, 32):
    np.testing.assert_allclose(kernel("mlp")(*args, block_k=block_k), whole, atol=1e-6)


# ----------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, kwargs, call_kw, match", [
    ("linear", dict(K=8), {}, r"Kt = min\(K, block_k\) \(token tile\) = 8 must be a power of two >= 16"),
    ("linear", dict(K=48), {}, r"Kt = min\(K, block_k\) \(token tile\) = 48 must be a power of two"),
    ("linear", dict(K=96), dict(block_k=64), r"K \(mini-batch size\) = 96 must be a multiple of the token tile Kt = min\(K, block_k\) = 64"),
    ("linear", dict(K=16, d=48), {}, r"d \(head dim\) = 48 must be a power of two >= 16"),
    ("linear", {}, dict(block_k=24), "block_k = 24 must be a power of two >= 16"),
    ("linear", dict(dtype=np.float64), {}, "ttt_linear_pallas_gpu: q is float64"),
    ("linear", dict(K=16), dict(matmul_dtype=jnp.float16), "matmul_dtype must be float32 or bfloat16"),
    ("mlp", dict(K=16, F=96), {}, r"ttt_mlp_pallas_gpu: F \(MLP hidden width\) = 96 must be a power of two"),
    ("mlp", dict(K=16), dict(remat_group=0), "remat_group must be a positive int or None, got 0"),
])
def test_rejects_unsupported(kind, kwargs, call_kw, match):
  with pytest.raises(ValueError, match=match):
    KERNELS[kind](*np_inputs(kind, **kwargs), interpret=True, **call_kw)


def test_rejects_bad_shapes_like_the_op():
  args = list(np_inputs("linear", K=16))
  args[7] = np.zeros((1, 64), np.float32)  # b
  with pytest.raises(ValueError, match=r"b has shape \(1, 64\), expected \(1, 1, 64\)"):
    ttt_linear_pallas_gpu(*args, interpret=True)
  args = list(np_inputs("mlp", K=16))
  args[3] = np.zeros((1, 1, 1, 8), np.float32)  # eta
  with pytest.raises(ValueError, match=r"eta has shape \(1, 1, 1, 8\), expected \(1, 1, 1, 16\)"):
    ttt_mlp_pallas_gpu(*args, interpret=True)


# ----------------------------------------------------------------------------
# Lowering to Triton for CUDA (no GPU needed).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, token_dtype, matmul_dtype, d, K, remat_group", [
    ("linear", jnp.float32, None, 64, 64, None),
    ("linear", jnp.bfloat16, jnp.bfloat16, 64, 16, None),
    ("linear", jnp.float32, jnp.bfloat16, 128, 64, 3),
    ("linear", jnp.bfloat16, jnp.bfloat16, 64, 2048, None),  # 32 token tiles
    ("mlp", jnp.float32, None, 64, 64, None),
    ("mlp", jnp.bfloat16, jnp.bfloat16, 64, 64, 3),  # 8 = 3 + 3 + 2
    ("mlp", jnp.float32, jnp.bfloat16, 128, 16, 4),
    ("mlp", jnp.bfloat16, jnp.bfloat16, 64, 512, None),
])
def test_exports_for_cuda(kind, token_dtype, matmul_dtype, d, K, remat_group):
  B, H, NC = 2, 4, 8
  structs = grad_structs(kind, B, H, NC, K, d, token_dtype)
  fn = functools.partial(KERNELS[kind], matmul_dtype=matmul_dtype, remat_group=remat_group)
  name = f"ttt_{kind}_gpu"

  text = export_text(fn, "cuda", *structs)
  assert text.count(TRITON_CALL) == 1
  assert f"{name}_fwd\\00" in text  # the kernel's name inside its serialised Triton IR
  assert f"grid_x = {B * H} : i32" in text  # one program per (batch, head) stream

  grad = jax.grad(loss_of(fn), argnums=tuple(range(len(structs))))
  text = export_text(grad, "cuda", *structs)
  assert text.count(TRITON_CALL) == 2  # forward with checkpoints + backward
  assert f"{name}_fwd_res\\00" in text and f"{name}_bwd\\00" in text
  n_ckpt = -(-NC // (remat_group or 1))
  first = weight_shapes(kind, H, d)[0][1:]
  assert f"tensor<{B * H}x{n_ckpt}x{first[0]}x{first[1]}xf32>" in text
  # Token arrays travel as [B * H, NC * T, Kt, d] with Kt = min(K, 64).
  Kt = min(K, kernel_mod.DEFAULT_BLOCK_K)
  assert f"tensor<{B * H}x{NC * K // Kt}x{Kt}x{d}x" in text


def _unescape_mlir_string(s: str) -> bytes:
  """The bytes of an MLIR string attribute as printed (\\XX hex escapes)."""
  out, i = bytearray(), 0
  while i < len(s):
    if s[i] != "\\":
      out += s[i].encode()
      i += 1
    elif s[i + 1] in '\\"':
      out.append(ord(s[i + 1]))
      i += 2
    else:
      out.append(int(s[i + 1:i + 3], 16))
      i += 3
  return bytes(out)


def triton_kernels(text: str) -> dict[str, str]:
  """kernel name -> its Triton IR, decoded from the custom calls' `ir` bytecode.

  Uses Pallas's own (private) Triton MLIR context to parse the bytecode."""
  kernels = {}
  for raw in re.findall(r'ir = "((?:[^"\\]|\\.)*)"', text):
    with triton_lowering._new_ir_context():
      module = str(ir.Module.parse(_unescape_mlir_string(raw)))
    kernels[re.search(r"tt\.func public @(\w+)", module).group(1)] = module
  return kernels


def dots(module: str) -> list[tuple[str, str, str]]:
  """(lhs, rhs, result) element types of every tt.dot, with IEEE/TF32 marking
  for fp32 operands (Triton omits the default, IEEE)."""
  out = []
  for line in re.findall(r"tt\.dot [^\n]*", module):
    a, b, c = re.search(r"tensor<\d+x\d+x(\w+)> \* tensor<\d+x\d+x(\w+)> -> "
                        r"tensor<\d+x\d+x(\w+)>", line).groups()
    if a == "f32":
      a += "/tf32" if "inputPrecision = tf32" in line else "/ieee"
    out.append((a, b, c))
  return out


@pytest.mark.parametrize("kind, matmul_dtype, K, n_dots, n_loops, n_bwd_dots", [
    # Forward: update (TTT-Linear 2 matmuls, TTT-MLP 5) + read-out (1 / 2).
    # Backward, one tile (T = 1): the update's and the read-out's VJPs, each
    # its forward matmuls plus two per matmul: 3 x forward.
    ("linear", None, 64, 3, 1, 9),  # the mini-batch loop
    ("mlp", jnp.bfloat16, 64, 7, 1, 21),
    # 4 tiles: + the update and read-out loops over tiles. The backward re-runs
    # the update (5) before its read-out VJP loop (6) and update VJP loop (15
    # less the 2 whose results, the update sums, only the primal needs: 13).
    ("mlp", jnp.bfloat16, 256, 7, 3, 24),
])
def test_triton_ir_matmuls_and_loops(kind, matmul_dtype, K, n_dots, n_loops, n_bwd_dots):
  """Inside the lowered Triton kernels: fp32 matmuls are exact IEEE fp32 (no
  TF32), bf16 ones bf16 x bf16 -> fp32 on tensor cores, also every backward
  matmul (the cotangents are rounded to bf16, see common.kernel_matmul); the
  mini-batch and token-tile loops stay loops (scf.for), not unrolled."""
  structs = grad_structs(kind, 1, 2, 2, K, 64, jnp.float32)
  fn = functools.partial(KERNELS[kind], matmul_dtype=matmul_dtype)
  want = ("bf16", "bf16", "f32") if matmul_dtype else ("f32/ieee", "f32", "f32")
  fwd = triton_kernels(export_text(fn, "cuda", *structs))[f"ttt_{kind}_gpu_fwd"]
  assert dots(fwd) == [want] * n_dots
  assert fwd.count("scf.for") == n_loops
  grad = triton_kernels(export_text(jax.grad(loss_of(fn), argnums=tuple(range(len(structs)))),
                                    "cuda", *structs))
  assert set(grad) == {f"ttt_{kind}_gpu_fwd_res", f"ttt_{kind}_gpu_bwd"}
  assert dots(grad[f"ttt_{kind}_gpu_bwd"]) == [want] * n_bwd_dots
