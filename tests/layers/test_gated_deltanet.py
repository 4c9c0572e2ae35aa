"""Gated DeltaNet: the chunked (WY) rule against per-token recurrences written from the equations.

The references share nothing with ttt_jax.layers.gated_deltanet (or mamba2):
  naive_rule      numpy float64, a Python loop over tokens and heads with the
                  explicit matrix S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T;
  scan_rule       the same as a jax lax.scan over single tokens (for gradients), run in float64;
  reference_layer the whole layer in numpy float64 from its parameters (fla's GatedDeltaNet).
Tolerances, relative to the reference's max |value| (rel_err): the core runs in fp32
against float64, so only fp32 rounding of O(1) sums over <= 50 tokens (and of one
16 x 16 triangular solve per chunk) differs: <= 3e-7 seen for values and gradients,
FP32_TOL = 1e-5 leaves room for other XLA fusion orders while any algorithmic slip
(a missed decay, a shifted chunk) is >= 1e-3.
In float64 the chunked algorithm must equal the recurrence to round-off (<= 5e-16
seen): F64_TOL = 1e-12.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from ttt_jax.layers import gated_deltanet as gdn
from ttt_jax.layers.gated_deltanet import GatedDeltaNet
from ttt_jax.parallel.sharding import RULES, names_of

FP32_TOL = 1e-5
F64_TOL = 1e-12

ARGS = ("q", "k", "v", "g", "beta", "S0")

# Jitted once: one compile per shape instead of one per primitive (eager mode).
rule = jax.jit(gdn.gated_delta_rule, static_argnames=("chunk_size", "return_final_state"))


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def make_inputs(Bt, L, H, dk, dv, seed=0, strong_decay=False, dtype=np.float32):
  """q, k unit vectors, v, g <= 0, beta in (0, 1), an initial state S0 [Bt, H, dv, dk], and
  cotangents for o and the final state. Mild decays (g ~ -0.3 softplus(normal)) keep memory
  across chunks; strong_decay (g down to about -10) checks that nothing over- or underflows."""
  rng = np.random.default_rng(seed)
  n = lambda *s: rng.standard_normal(s)
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  g = -np.logaddexp(0, 3 * n(Bt, L, H)) if strong_decay else -0.3 * np.logaddexp(0, n(Bt, L, H))
  arrays = dict(q=unit(n(Bt, L, H, dk)), k=unit(n(Bt, L, H, dk)), v=n(Bt, L, H, dv), g=g,
                beta=1 / (1 + np.exp(-n(Bt, L, H))), S0=0.5 * n(Bt, H, dv, dk),
                ct_o=n(Bt, L, H, dv), ct_S=n(Bt, H, dv, dk))
  return {key: a.astype(dtype) for key, a in arrays.items()}


def naive_rule(q, k, v, g, beta, S0=None):
  """S_t = exp(g_t) S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t / sqrt(dk)."""
  q, k, v, g, beta = (np.asarray(a, np.float64) for a in (q, k, v, g, beta))
  Bt, L, H, dk = q.shape
  dv = v.shape[-1]
  S = np.zeros((Bt, H, dv, dk)) if S0 is None else np.array(S0, np.float64)
  o = np.zeros((Bt, L, H, dv))
  for b in range(Bt):
    for h in range(H):
      for t in range(L):
        kt = k[b, t, h]
        S[b, h] = (np.exp(g[b, t, h]) * S[b, h] @ (np.eye(dk) - beta[b, t, h] * np.outer(kt, kt))
                   + beta[b, t, h] * np.outer(v[b, t, h], kt))
        o[b, t, h] = S[b, h] @ q[b, t, h] / np.sqrt(dk)
  return o, S


def scan_rule(q, k, v, g, beta, S0):
  """The same recurrence as a lax.scan over tokens (differentiable)."""
  dk = q.shape[-1]
  eye = jnp.eye(dk, dtype=q.dtype)

  def token(S, inputs):
    q_t, k_t, v_t, g_t, b_t = inputs  # [Bt, H, dk], [Bt, H, dk], [Bt, H, dv], [Bt, H] x 2
    erase = eye - b_t[..., None, None] * k_t[..., :, None] * k_t[..., None, :]  # [Bt, H, dk, dk]
    S = (jnp.exp(g_t)[..., None, None] * S @ erase
         + b_t[..., None, None] * v_t[..., :, None] * k_t[..., None, :])
    return S, jnp.einsum("bhvk,bhk->bhv", S, q_t) / jnp.sqrt(dk)

  S, o = lax.scan(token, S0, tuple(jnp.moveaxis(a, 1, 0) for a in (q, k, v, g, beta)))
  return jnp.moveaxis(o, 0, 1), S


SHAPES = [  # (Bt, L, H, dk, dv), chunk, strong decay
    ((2, 37, 3, 4, 5), 8, False),  # ragged: 4 x 8 + 5; H > 1, dk != dv
    ((2, 23, 2, 3, 2), 1, False),  # chunk of one token: no padding, pure state passing
    ((1, 50, 4, 8, 8), 16, True),  # ragged, strong decays
]


def vjp(fn, args, cts):
  """fn's outputs and its gradients w.r.t. every argument for cotangents cts (one compile)."""
  out, pullback = jax.vjp(fn, *args)
  return out, pullback(tuple(c.astype(o.dtype) for c, o in zip(cts, out)))


