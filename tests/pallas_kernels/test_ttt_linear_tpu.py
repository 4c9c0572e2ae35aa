"""The Pallas TPU TTT-Linear kernel against the pure-JAX op `ttt_linear`.

Numerics run in Pallas TPU interpret mode on CPU (it simulates VMEM scratch,
the grid and the block pipeline). Lowering to Mosaic is checked with
`jax.export` for platform "tpu", which runs the Pallas -> Mosaic lowering
and serialises the kernel into a `tpu_custom_call`; compiling that Mosaic
module needs a TPU and is not exercised here.

Tolerances are relative to the largest magnitude of the reference array,
max|got - want| <= tol * max(1, max|want|): gradients here reach O(100), and
fp32 round-off scales with them.
  fp32: 1e-5 (values), 1e-4 (gradients): same operations, only the
    summation order of batched vs 2-D matmuls differs.
  bf16 matmul operands: values 2e-3, the op's forward operations are
    replayed exactly, so only a rare bf16 rounding flip of a matmul operand
    (one bf16 ulp, 2^-8 relative, of one product term) separates them.
    Gradients 3e-2: the kernel's backward rounds cotangents to bf16 before
    its matmuls (MXU-native, see the kernel docstring) where the op's
    autodiff keeps them fp32 on CPU; that is one extra bf16 rounding
    (0.4 %) per matmul, compounded over a few chained matmuls and steps. We
    also check the kernel's bf16 gradients are about as accurate as the
    op's bf16 gradients, measured against the fp32 op.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tpu import ttt_linear_pallas
from pallas_kernels.tpu import ttt_linear as kernel_mod
from ttt_jax.ops import ttt_linear
from ttt_jax.ops import ttt as op_mod

ARG_NAMES = ("q", "k", "v", "eta", "ln_weight", "ln_bias", "W", "b")


def make_inputs(B, H, NC, K, d, *, seed=0, token_dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 8)
  tok = lambda key: (jax.random.normal(key, (B, H, NC, K, d)) / np.sqrt(d)).astype(token_dtype)
  return (
      tok(ks[0]), tok(ks[1]), tok(ks[2]),
      jax.random.uniform(ks[3], (B, H, NC, K), minval=0.0, maxval=0.1),
      1.0 + 0.1 * jax.random.normal(ks[4], (H, d)),
      0.1 * jax.random.normal(ks[5], (H, d)),
      0.1 * jax.random.normal(ks[6], (H, d, d)),
      0.1 * jax.random.normal(ks[7], (H, 1, d)),
  )


def cotangents(B, H, NC, K, d, *, seed=1):
  ks = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(ks[0], (B, H, NC, K, d)),
          (jax.random.normal(ks[1], (B, H, d, d)), jax.random.normal(ks[2], (B, H, 1, d))))


def err(got, want) -> float:
  return float(jnp.max(jnp.abs(jnp.asarray(got, jnp.float32) - jnp.asarray(want, jnp.float32))))


def scale(want) -> float:
  return max(1.0, float(jnp.max(jnp.abs(jnp.asarray(want, jnp.float32)))))


def assert_close(got, want, tol, what=""):
  assert got.shape == want.shape, (what, got.shape, want.shape)
  assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
  e, s = err(got, want), scale(want)
  assert e <= tol * s, f"{what}: max abs err {e:.3e} > {tol:g} * {s:.3e}"


def run_vjp(fn, args, cts, **kw):
  """Outputs (z, (W, b)) and gradients of all 8 inputs for cotangents cts."""
  out, vjp = jax.vjp(functools.partial(fn, return_final_weights=True, **kw), *args)
  return out, vjp(cts)


kernel = functools.partial(ttt_linear_pallas, interpret=True)


# ----------------------------------------------------------------------------
# The shared step math.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("matmul_dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_step_matches_batched_op_step(matmul_dtype):
  """`_kernel_step` (eta row -> column, the 2-D kernel matmul, then the op's
  `_linear_step` on 2-D tiles) equals `_linear_step` with [B, H] = [1, 1]."""
  q, k, v, eta, ln_w, ln_b, W, b = make_inputs(1, 1, 1, 16, 64)
  tok = lambda x: x[:, :, 0]  # [1, 1, K, d]
  (W_ref, b_ref), out_ref = op_mod._linear_step(
      (W[None], b[None]), (tok(q), tok(k), tok(v), eta[:, :, 0][..., None]),
      ln_w=ln_w[None, :, None], ln_b=ln_b[None, :, None], eps=op_mod.LN_EPS,
      mm=op_mod._matmul(matmul_dtype, jnp.float32))
  (W_new, b_new), out = kernel_mod._kernel_step(
      W[0], b[0], q[0, 0, 0], k[0, 0, 0], v[0, 0, 0], eta[0, 0, 0][None, :],
      ln_w[0][None], ln_b[0][None], mm=kernel_mod._kernel_matmul(matmul_dtype),
      eps=op_mod.LN_EPS)
  assert_close(out, out_ref[0, 0], 1e-6, "out")
  assert_close(W_new, W_ref[0, 0], 1e-6, "W")
  assert_close(b_new, b_ref[0, 0], 1e-6, "b")


# ----------------------------------------------------------------------------
# Kernel vs op, interpret mode.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 1, 8, 128), (2, 2, 3, 16, 64), (1, 2, 5, 64, 64)],
                         ids=lambda s: "B%dH%dNC%dK%dd%d" % s)
def test_matches_op_fp32(shape):
  args, cts = make_inputs(*shape), cotangents(*shape)
  (z_ref, (W_ref, b_ref)), g_ref = run_vjp(ttt_linear, args, cts)
  (z, (W, b)), g = run_vjp(kernel, args, cts)
  assert_close(z, z_ref, 1e-5, "z")
  assert_close(W, W_ref, 1e-5, "W_final")
  assert_close(b, b_ref, 1e-5, "b_final")
  for name, got, want in zip(ARG_NAMES, g, g_ref):
    assert_close(got, want, 1e-4, f"d{name}")
  # The primal-only kernel (no residual outputs) agrees with the autodiff one.
  z_plain, (W_plain, b_plain) = kernel(*args, return_final_weights=True)
  np.testing.assert_array_equal(z_plain, z)
  np.testing.assert_array_equal(W_plain, W)
  np.testing.assert_array_equal(b_plain, b)


def test_matches_op_bf16_matmul():
  shape = (2, 2, 3, 16, 64)
  args, cts = make_inputs(*shape), cotangents(*shape)
  (z_ref, (W_ref, b_ref)), g_ref = run_vjp(ttt_linear, args, cts, matmul_dtype=jnp.bfloat16)
  (z, (W, b)), g = run_vjp(kernel, args, cts, matmul_dtype=jnp.bfloat16)
  _, g_f32 = run_vjp(ttt_linear, args, cts)
  assert_close(z, z_ref, 2e-3, "z")
  assert_close(W, W_ref, 2e-3, "W_final")
  assert_close(b, b_ref, 2e-3, "b_final")
  for name, got, want, exact in zip(ARG_NAMES, g, g_ref, g_f32):
    assert_close(got, want, 3e-2, f"d{name}")
    # As accurate as the op's own bf16 path, against the fp32 op.
    assert err(got, exact) <= 3 * err(want, exact) + 1e-3 * scale(exact), name


def test_bf16_tokens_z_only():
  """bf16 q, k, v (and eta): output/gradient dtypes follow the inputs'."""
  shape = (1, 2, 2, 16, 64)
  args = make_inputs(*shape, token_dtype=jnp.bfloat16)
  args = args[:3] + (args[3].astype(jnp.bfloat16),) + args[4:]
  ct = cotangents(*shape)[0].astype(jnp.bfloat16)
  z_ref, vjp_ref = jax.vjp(ttt_linear, *args)
  z, vjp = jax.vjp(kernel, *args)
  assert z.dtype == jnp.bfloat16
  assert_close(z, z_ref, 1e-2, "z")  # one bf16 rounding of the same fp32 value
  for name, got, want in zip(ARG_NAMES, vjp(ct), vjp_ref(ct)):
    assert_close(got, want, 1e-2, f"d{name}")


