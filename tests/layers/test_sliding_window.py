"""Sliding-window and full causal attention against dense softmax with an explicit [L, L] mask.

The references share nothing with ttt_jax.layers.sliding_window / full_attention:
  numpy_mask       the [L, L] band (0 <= i - j < window) or causal (j <= i) mask, by numpy;
  dense_attention  softmax(q k^T / sqrt(d) masked) v over the whole [L, L] score matrix, in jnp
                   (so that jax.vjp gives reference gradients), run in float64;
  reference_layer  the whole layer from its parameters in numpy float64 (projections,
                   per-head LayerNorm, 1-D RoPE written out with cos / sin, masked softmax).
Tolerances, relative to the reference's max |value| (rel_err): the cores run in fp32
against float64 and differ only by fp32 rounding of O(1) softmax sums over <= 40 keys
(<= 6e-7 seen for values and gradients): FP32_TOL = 1e-5 leaves room for other XLA fusion
orders, while a wrong band (one key too many or too few) is >= 1e-2. bf16 compute is
checked against the fp32 run at BF16_TOL = 5e-2 (bf16 has 8 mantissa bits, 4e-3 per
rounding, a few roundings deep: <= 1e-2 seen).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.layers import full_attention as fa
from ttt_jax.layers import sliding_window as sw
from ttt_jax.layers.full_attention import FullAttention
from ttt_jax.layers.sliding_window import SlidingWindowAttention
from ttt_jax.parallel.sharding import RULES, names_of

FP32_TOL = 1e-5
BF16_TOL = 5e-2

# Compile the test programs without LLVM's optimisation of the CPU code: the same HLO (what is
# under test) in about half the compile time, most of this file's time on a 2-core CPU.
QUICK = {"xla_backend_optimization_level": 0}

# Jitted once per shape: one compile instead of one per primitive (eager mode).
swa = jax.jit(sw.sliding_window_attention, static_argnames=("window", "block"),
              compiler_options=QUICK)
causal = jax.jit(fa.causal_attention, compiler_options=QUICK)


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def numpy_mask(L: int, window: int | None) -> np.ndarray:
  """[L, L] bool: query i sees key j iff j <= i (and i - j < window)."""
  i, j = np.arange(L)[:, None], np.arange(L)[None, :]
  causal = j <= i
  return causal if window is None else causal & (i - j < window)


def dense_attention(q, k, v, mask):
  """softmax over the full [L, L] masked scores, q, k, v [B, L, H, d]."""
  s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def make_qkv(B, L, H, d, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(1.5 * rng.standard_normal((B, L, H, d)), dtype) for _ in range(4))


def vjp(fn, args, ct):
  """fn's output and its gradients w.r.t. every argument for the cotangent ct."""
  out, pullback = jax.vjp(fn, *args)
  return out, pullback(ct.astype(out.dtype))


def check_against_dense(core, L, window, seed=0):
  """core(q, k, v) vs dense masked softmax: values and d/d(q, k, v) of a random projection."""
  q, k, v, ct = make_qkv(2, L, 3, 4, seed)
  out, got = jax.jit(functools.partial(vjp, core), compiler_options=QUICK)((q, k, v), ct)
  with jax.enable_x64(True):
    mask = numpy_mask(L, window)
    want_out, want = jax.jit(functools.partial(vjp, lambda *a: dense_attention(*a, mask)),
                             compiler_options=QUICK)(
        tuple(jnp.asarray(a, jnp.float64) for a in (q, k, v)), jnp.asarray(ct, jnp.float64))
  assert out.shape == q.shape and out.dtype == jnp.float32
  errs = [rel_err(out, want_out)] + [rel_err(g, w) for g, w in zip(got, want)]
  assert max(errs) < FP32_TOL, errs
  return errs


# --------------------------------------------------------------- the cores ----
CORE_CASES = [  # L, window, block
    (37, 8, None),  # ragged: 4 blocks of 8 + 5
    (37, 5, 4),  # the smallest block: window - 1
    (37, 3, 10),  # block larger than the window
    (16, 1, None),  # each token sees only itself
    (23, 40, None),  # window > L: full causal attention
]


@pytest.mark.parametrize("L,window,block", CORE_CASES)
def test_sliding_window_matches_dense_band(L, window, block):
  check_against_dense(lambda q, k, v: sw.sliding_window_attention(q, k, v, window, block=block),
                      L, window)


def test_full_attention_matches_dense_causal():
  check_against_dense(fa.causal_attention, 29, None)


def test_window_at_least_length_is_full_causal_attention():
  q, k, v, _ = make_qkv(2, 23, 3, 4, seed=1)
  full = causal(q, k, v)
  for window in (23, 100):
    np.testing.assert_allclose(swa(q, k, v, window=window), full,
                               rtol=FP32_TOL, atol=FP32_TOL)


