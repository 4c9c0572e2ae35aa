"""LaCT: the chunked core against an explicit loop over chunks written from the equations.

The references share nothing with ttt_jax.layers.lact:
  reference_lact   per head, a Python loop over chunks in float64 (jnp, vmapped over batch
                   and heads, compiled once per case): the inner gradient is jax.grad of the chunk loss
                   -sum_j eta_ij <f(k_j), v_j> with f(x) = W2 (silu(W1 x) * (W3 x)) per token;
                   Newton-Schulz written out below (`reference_newton_schulz`); each row
                   rescaled to its initial norm; queries read out through the updated weights;
                   a ragged last chunk is simply shorter (no padding). jax.vjp of it gives the
                   reference outer gradients (w.r.t. q, k, v, eta and the initial weights).
  reference_layer  the whole layer from its parameters, numpy float64 around reference_lact.
Tolerances, relative to the reference's max |value| (rel_err), the core in fp32 against
float64:
  FP32_TOL = 1e-5 for plain gradient steps: fp32 rounding of O(1) sums over <= 64 tokens,
    <= 5e-7 seen for values and gradients, while a wrong sign, a missed eta or a shifted
    chunk is >= 1e-2;
  MUON_TOL = 5e-4 with Newton-Schulz: the quintic map has slope a = 3.44 at 0, so 5 steps
    amplify fp32 rounding of the small singular values of the normalised gradient up to
    a^5 ~ 490-fold (<= 8e-6 seen on these cases, up to 9e-5 on longer sequences).
In float64 the core must equal the loop to round-off (<= 2e-14 seen): F64_TOL = 1e-10.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.layers import lact as lact_mod
from ttt_jax.layers.lact import LaCT
from ttt_jax.parallel.sharding import RULES, names_of

FP32_TOL = 1e-5
MUON_TOL = 5e-4
F64_TOL = 1e-10
# bf16 layer vs fp32 layer, Frobenius-relative: bf16 rounds q, k, v, eta by ~4e-3, and the
# Newton-Schulz map's slope of up to a^5 ~ 490 on small singular values turns that into
# percents of the update (5e-2 seen with Muon; 6e-3 with plain steps).
BF16_TOL = 0.15

# Compile the test programs without LLVM's optimisation of the CPU code: the same HLO (what is
# under test), half the compile time, which is most of this file's time on a 2-core CPU.
QUICK = {"xla_backend_optimization_level": 0}

NS_ABC = (3.4445, -4.7750, 2.0315)
ARGS = ("q", "k", "v", "eta", "W1", "W2", "W3")
B, H, D_HEAD, F_HIDDEN = 2, 2, 4, 8


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


# -------------------------------------------------------------- reference ----
def reference_newton_schulz(G, steps):
  """Muon: X = G / (|G|_F + 1e-7) (transposed if tall), then X <- aX + (bA + cA^2)X, A = XX^T."""
  a, b, c = NS_ABC
  tall = G.shape[0] > G.shape[1]
  X = G.T if tall else G
  X = X / (jnp.sqrt(jnp.sum(X * X)) + 1e-7)
  for _ in range(steps):
    A = X @ X.T
    X = a * X + (b * A + c * A @ A) @ X
  return X.T if tall else X


def reference_f(W, x):
  """The fast SwiGLU of one token x [d]: W2 (silu(W1 x) * (W3 x))."""
  W1, W2, W3 = W
  return W2 @ (jax.nn.silu(W1 @ x) * (W3 @ x))


def reference_head(q, k, v, eta, W1, W2, W3, chunk, steps):
  """One head: q, k, v [L, d], eta [L, 3] -> o [L, d] and the final (W1, W2, W3).

  A Python loop over chunks; a ragged last chunk is just shorter."""
  W = (W1, W2, W3)
  norms = [jnp.sqrt(jnp.sum(w * w, axis=1, keepdims=True)) for w in W]  # initial row norms
  token_loss = lambda W, x, y: -jnp.dot(reference_f(W, x), y)  # -<f(k_j), v_j>
  out = []
  for s in range(0, q.shape[0], chunk):
    qc, kc, vc, ec = q[s:s + chunk], k[s:s + chunk], v[s:s + chunk], eta[s:s + chunk]
    # dL_i/dW_i = sum_j eta_ij d(-<f(k_j), v_j>)/dW_i: per-token gradients by jax.grad.
    per_token = jax.vmap(jax.grad(token_loss), in_axes=(None, 0, 0))(W, kc, vc)
    new = []
    for i in range(3):
      g = jnp.tensordot(ec[:, i], per_token[i], axes=1)
      w = W[i] - (reference_newton_schulz(g, steps) if steps else g)
      new.append(w / (jnp.sqrt(jnp.sum(w * w, axis=1, keepdims=True)) + 1e-5) * norms[i])
    W = tuple(new)
    out.append(jax.vmap(lambda x: reference_f(W, x))(qc))
  return jnp.concatenate(out, axis=0), W


def reference_lact(q, k, v, eta, W1, W2, W3, *, chunk, steps):
  """q, k, v [B, L, H, d], eta [B, L, H, 3], W [H, ...] -> o [B, L, H, d], final W [B, H, ...]."""
  head = functools.partial(reference_head, chunk=chunk, steps=steps)
  heads = jax.vmap(head, in_axes=(1, 1, 1, 1, 0, 0, 0), out_axes=(1, 0))
  return jax.vmap(heads, in_axes=(0, 0, 0, 0, None, None, None))(q, k, v, eta, W1, W2, W3)


@functools.partial(jax.jit, static_argnames=("chunk", "steps"), compiler_options=QUICK)
def reference_vjp(args, ct, *, chunk, steps):
  """reference_lact's o, final weights and gradients of <o, ct> w.r.t. ARGS (one compile per
  case)."""
  fn = functools.partial(reference_lact, chunk=chunk, steps=steps)
  (o, final), pullback = jax.vjp(fn, *args)
  return o, final, pullback((ct, jax.tree.map(jnp.zeros_like, final)))


def make_inputs(L, seed=0, dtype=np.float32, shared_eta=False):
  """Unit q and k, v, eta > 0 around 0.1 (one per fast weight, or one for all three),
  initial weights N(0, 1/fan_in) as the layer's, and a cotangent for o."""
  rng = np.random.default_rng(seed)
  n = lambda *s: rng.standard_normal(s)
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  d, F = D_HEAD, F_HIDDEN
  arrays = dict(q=unit(n(B, L, H, d)), k=unit(n(B, L, H, d)), v=n(B, L, H, d),
                eta=0.1 * np.exp(0.5 * n(B, L, H, 3)), W1=n(H, F, d) / np.sqrt(d),
                W2=n(H, d, F) / np.sqrt(F), W3=n(H, F, d) / np.sqrt(d), ct=n(B, L, H, d))
  if shared_eta:
    arrays["eta"] = np.repeat(arrays["eta"][..., :1], 3, axis=-1)
  return {key: a.astype(dtype) for key, a in arrays.items()}