def test_force_tpu_interpret_mode_context():
  shape = (1, 1, 2, 8, 64)
  args = make_inputs(*shape)
  with pltpu.force_tpu_interpret_mode():
    z = ttt_linear_pallas(*args)  # interpret=False: the context decides
  assert_close(z, ttt_linear(*args), 1e-5, "z")


# ----------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------


def _np_inputs(B=1, H=1, NC=1, K=8, d=64, dtype=np.float32):
  z = lambda *s: np.zeros(s, dtype)
  return (z(B, H, NC, K, d), z(B, H, NC, K, d), z(B, H, NC, K, d), z(B, H, NC, K),
          z(H, d), z(H, d), z(H, d, d), z(H, 1, d))


@pytest.mark.parametrize("kwargs, call_kw, match", [
    (dict(K=12), {}, r"K \(mini-batch size\) = 12 must be a multiple of 8"),
    (dict(d=60), {}, r"d \(head dim\) = 60 must be a multiple of 8"),
    (dict(dtype=np.float64), {}, "float64"),
    ({}, dict(matmul_dtype=jnp.float16), "matmul_dtype must be float32 or bfloat16"),
    (dict(K=512, d=512), {}, "MiB of VMEM"),
])
def test_rejects_unsupported(kwargs, call_kw, match):
  with pytest.raises(ValueError, match=match):
    ttt_linear_pallas(*_np_inputs(**kwargs), interpret=True, **call_kw)


