"""Mamba 2: the chunked SSD against per-token recurrences written from the equations.

The references share nothing with ttt_jax.layers.mamba2:
  naive_ssd      numpy float64, a Python loop over tokens and heads;
  scan_ssd       a jax lax.scan over single tokens (for gradients), run in float64;
  reference_layer the whole layer in numpy float64 from its parameters (torch's
                 Conv1d and RMSNormGated(norm_before_gate=False) semantics).
Tolerances, relative to the reference's max |value| (rel_err): the core runs in fp32
against float64, so only fp32 rounding of O(1) sums over <= 50 tokens differs:
<= 3e-7 seen for values and gradients, FP32_TOL = 1e-5 leaves room for other XLA
fusion orders while any algorithmic slip (a missed decay, a shifted chunk) is >= 1e-3.
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

from ttt_jax.layers import mamba2
from ttt_jax.layers.mamba2 import Mamba2
from ttt_jax.parallel.sharding import RULES, names_of

FP32_TOL = 1e-5
F64_TOL = 1e-12

ARGS = ("x", "dt", "A", "B", "C", "h0")

# Jitted once: one compile per shape instead of one per primitive (eager mode).
ssd = jax.jit(mamba2.ssd, static_argnames=("chunk_size", "return_final_state"))


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def make_inputs(Bt, L, H, P, G, N, seed=0, dtype=np.float32):
  """x, dt (> 0), A (< 0), B, C, an initial state, and cotangents for y and the final state.

  dt ~ 0.2 softplus(normal) and A in [-4, -0.5]: per-token decays 0.3 .. 0.99, so
  the state carries across several chunks of 8 and the inter-chunk pass matters."""
  rng = np.random.default_rng(seed)
  n = lambda *s: rng.standard_normal(s)
  arrays = dict(x=n(Bt, L, H, P), dt=0.2 * np.logaddexp(0, n(Bt, L, H)),
                A=-rng.uniform(0.5, 4.0, H), B=n(Bt, L, G, N), C=n(Bt, L, G, N),
                h0=n(Bt, H, P, N), ct_y=n(Bt, L, H, P), ct_h=n(Bt, H, P, N))
  return {k: v.astype(dtype) for k, v in arrays.items()}


def naive_ssd(x, dt, A, B, C, h0=None):
  """h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t; numpy float64, token by token."""
  x, dt, A, B, C = (np.asarray(a, np.float64) for a in (x, dt, A, B, C))
  Bt, L, H, P = x.shape
  G, N = B.shape[2:]
  h = np.zeros((Bt, H, P, N)) if h0 is None else np.array(h0, np.float64)
  y = np.zeros_like(x)
  for t in range(L):
    for head in range(H):
      g = head // (H // G)
      for b in range(Bt):
        h[b, head] = (np.exp(dt[b, t, head] * A[head]) * h[b, head]
                      + dt[b, t, head] * np.outer(x[b, t, head], B[b, t, g]))
        y[b, t, head] = h[b, head] @ C[b, t, g]
  return y, h


def scan_ssd(x, dt, A, B, C, h0):
  """The same recurrence as a lax.scan over tokens (differentiable), every head explicit."""
  H, G = x.shape[2], B.shape[2]
  Bh, Ch = (jnp.repeat(m, H // G, axis=2) for m in (B, C))  # [Bt, L, H, N]

  def token(h, inputs):
    x_t, dt_t, B_t, C_t = inputs  # [Bt, H, P], [Bt, H], [Bt, H, N] x 2
    h = (jnp.exp(dt_t * A)[..., None, None] * h
         + (dt_t[..., None] * x_t)[..., :, None] * B_t[..., None, :])
    return h, jnp.einsum("bhpn,bhn->bhp", h, C_t)

  h, y = lax.scan(token, h0, tuple(jnp.moveaxis(a, 1, 0) for a in (x, dt, Bh, Ch)))
  return jnp.moveaxis(y, 0, 1), h


SHAPES = [  # (Bt, L, H, P, G, N), chunk
    ((2, 37, 4, 3, 2, 5), 8),  # ragged: 4 x 8 + 5; H > 1, G > 1
    ((2, 23, 3, 2, 1, 4), 1),  # chunk of one token: no padding, pure state passing
    ((1, 50, 4, 2, 4, 3), 16),  # ragged, one head per group
]


def vjp(fn, args, cts):
  """fn's outputs and its gradients w.r.t. every argument for cotangents cts (one compile)."""
  out, pullback = jax.vjp(fn, *args)
  return out, pullback(tuple(c.astype(o.dtype) for c, o in zip(cts, out)))