@functools.lru_cache(maxsize=None)
def reference(L, chunk, steps, seed=0, shared_eta=False):
  """(inputs, o, final weights, gradients of <o, ct> w.r.t. ARGS), float64 numpy."""
  a = make_inputs(L, seed, shared_eta=shared_eta)
  with jax.enable_x64(True):
    out = reference_vjp([jnp.asarray(a[key], jnp.float64) for key in ARGS],
                        jnp.asarray(a["ct"], jnp.float64), chunk=chunk, steps=steps)
  return (a, *jax.tree.map(np.asarray, out))


@functools.partial(jax.jit, static_argnames=("chunk_size", "muon_steps", "remat_group"),
                   compiler_options=QUICK)
def core_vjp(args, ct, *, chunk_size, muon_steps, remat_group=None):
  """The core's o and its gradients w.r.t. ARGS for the cotangent ct (one compile per case)."""
  fn = functools.partial(lact_mod.lact, chunk_size=chunk_size, muon_steps=muon_steps,
                         remat_group=remat_group)
  o, pullback = jax.vjp(fn, *args)
  return o, pullback(ct.astype(o.dtype))


# ------------------------------------------------------------------- core ----
CASES = [  # L, chunk, Muon steps: every chunk size and both updates, ragged ends (padding)
    (3, 1, 0),  # token-level TTT with plain gradient steps
    (13, 8, 5),  # 8 + 5 tokens, Muon
    (70, 64, 5),  # one large chunk and a 6-token tail, Muon (LaCT's regime)
]


