"""`ttt_jax.ops.inner_loop`: the kind x impl dispatcher, and the TTT layer on both impls.

The kernels (impl="pallas_tpu" / "pallas_gpu") run in Pallas interpret mode
on CPU (seconds per kernel trace), so shapes are tiny: d = K = 16, the
smallest both kernels accept (TPU: multiples of 8; GPU: powers of two
>= 16). Tolerances as in the kernel tests,
relative to the largest magnitude of the reference: 1e-5 for values, 1e-4
for gradients (fp32; only the summation order differs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.layout import VideoLayout
from ttt_jax.layers.ttt import TTT
from ttt_jax.ops import inner_loop, ttt_linear, ttt_mlp
from tests.pallas_kernels.kernel_testing import TRITON_CALL, export_text
from ttt_jax.ops.dispatch import resolve_impl


def make_inputs(kind, B=1, H=2, NC=2, K=16, d=16, seed=0):
  ks = jax.random.split(jax.random.key(seed), 10)
  tok = lambda key: jax.random.normal(key, (B, H, NC, K, d)) / np.sqrt(d)
  tokens = (tok(ks[0]), tok(ks[1]), tok(ks[2]),
            jax.random.uniform(ks[3], (B, H, NC, K), maxval=0.5),
            1.0 + 0.1 * jax.random.normal(ks[4], (H, d)), 0.1 * jax.random.normal(ks[5], (H, d)))
  F = 4 * d
  shapes = [(H, d, d), (H, 1, d)] if kind == "linear" else [(H, d, F), (H, 1, F), (H, F, d),
                                                            (H, 1, d)]
  weights = tuple(0.3 * jax.random.normal(k, s) for k, s in zip(ks[6:], shapes))
  return tokens + weights


KERNELS = ["pallas_tpu", "pallas_gpu"]
SUFFIX = {"pallas_tpu": "pallas", "pallas_gpu": "pallas_gpu"}  # kernel function names
CUSTOM_CALL = {"pallas_tpu": "tpu_custom_call", "pallas_gpu": TRITON_CALL}
PLATFORM = {"pallas_tpu": "tpu", "pallas_gpu": "cuda"}


def assert_close(got, want, tol, what=""):
  assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
  e = float(jnp.max(jnp.abs(got - want)))
  s = max(1.0, float(jnp.max(jnp.abs(want))))
  assert e <= tol * s, f"{what}: max abs err {e:.3e} > {tol:g} * {s:.3e}"


# ----------------------------------------------------------------------------
# Errors and plumbing (no kernel runs).
# ----------------------------------------------------------------------------


def test_unknown_kind_or_impl():
  args = make_inputs("linear")
  with pytest.raises(ValueError, match=r"unknown inner model kind 'rnn'; expected one of \('linear', 'mlp'\)"):
    inner_loop("rnn", "xla", *args)
  with pytest.raises(ValueError, match=r"unknown impl 'cuda'; expected one of \('xla', 'pallas', 'pallas_tpu', 'pallas_gpu'\)"):
    inner_loop("linear", "cuda", *args)


def test_pallas_means_the_default_backends_kernels(monkeypatch):
  assert jax.default_backend() == "cpu"
  with pytest.raises(ValueError, match=r"impl='pallas' .* default backend 'cpu' has none; use impl='xla', or 'pallas_tpu' / 'pallas_gpu' with interpret=True"):
    inner_loop("linear", "pallas", *make_inputs("linear"), interpret=True)
  for backend, impl in [("tpu", "pallas_tpu"), ("gpu", "pallas_gpu")]:
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert resolve_impl("pallas") == impl
  assert [resolve_impl(i) for i in ("xla", *KERNELS)] == ["xla", *KERNELS]


@pytest.mark.parametrize("impl", ["xla", *KERNELS])
def test_wrong_number_of_weights(impl):
  args = make_inputs("linear")
  with pytest.raises(ValueError, match=r"kind 'mlp' takes 4 fast-weight arrays \(W1, b1, W2, b2\), got 2"):
    inner_loop("mlp", impl, *args)
  with pytest.raises(ValueError, match=r"kind 'linear' takes 2 fast-weight arrays \(W, b\), got 1"):
    inner_loop("linear", impl, *args[:-1])


def test_xla_is_the_op_and_ignores_interpret():
  args = make_inputs("mlp")
  want = ttt_mlp(*args, remat_group=1)
  np.testing.assert_array_equal(inner_loop("mlp", "xla", *args, remat_group=1), want)
  np.testing.assert_array_equal(inner_loop("mlp", "xla", *args, remat_group=1, interpret=True), want)
  args = make_inputs("linear")
  np.testing.assert_array_equal(inner_loop("linear", "xla", *args), ttt_linear(*args))


@pytest.mark.parametrize("impl", KERNELS)
def test_kernels_get_their_options(impl):
  """Kernel-side checks fire, so the arguments reach the kernels: remat_group
  (which the kernels honour rather than ignore) and matmul_dtype."""
  args = make_inputs("linear")
  with pytest.raises(ValueError, match="remat_group must be a positive int or None, got 0"):
    inner_loop("linear", impl, *args, remat_group=0, interpret=True)
  with pytest.raises(ValueError, match=f"ttt_linear_{SUFFIX[impl]}: matmul_dtype must be float32 or bfloat16"):
    inner_loop("linear", impl, *args, matmul_dtype=jnp.float16, interpret=True)
  with pytest.raises(ValueError, match=rf"ttt_mlp_{SUFFIX[impl]}: .*K.* = 4"):
    inner_loop("mlp", impl, *make_inputs("mlp", K=4), interpret=True)


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_remat_group_sets_the_checkpoints(impl):
  """remat_group=G stores ceil(NC / G) weight sets for the backward (seen in
  the program exported for the kernel's platform), instead of NC."""
  B, H, NC, K, d = 1, 2, 5, 16, 16
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in make_inputs("mlp", B, H, NC, K, d)]
  for G, n_ckpt in [(None, 5), (2, 3), (5, 1)]:
    loss = lambda *a: jnp.sum(inner_loop("mlp", impl, *a, remat_group=G))
    text = export_text(jax.grad(loss, argnums=tuple(range(len(args)))), PLATFORM[impl], *args)
    assert text.count(CUSTOM_CALL[impl]) == 2  # forward with checkpoints, backward
    assert f"tensor<{B * H}x{n_ckpt}x{d}x{4 * d}xf32>" in text, G  # the W1 checkpoints


