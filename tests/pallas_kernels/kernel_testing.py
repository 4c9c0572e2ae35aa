"""Inputs, cotangents and comparisons shared by the TPU and GPU kernel tests.

Tolerances are relative to the largest magnitude of the reference array,
max|got - want| <= tol * max(1, max|want|): gradients here reach O(10-100),
and fp32 round-off scales with them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ttt_jax.ops import ttt_linear, ttt_mlp

TOKEN_NAMES = ("q", "k", "v", "eta", "ln_weight", "ln_bias")
WEIGHT_NAMES = {"linear": ("W", "b"), "mlp": ("W1", "b1", "W2", "b2")}
OPS = {"linear": ttt_linear, "mlp": ttt_mlp}


def arg_names(kind):
  return TOKEN_NAMES + WEIGHT_NAMES[kind]


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
      # eta up to 0.1 at K <= 64; a mini-batch sums K gradients, so larger K
      # get proportionally smaller rates (as the layer's eta ~ 1 / K does).
      jax.random.uniform(ks[3], (B, H, NC, K), minval=0.0, maxval=0.1 * min(1.0, 64 / K)),
      1.0 + 0.1 * jax.random.normal(ks[4], (H, d)),
      0.1 * jax.random.normal(ks[5], (H, d)),
  )
  # Matrices scaled to unit-variance outputs (0.1 for TTT-Linear), biases
  # 0.1: with these rates the inner steps move the weights by O(1).
  weights = []
  for key, shape in zip(ks[6:], weight_shapes(kind, H, d)):
    std = 0.1 if shape[1] == 1 or kind == "linear" else 1 / np.sqrt(shape[1])
    weights.append(std * jax.random.normal(key, shape))
  return tokens + tuple(weights)


def np_inputs(kind="linear", B=1, H=1, NC=1, K=8, d=64, F=None, dtype=np.float32):
  """Zero inputs of the given sizes, for argument checks."""
  z = lambda *s: np.zeros(s, dtype)
  tokens = (z(B, H, NC, K, d), z(B, H, NC, K, d), z(B, H, NC, K, d), z(B, H, NC, K),
            z(H, d), z(H, d))
  if kind == "linear":
    return tokens + (z(H, d, d), z(H, 1, d))
  F = F or 4 * d
  return tokens + (z(H, d, F), z(H, 1, F), z(H, F, d), z(H, 1, d))


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


def check_against_op(kind, kernel, shape, *, tol_values, tol_grads, op_kw=None, **kernel_kw):
  """Kernel vs op: z, final weights and every gradient, for one shape.

  Returns the kernel's (z, final weights) for further checks."""
  args, cts = make_inputs(kind, *shape), cotangents(kind, *shape)
  (z_ref, w_ref), g_ref = run_vjp(OPS[kind], args, cts, **(op_kw or {}))
  (z, w), g = run_vjp(kernel, args, cts, **kernel_kw)
  assert_close(z, z_ref, tol_values, "z")
  for name, got, want in zip(WEIGHT_NAMES[kind], w, w_ref):
    assert_close(got, want, tol_values, f"{name}_final")
  for name, got, want in zip(arg_names(kind), g, g_ref):
    assert_close(got, want, tol_grads, f"d{name}")
  return z, w


def check_bf16_against_op(kind, kernel, shape):
  """bf16 matmuls: kernel vs the op's bf16 path; gradients also about as
  accurate as the op's own bf16 gradients, measured against the fp32 op."""
  args, cts = make_inputs(kind, *shape), cotangents(kind, *shape)
  (z_ref, w_ref), g_ref = run_vjp(OPS[kind], args, cts, matmul_dtype=jnp.bfloat16)
  (z, w), g = run_vjp(kernel, args, cts, matmul_dtype=jnp.bfloat16)
  _, g_f32 = run_vjp(OPS[kind], args, cts)
  assert_close(z, z_ref, 2e-3, "z")
  for name, got, want in zip(WEIGHT_NAMES[kind], w, w_ref):
    assert_close(got, want, 2e-3, f"{name}_final")
  for name, got, want, exact in zip(arg_names(kind), g, g_ref, g_f32):
    assert_close(got, want, 3e-2, f"d{name}")
    assert err(got, exact) <= 3 * err(want, exact) + 1e-3 * scale(exact), name


def check_bf16_tokens(kernel, shape):
  """bf16 q, k, v and eta (TTT-Linear): output and gradient dtypes follow the
  inputs', values within one bf16 rounding of the op's."""
  args = make_inputs("linear", *shape, token_dtype=jnp.bfloat16)
  args = args[:3] + (args[3].astype(jnp.bfloat16),) + args[4:]
  ct = cotangents("linear", *shape)[0].astype(jnp.bfloat16)
  z_ref, vjp_ref = jax.vjp(ttt_linear, *args)
  z, vjp = jax.vjp(kernel, *args)
  assert z.dtype == jnp.bfloat16
  assert_close(z, z_ref, 1e-2, "z")  # one bf16 rounding of the same fp32 value
  for name, got, want in zip(arg_names("linear"), vjp(ct), vjp_ref(ct)):
    assert_close(got, want, 1e-2, f"d{name}")


TRITON_CALL = "__gpu$xla.gpu.triton"


def export_text(fn, platform: str, *args) -> str:
  """The StableHLO text of jax.jit(fn) exported from this CPU host for
  `platform` ("tpu" or "cuda"; for CUDA the Triton custom call is allowed)."""
  disabled = ([jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
              if platform == "cuda" else [])
  return jax.export.export(jax.jit(fn), platforms=[platform],
                           disabled_checks=disabled)(*args).mlir_module()


def grad_structs(kind, B, H, NC, K, d, token_dtype):
  """ShapeDtypeStructs of a kernel's arguments, for jax.export."""
  S, f32 = jax.ShapeDtypeStruct, jnp.float32
  return ([S((B, H, NC, K, d), token_dtype)] * 3
          + [S((B, H, NC, K), f32), S((H, d), f32), S((H, d), f32)]
          + [S(s, f32) for s in weight_shapes(kind, H, d)])


def loss_of(fn):
  """A scalar of z and the final weights, so export covers both cotangents."""
  def loss(*a):
    z, weights = fn(*a, return_final_weights=True)
    return jnp.sum(z.astype(jnp.float32) ** 2) + sum(jnp.sum(w) for w in weights)
  return loss