@pytest.mark.parametrize("L,chunk,steps", CASES)
def test_core_matches_reference(L, chunk, steps):
  a, want_o, _, want = reference(L, chunk, steps)
  o, got = core_vjp([jnp.asarray(a[key]) for key in ARGS], jnp.asarray(a["ct"]),
                    chunk_size=chunk, muon_steps=steps)
  tol = MUON_TOL if steps else FP32_TOL
  assert o.dtype == jnp.float32 and o.shape == want_o.shape
  assert rel_err(o, want_o) < tol, rel_err(o, want_o)
  for name, g, w in zip(ARGS, got, want):
    assert g.dtype == jnp.float32 and g.shape == w.shape, name
    assert rel_err(g, w) < tol, (name, rel_err(g, w))


def test_core_is_exact_in_float64():
  """Chunked, padded and closed-form: the same numbers as the loop over chunks with jax.grad,
  final fast weights included (their rows keep the initial norms). Run on heads 1: with one
  eta [B, L, H] for all three weights: heads are independent (what a head-sharded run
  computes) and a shared eta is the per-weight one repeated."""
  a, want_o, want_final, _ = reference(13, 8, 5, seed=1, shared_eta=True)  # compiled for CASES
  heads = lambda key: jnp.asarray(a[key][:, :, 1:] if a[key].ndim == 4 else a[key][1:],
                                  jnp.float64)
  run = jax.jit(functools.partial(lact_mod.lact, chunk_size=8, muon_steps=5,
                                  return_final_weights=True), compiler_options=QUICK)
  with jax.enable_x64(True):
    q, k, v, eta, *weights = (heads(key) for key in ARGS)
    o, final = run(q, k, v, eta[..., 0], *weights)
    assert o.dtype == jnp.float64
  assert rel_err(o, want_o[:, :, 1:]) < F64_TOL
  for w, want_w, w0 in zip(final, want_final, weights):
    assert w.shape == (B, *w0.shape) and rel_err(w, want_w[:, 1:]) < F64_TOL
    np.testing.assert_allclose(np.linalg.norm(w, axis=-1),
                               np.broadcast_to(np.linalg.norm(w0, axis=-1), w.shape[:-1]),
                               rtol=1e-4)  # the 1e-5 eps of the renormalisation


def test_remat_group_changes_nothing():
  """Checkpointing the chunk scan (groups of 2 + a last group of 1) recomputes, nothing else."""
  a, *_ = reference(3, 1, 0)
  args, ct = [jnp.asarray(a[key]) for key in ARGS], jnp.asarray(a["ct"])
  want = core_vjp(args, ct, chunk_size=1, muon_steps=0)  # compiled for CASES
  got = core_vjp(args, ct, chunk_size=1, muon_steps=0, remat_group=2)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_err(g, w) < FP32_TOL


def test_core_is_causal_at_chunk_granularity():
  """Perturbing token t leaves every earlier chunk bit-identical, and (update-then-apply)
  changes every token of its own chunk up to t."""
  a = make_inputs(13, seed=2)
  args = [jnp.asarray(a[key]) for key in ARGS]
  ct = jnp.asarray(a["ct"])
  run = lambda args: core_vjp(args, ct, chunk_size=8, muon_steps=5)[0]  # compiled for CASES
  o = run(args)
  for t in (0, 5, 8, 12):
    start = t // 8 * 8
    q, k, v, eta, *weights = args
    o2 = run([q, k.at[:, t].multiply(-1), v.at[:, t].add(1.0), eta.at[:, t].multiply(3.0),
              *weights])
    np.testing.assert_array_equal(o2[:, :start], o[:, :start])
    changed = jnp.abs(o2[:, start:t + 1] - o[:, start:t + 1]).max(axis=(0, 2, 3))  # per token
    assert float(changed.min()) > 1e-6, changed