def test_window_is_causal():
  """Perturbing token t leaves outputs before t bit-identical and changes t .. t + window - 1
  only (beyond the window nothing sees it)."""
  q, k, v, _ = make_qkv(2, 37, 3, 4, seed=2)
  run = functools.partial(swa, window=8)
  o = run(q, k, v)
  for t in (0, 7, 8, 20, 36):
    o2 = run(q, k.at[:, t].multiply(-1), v.at[:, t].add(1.0))
    np.testing.assert_array_equal(o2[:, :t], o[:, :t])
    np.testing.assert_array_equal(o2[:, t + 8:], o[:, t + 8:])
    assert float(jnp.abs(o2[:, t] - o[:, t]).max()) > 1e-3


def test_no_score_matrix_is_quadratic():
  """The blocked core's largest intermediate is O(L * window): no [L, L] anywhere."""
  L, window = 512, 16
  q = jnp.zeros((1, L, 1, 4))
  jaxpr = jax.make_jaxpr(functools.partial(sw.sliding_window_attention, window=window))(q, q, q)
  sizes = [np.prod(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars]
  assert max(sizes) <= L * 2 * window, max(sizes)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cores_keep_dtype_and_shape(dtype):
  q, k, v, _ = make_qkv(2, 19, 2, 8, seed=3)
  tol = FP32_TOL if dtype == jnp.float32 else BF16_TOL
  for core in (functools.partial(swa, window=6), causal):
    o = core(*(a.astype(dtype) for a in (q, k, v)))
    assert o.shape == q.shape and o.dtype == dtype
    assert rel_err(o, core(q, k, v)) < tol


def test_heads_are_separable():
  """The core on a subset of heads is the slice of the full run (a head-sharded run)."""
  q, k, v, _ = make_qkv(2, 37, 3, 4, seed=4)
  run = functools.partial(swa, window=8)  # compiled for the causality test
  np.testing.assert_allclose(run(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:]), run(q, k, v)[:, :, 1:],
                             rtol=1e-6, atol=1e-6)


def test_cores_reject_bad_arguments():
  q = jnp.zeros((1, 8, 2, 4))
  with pytest.raises(ValueError, match="window"):
    sw.sliding_window_attention(q, q, q, 0)
  with pytest.raises(ValueError, match="block"):
    sw.sliding_window_attention(q, q, q, 8, block=6)
  with pytest.raises(ValueError, match="takes"):
    sw.sliding_window_attention(q, q[..., :3], q, 4)
  with pytest.raises(ValueError, match="takes"):
    fa.causal_attention(q, q, q[:, :4])


# -------------------------------------------------------------- the layers ----
WIDTH, HEADS, WINDOW = 16, 2, 5
NUM_PARAMS = 12  # 4 projections x (kernel, bias), 2 QK LayerNorms x (scale, bias)


def make_layer(window=WINDOW, **kw):
  """A test layer, parameters drawn with the 'rbg' PRNG (compiles far faster than threefry);
  the same seed gives both layer types the same parameters."""
  rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
  if window is None:
    return FullAttention(WIDTH, HEADS, rngs=rngs, **kw)
  return SlidingWindowAttention(WIDTH, HEADS, window=window, rngs=rngs, **kw)


def reference_layer(m, x, window):
  """The layer from its parameters, numpy float64."""
  p = lambda v: np.asarray(v[...], np.float64)
  x = np.asarray(x, np.float64)
  B, L, D = x.shape
  H, d = m.num_heads, m.head_dim
  proj = lambda lin: (x @ p(lin.kernel) + p(lin.bias)).reshape(B, L, H, d)

  def layer_norm(a, norm):
    mu = a.mean(-1, keepdims=True)
    var = ((a - mu) ** 2).mean(-1, keepdims=True)
    return (a - mu) / np.sqrt(var + 1e-6) * p(norm.scale) + p(norm.bias)

  def rope(a):  # pair (2i, 2i+1) turns by pos * 10000^(-2i/d)
    angle = np.arange(L)[:, None] * 10000.0 ** (-np.arange(0, d, 2) / d)  # [L, d/2]
    cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
    even, odd = a[..., 0::2], a[..., 1::2]
    out = np.empty_like(a)
    out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
    return out

  q = rope(layer_norm(proj(m.to_q), m.norm_q))
  k = rope(layer_norm(proj(m.to_k), m.norm_k))
  v = proj(m.to_v)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
  s = np.where(numpy_mask(L, window), s, -np.inf)
  e = np.exp(s - s.max(-1, keepdims=True))
  o = np.einsum("bhqk,bkhd->bqhd", e / e.sum(-1, keepdims=True), v)
  return o.reshape(B, L, D) @ p(m.to_out.kernel) + p(m.to_out.bias)