# --------------------------------------------------------------- the core ----
@pytest.mark.parametrize("shape,chunk", SHAPES)
def test_ssd_matches_recurrence(shape, chunk):
  """Values (y, final state) against the numpy loop, and d/d(x, dt, A, B, C, h0) of a random
  projection of them against the float64 per-token scan; the core in fp32 throughout."""
  a = make_inputs(*shape)
  cts = (a["ct_y"], a["ct_h"])
  chunked = lambda *args: mamba2.ssd(*args[:5], chunk_size=chunk, initial_state=args[5],
                                     return_final_state=True)
  with jax.enable_x64(True):
    (y, h), got = jax.jit(functools.partial(vjp, chunked))([jnp.asarray(a[k]) for k in ARGS], cts)
    want = jax.jit(functools.partial(vjp, scan_ssd))(
        [jnp.asarray(a[k], jnp.float64) for k in ARGS], cts)[1]
  want_y, want_h = naive_ssd(*(a[k] for k in ARGS))
  assert y.dtype == jnp.float32 and y.shape == want_y.shape and h.shape == want_h.shape
  assert rel_err(y, want_y) < FP32_TOL and rel_err(h, want_h) < FP32_TOL
  for name, g, w in zip(ARGS, got, want):
    assert g.dtype == jnp.float32 and g.shape == w.shape, name
    assert rel_err(g, w) < FP32_TOL, (name, rel_err(g, w))


def test_ssd_is_exact_in_float64():
  """The chunked algorithm is the recurrence, not an approximation of it."""
  a = make_inputs(2, 37, 4, 3, 2, 5, dtype=np.float64)
  with jax.enable_x64(True):
    y, h = ssd(*(jnp.asarray(a[k]) for k in ARGS[:5]), chunk_size=8,
               initial_state=jnp.asarray(a["h0"]), return_final_state=True)
    assert y.dtype == jnp.float64
  want_y, want_h = naive_ssd(*(a[k] for k in ARGS[:5]), a["h0"])
  assert rel_err(y, want_y) < F64_TOL and rel_err(h, want_h) < F64_TOL


def test_state_round_trip(split=13):
  """Running [0, split) then [split, L) from the handed-on state equals one run (the split
  off a chunk boundary, so the second part's chunks are shifted)."""
  a = make_inputs(2, 37, 4, 3, 2, 5, seed=1)
  args = [jnp.asarray(a[k]) for k in ARGS[:5]]
  run = lambda lo, hi, h0: ssd(*(t if t.ndim == 1 else t[:, lo:hi] for t in args), chunk_size=8,
                               initial_state=h0, return_final_state=True)
  h0 = jnp.asarray(a["h0"])
  y, h = run(0, 37, h0)
  y1, h1 = run(0, split, h0)
  y2, h2 = run(split, 37, h1)
  assert rel_err(jnp.concatenate([y1, y2], axis=1), y) < FP32_TOL
  assert rel_err(h2, h) < FP32_TOL


def test_ssd_is_causal():
  """Perturbing token t (every input) leaves outputs before t bit-identical, changes t's."""
  a = make_inputs(2, 37, 4, 3, 2, 5, seed=2)
  args = [jnp.asarray(a[k]) for k in ARGS[:5]]
  run = lambda args: ssd(*args, chunk_size=8, initial_state=jnp.asarray(a["h0"]),
                         return_final_state=True)[0]  # the round trip's compiled call
  y = run(args)
  for t in (0, 5, 8, 20, 36):  # first, inside, at and across chunk starts, last
    y2 = run([m if m.ndim == 1 else m.at[:, t].add(0.5) for m in args])
    np.testing.assert_array_equal(y2[:, :t], y[:, :t])
    assert float(jnp.abs(y2[:, t] - y[:, t]).max()) > 1e-3