@pytest.mark.parametrize("shape", [(8, 4), (4, 8), (5, 5)])
def test_newton_schulz_maps_singular_values(shape):
  """NS_s(G) = U p^s(S / |S|) V^T for G = U S V^T, p(s) = a s + b s^3 + c s^5: it keeps the
  singular vectors (either orientation) and pushes the singular values towards ~1."""
  G = np.random.default_rng(4).standard_normal((2, *shape))
  with jax.enable_x64(True):
    got = np.asarray(lact_mod.newton_schulz(jnp.asarray(G), 5))
  U, S, Vt = np.linalg.svd(G, full_matrices=False)
  s = S / (np.sqrt((S ** 2).sum(-1, keepdims=True)) + 1e-7)
  a, b, c = NS_ABC
  for _ in range(5):
    s = a * s + b * s ** 3 + c * s ** 5
  np.testing.assert_allclose(got, U @ (s[..., None] * Vt), rtol=1e-10, atol=1e-10)
  assert (s > 0.6).all() and (s < 1.25).all()


def test_newton_schulz_of_zero_is_zero_with_finite_gradient():
  value_and_grad = jax.jit(jax.value_and_grad(lambda x: jnp.sum(lact_mod.newton_schulz(x, 5))),
                           compiler_options=QUICK)
  value, g = value_and_grad(jnp.zeros((3, 4)))
  assert float(value) == 0.0 and bool(jnp.isfinite(g).all())


def test_core_rejects_bad_arguments():
  a = make_inputs(8)
  args = [jnp.asarray(a[key]) for key in ARGS]
  with pytest.raises(ValueError, match="chunk_size"):
    lact_mod.lact(*args, chunk_size=0)
  with pytest.raises(ValueError, match="muon_steps"):
    lact_mod.lact(*args, chunk_size=4, muon_steps=-1)
  for i, bad in ((1, args[1][..., :3]), (3, args[3][..., :2]), (5, args[5][:, :, :3])):
    with pytest.raises(ValueError, match="takes"):
      lact_mod.lact(*args[:i], bad, *args[i + 1:], chunk_size=4)


# ------------------------------------------------------------------ layer ----
WIDTH = H * D_HEAD  # d = 4, F = 2d = 8, L = 13, C = 8: a core case's shapes, so that the
L_LAYER, CHUNK = 13, 8  # layer's reference reuses its compiled reference_vjp
NUM_PARAMS = 10  # q, k, v, out kernels; lr kernel and bias; W1, W2, W3; norm_weight


def make_layer(**kw):
  """The test layer; its parameters are drawn with the 'rbg' PRNG, which compiles in a
  fraction of threefry's time (seconds per file on a 2-core CPU)."""
  kw = dict(chunk_size=CHUNK, hidden_ratio=F_HIDDEN // D_HEAD, muon_steps=5) | kw
  return LaCT(WIDTH, H, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), **kw)


def silu(x):
  return x / (1 + np.exp(-x))


def numpy_rope(a, theta):
  """1-D RoPE over positions 0..L-1 of a [B, L, H, d]: pair (2i, 2i+1) by pos theta^(-2i/d)."""
  L, d = a.shape[1], a.shape[-1]
  angle = np.arange(L)[:, None] * theta ** (-np.arange(0, d, 2) / d)
  cos, sin = np.cos(angle)[None, :, None], np.sin(angle)[None, :, None]
  out = np.empty_like(a)
  out[..., 0::2] = a[..., 0::2] * cos - a[..., 1::2] * sin
  out[..., 1::2] = a[..., 0::2] * sin + a[..., 1::2] * cos
  return out


def reference_project(m: LaCT, x):
  """q, k (unit, rotated if the layer has RoPE), v, eta of the layer, numpy float64."""
  p = lambda v: np.asarray(v[...], np.float64)
  x = np.asarray(x, np.float64)
  Bt, L, _ = x.shape
  heads = lambda proj: silu(x @ p(proj.kernel)).reshape(Bt, L, H, -1)
  unit = lambda t: t / np.sqrt(np.sum(t ** 2, axis=-1, keepdims=True) + 1e-6)
  q, k, v = unit(heads(m.q_proj)), unit(heads(m.k_proj)), heads(m.v_proj)
  if m.rope_theta is not None:
    q, k = numpy_rope(q, m.rope_theta), numpy_rope(k, m.rope_theta)
  base_lr = 1e-2
  logits = (x @ p(m.lr_proj.kernel) + p(m.lr_proj.bias)).reshape(Bt, L, H, 3)
  eta = np.logaddexp(0, logits + np.log(np.expm1(base_lr)))  # softplus, base_lr at 0
  return q, k, v, eta