@functools.partial(jax.jit, static_argnums=0, compiler_options=QUICK)
def forward(graphdef, params, x):
  """y [B, L, D] and d sum(y^2) / d params: every layer test of one layer type and dtype
  shares this compile."""
  def loss(params):
    y = nnx.merge(graphdef, params)(x)
    return jnp.sum(jnp.square(y.astype(jnp.float32))), y
  (_, y), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return y, grads


def run_layer(m, x):
  return forward(*nnx.split(m, nnx.Param), x)


X = jnp.asarray(np.random.default_rng(1).standard_normal((2, 13, WIDTH)), jnp.float32)


@pytest.mark.parametrize("window", [WINDOW, None])
def test_layer_matches_reference(window):
  m = make_layer(window)
  y, _ = run_layer(m, X)
  assert y.shape == X.shape and y.dtype == jnp.float32
  assert rel_err(y, reference_layer(m, X, window)) < FP32_TOL


def test_long_window_layer_is_full_attention():
  """Same seed, same parameters: a window >= L makes the sliding layer the full one."""
  y_full, _ = run_layer(make_layer(None), X)
  np.testing.assert_allclose(run_layer(make_layer(window=64), X)[0], y_full,
                             rtol=FP32_TOL, atol=FP32_TOL)


@pytest.mark.parametrize("window", [WINDOW, None])
def test_layer_is_causal_and_deterministic(window):
  m = make_layer(window)
  y, _ = run_layer(m, X)
  np.testing.assert_array_equal(y, run_layer(m, X)[0])
  np.testing.assert_array_equal(y, run_layer(make_layer(window), X)[0])  # same seed, same layer
  y2, _ = run_layer(m, X.at[:, 6].add(1.0))
  np.testing.assert_array_equal(y2[:, :6], y[:, :6])
  assert float(jnp.abs(y2[:, 6] - y[:, 6]).max()) > 1e-4
  if window is not None:  # beyond the window nothing sees token 6
    np.testing.assert_array_equal(y2[:, 6 + window:], y[:, 6 + window:])


@pytest.mark.parametrize("window", [WINDOW, None])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_parameter_gets_a_finite_gradient_and_logical_names(window, dtype):
  m = make_layer(window, dtype=dtype)
  y, grads = run_layer(m, X.astype(dtype))
  assert y.shape == X.shape and y.dtype == dtype
  assert bool(jnp.isfinite(y.astype(jnp.float32)).all())
  flat = dict(nnx.to_flat_state(grads))
  assert len(flat) == NUM_PARAMS
  for path, g in flat.items():
    assert g.dtype == jnp.float32, path  # param_dtype
    assert bool(jnp.isfinite(g[...]).all()) and float(jnp.abs(g[...]).max()) > 0, path
  known = {name for name, _ in RULES}
  for path, v in nnx.to_flat_state(nnx.state(m, nnx.Param)):
    names = names_of(v)
    assert len(names) == v.ndim and set(names) <= known, (path, names)
  if dtype == jnp.bfloat16:
    assert rel_err(y, run_layer(make_layer(window), X)[0]) < BF16_TOL


def test_layer_options():
  """qk_norm=False drops the norms and rope_theta=None the rotation: the core then sees the
  raw projections."""
  m = make_layer(qk_norm=False, rope_theta=None)
  assert m.norm_q is None and m.norm_k is None
  q, k, v = m.project(X)
  B, L, _ = X.shape
  np.testing.assert_allclose(q, m.to_q(X).reshape(B, L, HEADS, -1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cls,kwargs,match", [
    (SlidingWindowAttention, dict(window=0), "window"),
    (SlidingWindowAttention, dict(window=4, block=2), "block"),
    (SlidingWindowAttention, dict(window=4, num_heads=3), "divisible by num_heads"),
    (FullAttention, dict(num_heads=3), "divisible by num_heads"),
    (FullAttention, dict(num_heads=0), "num_heads"),
    (FullAttention, dict(num_heads=16), "even head dim"),  # d = 1 with RoPE
])
def test_bad_arguments_are_named(cls, kwargs, match):
  kw = dict(num_heads=HEADS) | kwargs
  with pytest.raises(ValueError, match=match):
    cls(WIDTH, kw.pop("num_heads"), rngs=nnx.Rngs(0), **kw)


def test_bad_input_width_is_named():
  with pytest.raises(ValueError, match="takes"):
    make_layer()(jnp.zeros((1, 4, WIDTH + 1)))


def test_the_shared_base_needs_a_core():
  """CausalSelfAttention is abstract: without `core` there is no layer to build."""
  with pytest.raises(TypeError, match="abstract method core"):
    sw.CausalSelfAttention(WIDTH, HEADS, rngs=nnx.Rngs(0))