# --------------------------------------------------------------- the core ----
@pytest.mark.parametrize("shape,chunk,strong", SHAPES)
def test_rule_matches_recurrence(shape, chunk, strong):
  """Values (o, final state) against the numpy loop, and d/d(q, k, v, g, beta, S0) of a random
  projection of them against the float64 per-token scan; the core in fp32 throughout."""
  a = make_inputs(*shape, strong_decay=strong)
  cts = (a["ct_o"], a["ct_S"])
  chunked = lambda *args: gdn.gated_delta_rule(*args[:5], chunk_size=chunk,
                                               initial_state=args[5], return_final_state=True)
  with jax.enable_x64(True):
    (o, S), got = jax.jit(functools.partial(vjp, chunked))(
        [jnp.asarray(a[key]) for key in ARGS], cts)
    want = jax.jit(functools.partial(vjp, scan_rule))(
        [jnp.asarray(a[key], jnp.float64) for key in ARGS], cts)[1]
  want_o, want_S = naive_rule(*(a[key] for key in ARGS))
  assert o.dtype == jnp.float32 and o.shape == want_o.shape and S.shape == want_S.shape
  assert rel_err(o, want_o) < FP32_TOL and rel_err(S, want_S) < FP32_TOL
  for name, gr, w in zip(ARGS, got, want):
    assert gr.dtype == jnp.float32 and gr.shape == w.shape, name
    assert rel_err(gr, w) < FP32_TOL, (name, rel_err(gr, w))


def test_rule_is_exact_in_float64():
  """The chunked (WY) form is the recurrence, not an approximation of it."""
  a = make_inputs(2, 37, 3, 4, 5, dtype=np.float64)
  with jax.enable_x64(True):
    o, S = rule(*(jnp.asarray(a[key]) for key in ARGS[:5]), chunk_size=8,
                initial_state=jnp.asarray(a["S0"]), return_final_state=True)
    assert o.dtype == jnp.float64
  want_o, want_S = naive_rule(*(a[key] for key in ARGS))
  assert rel_err(o, want_o) < F64_TOL and rel_err(S, want_S) < F64_TOL


def test_state_round_trip(split=13):
  """Running [0, split) then [split, L) from the handed-on state equals one run (the split
  off a chunk boundary, so the second part's chunks are shifted)."""
  a = make_inputs(2, 37, 3, 4, 5, seed=1)
  args = [jnp.asarray(a[key]) for key in ARGS[:5]]
  run = lambda lo, hi, S0: rule(*(t[:, lo:hi] for t in args), chunk_size=8, initial_state=S0,
                                return_final_state=True)
  S0 = jnp.asarray(a["S0"])
  o, S = run(0, 37, S0)
  o1, S1 = run(0, split, S0)
  o2, S2 = run(split, 37, S1)
  assert rel_err(jnp.concatenate([o1, o2], axis=1), o) < FP32_TOL
  assert rel_err(S2, S) < FP32_TOL