def reference_layer(m: LaCT, x):
  """The layer from its parameters, float64 (the release's bidirectional LaCT layer, chunked)."""
  p = lambda v: np.asarray(v[...], np.float64)
  q, k, v, eta = reference_project(m, x)
  with jax.enable_x64(True):
    o, _, _ = reference_vjp([jnp.asarray(t) for t in (q, k, v, eta, p(m.W1), p(m.W2), p(m.W3))],
                            jnp.zeros(q.shape, jnp.float64), chunk=m.chunk_size,
                            steps=m.muon_steps)
  o = np.asarray(o)
  o = o / np.sqrt(np.mean(o ** 2, axis=-1, keepdims=True) + 1e-5) * p(m.norm_weight)
  return o.reshape(*o.shape[:2], -1) @ p(m.out_proj.kernel)


@functools.partial(jax.jit, static_argnums=0, compiler_options=QUICK)
def forward(graphdef, params, x):
  """y [B, L, D] and d sum(y^2) / d params: every layer test of one dtype shares this compile."""
  def loss(params):
    y = nnx.merge(graphdef, params)(x)
    return jnp.sum(jnp.square(y.astype(jnp.float32))), y
  (_, y), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return y, grads


def run_layer(m, x):
  return forward(*nnx.split(m, nnx.Param), x)


X = jnp.asarray(np.random.default_rng(1).standard_normal((B, L_LAYER, WIDTH)), jnp.float32)


def test_layer_matches_reference():
  m = make_layer()
  y, _ = run_layer(m, X)
  assert y.shape == X.shape and y.dtype == jnp.float32
  assert rel_err(y, reference_layer(m, X)) < MUON_TOL


def test_layer_rope_option():
  """rope_theta rotates the unit q and k by their position 0..L-1 (the release's LLM layer)."""
  m = make_layer(rope_theta=500.0)
  for got, want in zip(m.project(X), reference_project(m, X)):
    assert rel_err(got, want) < FP32_TOL


def test_layer_is_causal_at_chunk_granularity_and_deterministic():
  m = make_layer()
  y, _ = run_layer(m, X)
  np.testing.assert_array_equal(y, run_layer(m, X)[0])
  np.testing.assert_array_equal(y, run_layer(make_layer(), X)[0])  # same seed, same layer
  t = 11  # in chunk [8, 13)
  y2, _ = run_layer(m, X.at[:, t].add(1.0))
  np.testing.assert_array_equal(y2[:, :8], y[:, :8])
  assert float(jnp.abs(y2[:, 8:t] - y[:, 8:t]).max()) > 1e-5  # non-causal inside its chunk
  assert float(jnp.abs(y2[:, t:] - y[:, t:]).max()) > 1e-4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_parameter_gets_a_finite_gradient_and_logical_names(dtype):
  m = make_layer(dtype=dtype)
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
    y32 = np.asarray(run_layer(make_layer(), X)[0], np.float64)
    y = np.asarray(y.astype(jnp.float32), np.float64)
    assert np.linalg.norm(y - y32) / np.linalg.norm(y32) < BF16_TOL


def test_layer_shapes_follow_the_arguments():
  m = nnx.eval_shape(lambda: LaCT(32, 4, hidden_ratio=3, rngs=nnx.Rngs(0)))
  assert (m.head_dim, m.hidden, m.chunk_size, m.muon_steps) == (8, 24, 2048, 5)
  assert m.W1.shape == m.W3.shape == (4, 24, 8) and m.W2.shape == (4, 8, 24)
  assert m.lr_proj.kernel.shape == (32, 12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=3), "divisible by num_heads"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(muon_steps=-1), "muon_steps"),
    (dict(hidden_ratio=0), "hidden_ratio"),
    (dict(base_lr=0.0), "base_lr"),
    (dict(remat_group=0), "remat_group"),
])
def test_bad_arguments_are_named(kwargs, match):
  kw = dict(num_heads=H) | kwargs
  with pytest.raises(ValueError, match=match):
    LaCT(WIDTH, kw.pop("num_heads"), rngs=nnx.Rngs(0), **kw)


def test_bad_input_width_is_named():
  with pytest.raises(ValueError, match="takes"):
    make_layer()(jnp.zeros((1, 4, WIDTH + 1)))
