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

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.tpu import ttt as kernel_mod
from pallas_kernels.tpu import ttt_linear_pallas, ttt_mlp_pallas
from ttt_jax.ops import ttt_linear, ttt_mlp
from ttt_jax.ops.ttt import LN_EPS, _linear_step, _matmul, _mlp_step

TOKEN_NAMES = ("q", "k", "v", "eta", "ln_weight", "ln_bias")
KINDS = {
    # kind: (op, kernel, op step, weight names)
    "linear": (ttt_linear, ttt_linear_pallas, _linear_step, ("W", "b")),
    "mlp": (ttt_mlp, ttt_mlp_pallas, _mlp_step, ("W1", "b1", "W2", "b2")),
}


def weight_shapes(kind, H, d):
  if kind == "linear":
    return [(H, d, d), (H, 1, d)]
  F = 4 * d
  return [(H, d, F), (H, 1, F), (H, F, d), (H, 1, d)]


def make_inputs(kind, B, H, NC, K, d, *, seed=0, token_dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 10)
  tok = lambda key: (jax.random.normal(key, (B, H, NC, K, d)) / np.sqrt(d)).astype(token_dtype)
  tokens = (
      tok(ks[0]), tok(ks[1]), tok(ks[2]),
      jax.random.uniform(ks[3], (B, H, NC, K), minval=0.0, maxval=0.1),
      1.0 + 0.1 * jax.random.normal(ks[4], (H, d)),
      0.1 * jax.random.normal(ks[5], (H, d)),
  )
  # Matrices scaled to unit-variance outputs (0.1 for TTT-Linear, as before),
  # biases 0.1: with eta up to 0.1 the inner steps move the weights by O(1).
  weights = []
  for key, shape in zip(ks[6:], weight_shapes(kind, H, d)):
    std = 0.1 if shape[1] == 1 or kind == "linear" else 1 / np.sqrt(shape[1])
    weights.append(std * jax.random.normal(key, shape))
  return tokens + tuple(weights)


def cotangents(kind, B, H, NC, K, d, *, seed=1):
  shapes = [(B, H, NC, K, d)] + [(B, *s) for s in weight_shapes(kind, H, d)]
  cts = [jax.random.normal(k, s) for k, s in zip(jax.random.split(jax.random.key(seed), 5), shapes)]
  return cts[0], tuple(cts[1:])


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
  """Outputs (z, final weights) and gradients of all inputs for cotangents cts."""
  out, vjp = jax.vjp(functools.partial(fn, return_final_weights=True, **kw), *args)
  return out, vjp(cts)


def op(kind):
  return KINDS[kind][0]


def kernel(kind):
  return functools.partial(KINDS[kind][1], interpret=True)


def arg_names(kind):
  return TOKEN_NAMES + KINDS[kind][3]


# ----------------------------------------------------------------------------
# The shared step math.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("matmul_dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_kernel_step_matches_batched_op_step(kind, matmul_dtype):
  """`_kernel_step` (eta row -> column, the 2-D kernel matmul, then the op's
  step on 2-D tiles) equals the op's step with [B, H] = [1, 1]."""
  q, k, v, eta, ln_w, ln_b, *weights = make_inputs(kind, 1, 1, 1, 16, 64)
  op_step = KINDS[kind][2]
  tok = lambda x: x[:, :, 0]  # [1, 1, K, d]
  want_weights, want_out = op_step(
      tuple(w[None] for w in weights), (tok(q), tok(k), tok(v), eta[:, :, 0][..., None]),
      ln_w=ln_w[None, :, None], ln_b=ln_b[None, :, None], eps=LN_EPS,
      mm=_matmul(matmul_dtype, jnp.float32))
  got_weights, got_out = kernel_mod._kernel_step(
      tuple(w[0] for w in weights), q[0, 0, 0], k[0, 0, 0], v[0, 0, 0],
      eta[0, 0, 0][None, :], ln_w[0][None], ln_b[0][None], op_step=op_step,
      mm=kernel_mod._kernel_matmul(matmul_dtype), eps=LN_EPS)
  assert_close(got_out, want_out[0, 0], 1e-6, "out")
  for name, got, want in zip(KINDS[kind][3], got_weights, want_weights):
    assert_close(got, want[0, 0], 1e-6, name)


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
  args, cts = make_inputs(kind, *shape), cotangents(kind, *shape)
  (z_ref, w_ref), g_ref = run_vjp(op(kind), args, cts)
  (z, w), g = run_vjp(kernel(kind), args, cts, remat_group=remat_group)
  assert_close(z, z_ref, 1e-5, "z")
  for name, got, want in zip(KINDS[kind][3], w, w_ref):
    assert_close(got, want, 1e-5, f"{name}_final")
  for name, got, want in zip(arg_names(kind), g, g_ref):
    assert_close(got, want, 1e-4, f"d{name}")
  if remat_group is not None:
    return  # the primal-only forward kernel does not depend on remat_group
  # The primal-only kernel (no checkpoint outputs) agrees with the autodiff one.
  z_plain, w_plain = kernel(kind)(*args, return_final_weights=True)
  np.testing.assert_array_equal(z_plain, z)
  for got, want in zip(w_plain, w):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind, shape", [("linear", (2, 2, 3, 16, 64)),
                                         ("mlp", (1, 2, 3, 16, 64))])