def test_rule_is_causal():
  """Perturbing token t (every input) leaves outputs before t bit-identical, changes t's."""
  a = make_inputs(2, 37, 3, 4, 5, seed=2)
  args = [jnp.asarray(a[key]) for key in ARGS[:5]]
  run = lambda args: rule(*args, chunk_size=8, initial_state=jnp.asarray(a["S0"]),
                          return_final_state=True)[0]  # the round trip's compiled call
  o = run(args)
  for t in (0, 5, 8, 20, 36):  # first, inside, at and across chunk starts, last
    q, k, v, g, beta = args
    bumped = (q.at[:, t].multiply(-1), k.at[:, t].multiply(-1), v.at[:, t].add(0.5),
              g.at[:, t].add(-0.5), beta.at[:, t].set(0.5 * beta[:, t]))
    o2 = run(bumped)
    np.testing.assert_array_equal(o2[:, :t], o[:, :t])
    assert float(jnp.abs(o2[:, t] - o[:, t]).max()) > 1e-3


def test_default_scale_is_inverse_sqrt_head_dim():
  """o_t = S_t q_t / sqrt(dk): the state does not depend on q, so o is linear in the scale."""
  a = make_inputs(2, 37, 3, 4, 5)
  args = [jnp.asarray(a[key]) for key in ARGS[:5]]
  S0 = jnp.asarray(a["S0"])
  o = rule(*args, chunk_size=8, initial_state=S0, return_final_state=True)[0]  # compiled before
  o_unscaled = jax.jit(functools.partial(gdn.gated_delta_rule, chunk_size=8, scale=1.0))(
      *args, initial_state=S0)
  np.testing.assert_allclose(o, o_unscaled / 2.0, rtol=1e-6, atol=1e-6)  # dk = 4


def test_heads_are_separable():
  """The core on a subset of heads is the slice of the full run: what a head-sharded run
  computes."""
  a = make_inputs(2, 37, 3, 4, 5, seed=3)
  args = [jnp.asarray(a[key]) for key in ARGS[:5]]
  S0 = jnp.asarray(a["S0"])
  run = functools.partial(rule, chunk_size=8, return_final_state=True)
  o, S = run(*args, initial_state=S0)  # the round trip's compiled call
  o2, S2 = run(*(t[:, :, 1:] for t in args), initial_state=S0[:, 1:])
  assert rel_err(o2, o[:, :, 1:]) < FP32_TOL and rel_err(S2, S[:, 1:]) < FP32_TOL


def test_rule_rejects_bad_shapes():
  a = make_inputs(1, 8, 2, 4, 4)
  q, k, v, g, beta = (jnp.asarray(a[key]) for key in ARGS[:5])
  with pytest.raises(ValueError, match="takes"):
    gdn.gated_delta_rule(q, k[..., :3], v, g, beta)
  with pytest.raises(ValueError, match="takes"):
    gdn.gated_delta_rule(q, k, v, g, beta[:, :4])
  with pytest.raises(ValueError, match="chunk_size"):
    gdn.gated_delta_rule(q, k, v, g, beta, chunk_size=0)


# -------------------------------------------------------------- the layer ----
NUM_PARAMS = 13  # 7 projections, 3 convs, dt_bias, A_log, norm_weight
WIDTH, HEADS = 16, 2


def make_layer(**kw):
  return GatedDeltaNet(WIDTH, HEADS, rngs=nnx.Rngs(0), **(dict(chunk_size=8) | kw))


def silu(x):
  return x / (1 + np.exp(-x))