def test_rejects_bad_shapes_like_the_op():
  args = list(_np_inputs())
  args[6] = np.zeros((1, 64, 32), np.float32)  # W
  with pytest.raises(ValueError, match=r"W has shape \(1, 64, 32\), expected \(1, 64, 64\)"):
    ttt_linear_pallas(*args, interpret=True)


# ----------------------------------------------------------------------------
# Lowering to Mosaic (no TPU needed).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("token_dtype, matmul_dtype, d", [
    (jnp.float32, None, 64), (jnp.bfloat16, jnp.bfloat16, 64), (jnp.float32, jnp.bfloat16, 128),
])
def test_exports_for_tpu(token_dtype, matmul_dtype, d):
  B, H, NC, K = 2, 4, 8, 64
  S = jax.ShapeDtypeStruct
  f32 = jnp.float32
  structs = ([S((B, H, NC, K, d), token_dtype)] * 3
             + [S((B, H, NC, K), f32), S((H, d), f32), S((H, d), f32), S((H, d, d), f32),
                S((H, 1, d), f32)])

  def fwd(*a):
    return ttt_linear_pallas(*a, matmul_dtype=matmul_dtype)

  def loss(*a):
    z, (W, b) = ttt_linear_pallas(*a, matmul_dtype=matmul_dtype, return_final_weights=True)
    return jnp.sum(z.astype(f32) ** 2) + jnp.sum(W) + jnp.sum(b)

  text = jax.export.export(jax.jit(fwd), platforms=["tpu"])(*structs).mlir_module()
  assert text.count("tpu_custom_call") == 1
  assert 'kernel_name = "ttt_linear_fwd"' in text

  grad = jax.grad(loss, argnums=tuple(range(8)))
  text = jax.export.export(jax.jit(grad), platforms=["tpu"])(*structs).mlir_module()
  assert text.count("tpu_custom_call") == 2  # forward with residuals + backward
  assert 'kernel_name = "ttt_linear_fwd_res"' in text
  assert 'kernel_name = "ttt_linear_bwd"' in text