def test_matches_op_bf16_matmul(kind, shape):
  args, cts = make_inputs(kind, *shape), cotangents(kind, *shape)
  (z_ref, w_ref), g_ref = run_vjp(op(kind), args, cts, matmul_dtype=jnp.bfloat16)
  (z, w), g = run_vjp(kernel(kind), args, cts, matmul_dtype=jnp.bfloat16)
  _, g_f32 = run_vjp(op(kind), args, cts)
  assert_close(z, z_ref, 2e-3, "z")
  for name, got, want in zip(KINDS[kind][3], w, w_ref):
    assert_close(got, want, 2e-3, f"{name}_final")
  for name, got, want, exact in zip(arg_names(kind), g, g_ref, g_f32):
    assert_close(got, want, 3e-2, f"d{name}")
    # As accurate as the op's own bf16 path, against the fp32 op.
    assert err(got, exact) <= 3 * err(want, exact) + 1e-3 * scale(exact), name


def test_bf16_tokens_z_only():
  """bf16 q, k, v (and eta): output/gradient dtypes follow the inputs'.

  The dtype plumbing is the shared wrapper's and kernels'; TTT-Linear only."""
  kind, shape = "linear", (1, 1, 2, 8, 64)
  args = make_inputs(kind, *shape, token_dtype=jnp.bfloat16)
  args = args[:3] + (args[3].astype(jnp.bfloat16),) + args[4:]
  ct = cotangents(kind, *shape)[0].astype(jnp.bfloat16)
  z_ref, vjp_ref = jax.vjp(op(kind), *args)
  z, vjp = jax.vjp(kernel(kind), *args)
  assert z.dtype == jnp.bfloat16
  assert_close(z, z_ref, 1e-2, "z")  # one bf16 rounding of the same fp32 value
  for name, got, want in zip(arg_names(kind), vjp(ct), vjp_ref(ct)):
    assert_close(got, want, 1e-2, f"d{name}")


def test_force_tpu_interpret_mode_context():
  args = make_inputs("linear", 1, 1, 2, 8, 64)
  with pltpu.force_tpu_interpret_mode():
    z = ttt_linear_pallas(*args)  # interpret=False: the context decides
  assert_close(z, ttt_linear(*args), 1e-5, "z")


# ----------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------


def _np_inputs(kind="linear", B=1, H=1, NC=1, K=8, d=64, F=None, dtype=np.float32):
  z = lambda *s: np.zeros(s, dtype)
  tokens = (z(B, H, NC, K, d), z(B, H, NC, K, d), z(B, H, NC, K, d), z(B, H, NC, K),
            z(H, d), z(H, d))
  if kind == "linear":
    return tokens + (z(H, d, d), z(H, 1, d))
  F = F or 4 * d
  return tokens + (z(H, d, F), z(H, 1, F), z(H, F, d), z(H, 1, d))