def torch_causal_conv(x, weight):
  """Conv1d(groups=C, padding=K-1, bias=False)[:L] with weight [K, C]: weight[K-1] on the
  current token."""
  K, L = weight.shape[0], x.shape[1]
  out = np.zeros_like(x)
  for t in range(L):
    for j in range(K):
      if t - (K - 1) + j >= 0:
        out[:, t] += weight[j] * x[:, t - (K - 1) + j]
  return out


def reference_layer(m: GatedDeltaNet, x):
  """The layer from its parameters, numpy float64 (fla's GatedDeltaNet forward, use_gate)."""
  p = lambda v: np.asarray(v[...], np.float64)
  x = np.asarray(x, np.float64)
  Bt, L, _ = x.shape
  H, d = m.num_heads, m.head_dim
  heads = lambda proj, conv: silu(torch_causal_conv(x @ p(proj.kernel), p(conv))).reshape(
      Bt, L, H, d)
  l2 = lambda a: a / np.sqrt(np.sum(a ** 2, axis=-1, keepdims=True) + 1e-6)
  q, k, v = l2(heads(m.q_proj, m.conv_q)), l2(heads(m.k_proj, m.conv_k)), heads(m.v_proj, m.conv_v)
  beta = 1 / (1 + np.exp(-(x @ p(m.b_proj.kernel))))
  g = -np.exp(p(m.A_log)) * np.logaddexp(0, x @ p(m.a_proj.kernel) + p(m.dt_bias))
  o, _ = naive_rule(q, k, v, g, beta)
  o = o / np.sqrt(np.mean(o ** 2, axis=-1, keepdims=True) + 1e-5) * p(m.norm_weight)
  o = o * silu((x @ p(m.g_proj.kernel)).reshape(Bt, L, H, d))
  return o.reshape(Bt, L, H * d) @ p(m.out_proj.kernel)


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, params, x):
  """y [B, L, D] and d sum(y^2) / d params: every layer test of one dtype shares this compile."""
  def loss(params):
    y = nnx.merge(graphdef, params)(x)
    return jnp.sum(jnp.square(y.astype(jnp.float32))), y
  (_, y), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return y, grads


def run_layer(m, x):
  return forward(*nnx.split(m, nnx.Param), x)


X = jax.random.normal(jax.random.key(1), (2, 21, WIDTH))


def test_layer_matches_reference():
  m = make_layer()
  y, _ = run_layer(m, X)
  assert y.shape == X.shape and y.dtype == jnp.float32
  assert rel_err(y, reference_layer(m, X)) < FP32_TOL


def test_layer_is_causal_and_deterministic():
  m = make_layer()
  y, _ = run_layer(m, X)
  np.testing.assert_array_equal(y, run_layer(m, X)[0])
  np.testing.assert_array_equal(y, run_layer(make_layer(), X)[0])  # same seed, same layer
  y2, _ = run_layer(m, X.at[:, 10].add(1.0))
  np.testing.assert_array_equal(y2[:, :10], y[:, :10])
  assert float(jnp.abs(y2[:, 10:] - y[:, 10:]).max()) > 1e-4


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


def test_explicit_head_dim():
  m = nnx.eval_shape(lambda: GatedDeltaNet(WIDTH, 3, head_dim=4, rngs=nnx.Rngs(0)))  # 16 % 3 != 0
  assert m.q_proj.kernel.shape == (WIDTH, 12) and m.out_proj.kernel.shape == (12, WIDTH)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=3), "divisible by num_heads"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(conv_width=0), "conv_width"),
    (dict(head_dim=0), "head_dim"),
    (dict(dt_min=0.2, dt_max=0.1), "dt_min"),
])
def test_bad_arguments_are_named(kwargs, match):
  kw = dict(num_heads=HEADS) | kwargs
  with pytest.raises(ValueError, match=match):
    GatedDeltaNet(WIDTH, kw.pop("num_heads"), rngs=nnx.Rngs(0), **kw)


def test_bad_input_width_is_named():
  with pytest.raises(ValueError, match="takes"):
    make_layer()(jnp.zeros((1, 4, WIDTH + 1)))