# ----------------------------------------------------------------------------
# The kernels (interpret mode) equal impl="xla".
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("kind, remat_group", [("linear", None), ("mlp", 2)])
def test_kernels_match_xla(impl, kind, remat_group):
  args = make_inputs(kind)
  n_w = len(args) - 6

  def run(impl):
    fn = functools.partial(inner_loop, kind, impl, remat_group=remat_group, return_final_weights=True,
                           interpret=True)
    (z, final), vjp = jax.vjp(fn, *args)
    cts = jax.random.normal(jax.random.key(1), z.shape), tuple(jnp.ones_like(w) for w in final)
    return z, final, vjp(cts)

  z_x, final_x, grads_x = run("xla")
  z_p, final_p, grads_p = run(impl)
  assert len(final_p) == len(grads_p) - 6 == n_w
  assert_close(z_p, z_x, 1e-5, "z")
  for i, (got, want) in enumerate(zip(final_p, final_x)):
    assert_close(got, want, 1e-5, f"final weight {i}")
  for i, (got, want) in enumerate(zip(grads_p, grads_x)):
    assert_close(got, want, 1e-4, f"grad of arg {i}")


# ----------------------------------------------------------------------------
# The TTT layer on both impls.
# ----------------------------------------------------------------------------

WIDTH, HEADS = 32, 2  # head_dim 16, as the kernels need
MULTI = VideoLayout(text_lens=(3, 2, 4), segment_frames=(2, 1, 1), height=1, width=3)  # L = 21


def test_layer_rejects_unknown_impl():
  with pytest.raises(ValueError, match=r"unknown impl 'triton'; expected one of \('xla', 'pallas', 'pallas_tpu', 'pallas_gpu'\)"):
    TTT(WIDTH, HEADS, impl="triton", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("impl", KERNELS)
@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_layer_kernels_match_xla(impl, inner):
  # K = 16: L = 21 -> 2 mini-batches, the last padded with eta = 0 tokens.
  make = lambda impl: TTT(WIDTH, HEADS, inner=inner, mini_batch_size=16, base_lr=20.0,
                          remat_group=2, impl=impl, pallas_interpret=True, rngs=nnx.Rngs(0))
  m_xla, m_pallas = make("xla"), make(impl)
  assert m_pallas.impl == impl and m_pallas.pallas_interpret
  x = jax.random.normal(jax.random.key(1), (1, MULTI.seq_len, WIDTH))

  def loss(m):
    y = m(x, MULTI)
    return jnp.sum(y ** 2), y

  (_, y_x), g_x = nnx.value_and_grad(loss, has_aux=True)(m_xla)
  (_, y_p), g_p = nnx.value_and_grad(loss, has_aux=True)(m_pallas)
  np.testing.assert_allclose(y_p, y_x, rtol=1e-5, atol=1e-5)
  leaves_x = jax.tree_util.tree_leaves_with_path(nnx.state(g_x, nnx.Param))
  leaves_p = jax.tree_util.tree_leaves(nnx.state(g_p, nnx.Param))
  assert len(leaves_x) == len(leaves_p)
  for (path, want), got in zip(leaves_x, leaves_p):
    assert_close(got, want, 1e-4, jax.tree_util.keystr(path))