def test_heads_are_separable():
  """The core on one group's heads (with that group's B, C) is the slice of the full run:
  what a head-sharded run computes."""
  a = make_inputs(2, 37, 4, 3, 2, 5, seed=3)
  x, dt, A, B, C, h0 = (jnp.asarray(a[k]) for k in ARGS)
  run = functools.partial(ssd, chunk_size=8, return_final_state=True)
  y, h = run(x, dt, A, B, C, initial_state=h0)  # the round trip's compiled call
  y2, h2 = run(x[:, :, 2:], dt[:, :, 2:], A[2:], B[:, :, 1:], C[:, :, 1:], initial_state=h0[:, 2:])
  assert rel_err(y2, y[:, :, 2:]) < FP32_TOL and rel_err(h2, h[:, 2:]) < FP32_TOL


def test_ssd_rejects_bad_shapes():
  a = make_inputs(1, 8, 4, 2, 2, 3)
  x, dt, A, B, C = (jnp.asarray(a[k]) for k in ARGS[:5])
  with pytest.raises(ValueError, match="divisible"):
    ssd(x[:, :, :3], dt[:, :, :3], A[:3], B, C)
  with pytest.raises(ValueError, match="dt"):
    ssd(x, dt[:, :4], A, B, C)
  with pytest.raises(ValueError, match="chunk_size"):
    ssd(x, dt, A, B, C, chunk_size=0)


# -------------------------------------------------------------- the layer ----
NUM_PARAMS = 13  # 5 projections, 2 convs with bias, dt_bias, A_log, D, norm_weight
WIDTH, HEADS = 16, 4


def make_layer(**kw):
  kw = dict(state_dim=6, num_groups=2, expand=2, chunk_size=8) | kw
  return Mamba2(WIDTH, HEADS, rngs=nnx.Rngs(0), **kw)


def silu(v):
  return v / (1 + np.exp(-v))


def torch_causal_conv(x, weight, bias):
  """Conv1d(groups=C, padding=K-1)[:L] with weight [K, C]: weight[K-1] on the current token."""
  K, L = weight.shape[0], x.shape[1]
  out = np.broadcast_to(bias, x.shape).copy()
  for t in range(L):
    for j in range(K):
      if t - (K - 1) + j >= 0:
        out[:, t] += weight[j] * x[:, t - (K - 1) + j]
  return out


def reference_layer(m: Mamba2, x):
  """The layer from its parameters, numpy float64 (mamba_ssm's Mamba2 forward)."""
  p = lambda v: np.asarray(v[...], np.float64)
  x = np.asarray(x, np.float64)
  Bt, L, _ = x.shape
  H, P, G, N = m.num_heads, m.head_dim, m.num_groups, m.state_dim
  z = x @ p(m.z_proj.kernel)
  xs = silu(torch_causal_conv(x @ p(m.x_proj.kernel), p(m.conv_x_kernel), p(m.conv_x_bias)))
  bc = silu(torch_causal_conv(x @ p(m.bc_proj.kernel), p(m.conv_bc_kernel), p(m.conv_bc_bias)))
  dt = np.logaddexp(0, x @ p(m.dt_proj.kernel) + p(m.dt_bias))
  A = -np.exp(p(m.A_log))
  xs = xs.reshape(Bt, L, H, P)
  y, _ = naive_ssd(xs, dt, A, bc[..., :G * N].reshape(Bt, L, G, N),
                   bc[..., G * N:].reshape(Bt, L, G, N))
  y = (y + p(m.D)[:, None] * xs).reshape(Bt, L, H * P) * silu(z)
  y = y.reshape(Bt, L, G, -1)  # RMSNormGated(group_size = inner / G), gate before the norm
  y = y / np.sqrt(np.mean(y ** 2, axis=-1, keepdims=True) + 1e-5)
  return (y.reshape(Bt, L, H * P) * p(m.norm_weight)) @ p(m.out_proj.kernel)


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


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=3), "divisible by num_heads"),  # inner 32
    (dict(num_heads=4, num_groups=3), "divisible by num_groups"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(state_dim=0), "state_dim"),
    (dict(dt_min=0.2, dt_max=0.1), "dt_min"),
])
def test_bad_arguments_are_named(kwargs, match):
  kw = dict(num_heads=HEADS, expand=2) | kwargs
  with pytest.raises(ValueError, match=match):
    Mamba2(WIDTH, kw.pop("num_heads"), rngs=nnx.Rngs(0), **kw)


def test_bad_input_width_is_named():
  with pytest.raises(ValueError, match="takes"):
    make_layer()(jnp.zeros((1, 4, WIDTH + 1)))