@pytest.mark.parametrize("kind, kwargs, call_kw, match", [
    ("linear", dict(K=12), {}, r"K \(mini-batch size\) = 12 must be a multiple of 8"),
    ("linear", dict(d=60), {}, r"d \(head dim\) = 60 must be a multiple of 8"),
    ("linear", dict(dtype=np.float64), {}, "ttt_linear_pallas: q is float64"),
    ("linear", {}, dict(matmul_dtype=jnp.float16), "matmul_dtype must be float32 or bfloat16"),
    ("linear", dict(K=512, d=512), {}, "MiB of VMEM"),
    ("mlp", dict(F=100), {}, r"F \(MLP hidden width\) = 100 must be a multiple of 8"),
    ("mlp", dict(dtype=np.float64), {}, "ttt_mlp_pallas: q is float64"),
    ("mlp", dict(K=64, d=256), {}, "ttt_mlp_pallas: .* MiB of VMEM"),
    # G = 32 stashes 32 weight sets of 204 KiB (lane-padded) in VMEM.
    ("mlp", dict(NC=32, K=64), dict(remat_group=32), "remat_group 32 need about"),
    ("mlp", {}, dict(remat_group=0), "remat_group must be a positive int or None, got 0"),
    ("linear", {}, dict(remat_group=1.5), "remat_group must be a positive int or None"),
])
def test_rejects_unsupported(kind, kwargs, call_kw, match):
  with pytest.raises(ValueError, match=match):
    KINDS[kind][1](*_np_inputs(kind, **kwargs), interpret=True, **call_kw)


def test_rejects_bad_shapes_like_the_op():
  args = list(_np_inputs("linear"))
  args[6] = np.zeros((1, 64, 32), np.float32)  # W
  with pytest.raises(ValueError, match=r"W has shape \(1, 64, 32\), expected \(1, 64, 64\)"):
    ttt_linear_pallas(*args, interpret=True)
  args = list(_np_inputs("mlp"))
  args[8] = np.zeros((1, 128, 64), np.float32)  # W2 [H, F, d] with F = 256
  with pytest.raises(ValueError, match=r"W2 has shape \(1, 128, 64\), expected \(1, 256, 64\)"):
    ttt_mlp_pallas(*args, interpret=True)
  args[6] = np.zeros((64, 256), np.float32)  # W1 of rank 2
  with pytest.raises(ValueError, match=r"W1 has shape \(64, 256\), expected rank 3"):
    ttt_mlp_pallas(*args, interpret=True)


# ----------------------------------------------------------------------------
# Lowering to Mosaic (no TPU needed).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind, token_dtype, matmul_dtype, d, remat_group", [
    ("linear", jnp.float32, None, 64, None),
    ("linear", jnp.bfloat16, jnp.bfloat16, 64, None),
    ("linear", jnp.float32, jnp.bfloat16, 128, 3),
    ("mlp", jnp.float32, None, 64, None),
    ("mlp", jnp.bfloat16, jnp.bfloat16, 64, 3),  # 8 = 3 + 3 + 2: guarded partial group
    ("mlp", jnp.float32, jnp.bfloat16, 128, 4),
])
def test_exports_for_tpu(kind, token_dtype, matmul_dtype, d, remat_group):
  B, H, NC, K = 2, 4, 8, 64
  S = jax.ShapeDtypeStruct
  f32 = jnp.float32
  structs = ([S((B, H, NC, K, d), token_dtype)] * 3
             + [S((B, H, NC, K), f32), S((H, d), f32), S((H, d), f32)]
             + [S(s, f32) for s in weight_shapes(kind, H, d)])
  fn = functools.partial(KINDS[kind][1], matmul_dtype=matmul_dtype, remat_group=remat_group)
  name = f"ttt_{kind}"

  def loss(*a):
    z, weights = fn(*a, return_final_weights=True)
    return jnp.sum(z.astype(f32) ** 2) + sum(jnp.sum(w) for w in weights)

  text = jax.export.export(jax.jit(fn), platforms=["tpu"])(*structs).mlir_module()
  assert text.count("tpu_custom_call") == 1
  assert f'kernel_name = "{name}_fwd"' in text

  grad = jax.grad(loss, argnums=tuple(range(len(structs))))
  text = jax.export.export(jax.jit(grad), platforms=["tpu"])(*structs).mlir_module()
  assert text.count("tpu_custom_call") == 2  # forward with checkpoints + backward
  assert f'kernel_name = "{name}_fwd_res"' in text
  assert f'kernel_name = "{name}_bwd"' in text
  # Checkpoints: one weight set per group of remat_group mini-batches.
  n_ckpt = -(-NC // (remat_group or 1))
  first = weight_shapes(kind, H, d)[0][1:]
  assert f"tensor<{B * H}x{n_ckpt}x{first[0]}x{first[1]}xf32>" in text
