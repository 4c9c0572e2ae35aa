"""The TTT op against an independent per-token reference, in values and grads.

Tolerances: fp32 comparisons use rtol=atol=1e-5 on O(1) outputs (the op and
the reference differ only in summation order: the op sums the mini-batch's
gradients in one matmul);
gradients, which pass through a second-order LayerNorm derivative and sums
over every token, use 1e-4. bf16 matmuls keep 8 mantissa bits (~4e-3 relative
per product), so bf16 runs are held to 3e-2 of the fp32 result.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from tests.ops.naive_ttt import g_linear, g_mlp, naive_ttt
from ttt_jax.ops import ttt_linear, ttt_mlp
from ttt_jax.ops.ttt import scan_remat
from ttt_jax.ttt_step import gelu_tanh, gelu_tanh_grad, layer_norm_fwd, layer_norm_vjp


def make_inputs(key, B=2, H=2, NC=3, K=4, d=8, hidden=None, kind="linear",
                dtype=jnp.float32, eta_scale=0.5):
  """Random op inputs; eta large enough that the inner updates matter."""
  ks = jax.random.split(key, 10)
  shape = (B, H, NC, K, d)
  # q and k are L2-normalised per head in the layer; do the same here.
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(ks[0], shape, dtype))
  k = unit(jax.random.normal(ks[1], shape, dtype))
  v = jax.random.normal(ks[2], shape, dtype)
  eta = eta_scale * jax.random.uniform(ks[3], (B, H, NC, K), dtype)
  ln_w = 1.0 + 0.1 * jax.random.normal(ks[4], (H, d), dtype)
  ln_b = 0.1 * jax.random.normal(ks[5], (H, d), dtype)
  if kind == "linear":
    params = {"W": 0.3 * jax.random.normal(ks[6], (H, d, d), dtype),
              "b": 0.1 * jax.random.normal(ks[7], (H, 1, d), dtype)}
  else:
    F = hidden or 4 * d
    params = {"W1": 0.3 * jax.random.normal(ks[6], (H, d, F), dtype),
              "b1": 0.1 * jax.random.normal(ks[7], (H, 1, F), dtype),
              "W2": 0.3 * jax.random.normal(ks[8], (H, F, d), dtype),
              "b2": 0.1 * jax.random.normal(ks[9], (H, 1, d), dtype)}
  return (q, k, v, eta, ln_w, ln_b), params


OPS = {
    "linear": (ttt_linear, g_linear, ("W", "b")),
    "mlp": (ttt_mlp, g_mlp, ("W1", "b1", "W2", "b2")),
}


def run_op(kind, tokens, params, **kw):
  op, _, names = OPS[kind]
  return op(*tokens, *(params[n] for n in names), **kw)


def run_naive(kind, tokens, params):
  _, g, _ = OPS[kind]
  return naive_ttt(g, *tokens, params)


def assert_close(a, b, tol):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol, atol=tol)


# ---------------------------------------------------------------- pieces ----


def test_layer_norm_vjp_matches_autodiff():
  ks = jax.random.split(jax.random.key(0), 4)
  z = 3.0 * jax.random.normal(ks[0], (5, 16))
  w = 1.0 + jax.random.normal(ks[1], (16,))
  b = jax.random.normal(ks[2], (16,))
  g_y = jax.random.normal(ks[3], (5, 16))
  _, vjp = jax.vjp(lambda z_: layer_norm_fwd(z_, w, b)[0], z)
  _, x_hat, std = layer_norm_fwd(z, w, b)
  assert_close(layer_norm_vjp(g_y, x_hat, std, w), vjp(g_y)[0], 1e-5)


def test_gelu_tanh_and_its_derivative_match_jax():
  x = jnp.linspace(-6.0, 6.0, 1001)
  assert_close(gelu_tanh(x), jax.nn.gelu(x, approximate=True), 1e-6)
  assert_close(gelu_tanh_grad(x), jax.vmap(jax.grad(functools.partial(
      jax.nn.gelu, approximate=True)))(x), 1e-6)


@pytest.mark.parametrize("group", [None, 1, 2, 3, 7])
def test_scan_remat_equals_scan(group):
  step = lambda c, x: (c * 0.9 + x, jnp.sin(c) * x)
  xs = jnp.arange(7.0)
  c1, y1 = jax.lax.scan(step, 1.0, xs)
  c2, y2 = scan_remat(step, 1.0, xs, group)
  assert_close(c1, c2, 0)
  assert_close(y1, y2, 0)
  g1 = jax.grad(lambda x: jax.lax.scan(step, 1.0, x)[1].sum())(xs)
  g2 = jax.grad(lambda x: scan_remat(step, 1.0, x, group)[1].sum())(xs)
  assert_close(g1, g2, 1e-6)


# -------------------------------------------------- values vs reference ----


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize("remat_group", [None, 2])
def test_values_and_final_weights_match_naive(kind, remat_group):
  tokens, params = make_inputs(jax.random.key(1), kind=kind)
  z, final = run_op(kind, tokens, params, remat_group=remat_group,
                    return_final_weights=True)
  z_ref, final_ref = run_naive(kind, tokens, params)
  assert z.shape == tokens[0].shape
  assert_close(z, z_ref, 1e-5)
  for got, name in zip(final, OPS[kind][2]):
    assert_close(got, final_ref[name], 1e-5)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_gradients_match_naive(kind):
  tokens, params = make_inputs(jax.random.key(2), B=1, NC=3, K=3, kind=kind)
  cot = jax.random.normal(jax.random.key(3), tokens[0].shape)

  def loss(fn, tokens, params):
    return jnp.sum(fn(tokens, params) * cot)

  op_fn = lambda t, p: run_op(kind, t, p, remat_group=2)
  ref_fn = lambda t, p: run_naive(kind, t, p)[0]
  g_op = jax.grad(functools.partial(loss, op_fn), argnums=(0, 1))(tokens, params)
  g_ref = jax.jit(jax.grad(functools.partial(loss, ref_fn), argnums=(0, 1)))(tokens, params)
  names = ["q", "k", "v", "eta", "ln_weight", "ln_bias"]
  for name, a, b in zip(names, g_op[0], g_ref[0]):
    assert float(jnp.abs(b).max()) > 0, name
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)
  for name in params:
    np.testing.assert_allclose(g_op[1][name], g_ref[1][name], rtol=1e-4, atol=1e-4,
                               err_msg=name)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_minibatch_of_one_is_online_gradient_descent(kind):
  """K=1: W_t = W_{t-1} - eta_t grad l_t(W_{t-1}); z_t = f(q_t; W_t)."""
  tokens, params = make_inputs(jax.random.key(4), B=1, H=1, NC=6, K=1, kind=kind)
  q, k, v, eta, ln_w, ln_b = (x[0, 0] if x.ndim > 2 else x[0] for x in tokens)
  q, k, v, eta = q[:, 0], k[:, 0], v[:, 0], eta[:, 0]  # [T, d], [T]
  g = OPS[kind][1]
  p = {n: x[0] for n, x in params.items()}

  def ln(z):
    return ln_w * (z - z.mean()) / jnp.sqrt(z.var() + 1e-8) + ln_b

  loss = lambda p_, t: 0.5 * jnp.sum((ln(g(k[t], p_)) - (v[t] - k[t])) ** 2)
  zs = []
  for t in range(q.shape[0]):
    grads = jax.grad(loss)(p, t)
    p = jax.tree.map(lambda w, gw: w - eta[t] * gw, p, grads)
    zs.append(q[t] + ln(g(q[t], p)))
  z = run_op(kind, tokens, params)
  assert_close(z[0, 0, :, 0], jnp.stack(zs), 1e-5)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_check_grads_float64(kind):
  """Finite differences in float64 on a small problem, all arguments."""
  with jax.enable_x64(True):
    tokens, params = make_inputs(jax.random.key(5), B=1, H=2, NC=3, K=2, d=4,
                                 kind=kind, dtype=jnp.float64)
    names = OPS[kind][2]
    fn = lambda *args: OPS[kind][0](*args, remat_group=2)
    check_grads(fn, (*tokens, *(params[n] for n in names)), order=1,
                modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-6)


# ---------------------------------------------------------- properties ----


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_later_minibatches_do_not_affect_earlier_outputs(kind):
  tokens, params = make_inputs(jax.random.key(6), NC=4, kind=kind)
  z = run_op(kind, tokens, params)
  q, k, v, *rest = tokens
  k2 = k.at[:, :, 2:].add(1.0)
  v2 = v.at[:, :, 2:].add(1.0)
  z2 = run_op(kind, (q, k2, v2, *rest), params)
  assert_close(z[:, :, :2], z2[:, :, :2], 0)
  assert float(jnp.abs(z[:, :, 2:] - z2[:, :, 2:]).max()) > 1e-3


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_readout_within_minibatch_is_non_causal(kind):
  """The first token of a mini-batch already sees the last token's update."""
  tokens, params = make_inputs(jax.random.key(7), NC=2, kind=kind)
  q, k, v, *rest = tokens
  z = run_op(kind, tokens, params)
  z2 = run_op(kind, (q, k, v.at[:, :, :, -1].add(1.0), *rest), params)
  assert float(jnp.abs(z[:, :, :, 0] - z2[:, :, :, 0]).max()) > 1e-3


def test_zero_learning_rate_reads_out_initial_weights():
  tokens, params = make_inputs(jax.random.key(8), kind="linear")
  q, k, v, eta, ln_w, ln_b = tokens
  z = ttt_linear(q, k, v, jnp.zeros_like(eta), ln_w, ln_b, params["W"], params["b"])
  ref = q + layer_norm_fwd(jnp.einsum("bhnkd,hde->bhnke", q, params["W"])
                           + params["b"][:, None], ln_w[:, None, None], ln_b[:, None, None])[0]
  assert_close(z, ref, 1e-5)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_bf16_matmuls_track_fp32(kind):
  tokens, params = make_inputs(jax.random.key(9), NC=4, K=8, d=16, kind=kind)
  z32, w32 = run_op(kind, tokens, params, return_final_weights=True)
  z16, w16 = run_op(kind, tokens, params, matmul_dtype=jnp.bfloat16,
                    return_final_weights=True)
  assert z16.dtype == jnp.float32 and all(w.dtype == jnp.float32 for w in w16)
  assert_close(z16, z32, 3e-2)
  for a, b in zip(w16, w32):
    assert_close(a, b, 3e-2)
  # bf16 activations in, bf16 out; the fast-weight state stays fp32.
  tokens16 = tuple(x.astype(jnp.bfloat16) for x in tokens)
  z, w = run_op(kind, tokens16, params, matmul_dtype=jnp.bfloat16,
                return_final_weights=True)
  assert z.dtype == jnp.bfloat16 and all(x.dtype == jnp.float32 for x in w)
  assert_close(z.astype(jnp.float32), z32, 6e-2)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_bf16_tokens_are_cast_per_minibatch_not_per_sequence(kind):
  """No fp32 copy of the whole q / k / v: outside the scan body no op turns a bf16
  sequence-sized [.., NC, ..] token array into fp32 (each step casts its own mini-batch)."""
  tokens, params = make_inputs(jax.random.key(12), NC=4, K=8, d=16, kind=kind)
  tokens = tuple(x.astype(jnp.bfloat16) for x in tokens)
  f = lambda t, p: run_op(kind, t, p, matmul_dtype=jnp.bfloat16, remat_group=2)
  jaxpr = jax.make_jaxpr(f)(tokens, params).jaxpr
  seq_casts = [e for e in jaxpr.eqns if e.primitive.name == "convert_element_type"
               and e.outvars[0].aval.dtype == jnp.float32 and 4 in e.outvars[0].aval.shape]
  assert not seq_casts, seq_casts
  scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
  assert scans and all(v.aval.dtype == jnp.bfloat16 for v in scans[0].invars[-4:])


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_remat_bounds_backward_memory(kind):
  """Residual memory of the backward pass shrinks with the remat group."""
  tokens, params = make_inputs(jax.random.key(10), B=1, H=2, NC=64, K=16, d=16, kind=kind)

  def temp_bytes(group):
    loss = lambda t, p: jnp.sum(run_op(kind, t, p, remat_group=group) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(tokens, params).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full, grouped = temp_bytes(None), temp_bytes(8)
  assert grouped < 0.5 * full, (grouped, full)


# --------------------------------------------------------------- errors ----


def test_shape_errors_name_the_argument():
  tokens, params = make_inputs(jax.random.key(11), kind="linear")
  q, k, v, eta, ln_w, ln_b = tokens
  with pytest.raises(ValueError, match=r"eta has shape \(2, 2, 3\).*\[B, H, NC, K\]"):
    ttt_linear(q, k, v, eta[..., 0], ln_w, ln_b, params["W"], params["b"])
  with pytest.raises(ValueError, match=r"^W has shape"):
    ttt_linear(q, k, v, eta, ln_w, ln_b, params["W"][:, :4], params["b"])
  with pytest.raises(ValueError, match=r"^q has shape .* rank 5"):
    ttt_linear(q[0], k, v, eta, ln_w, ln_b, params["W"], params["b"])
  with pytest.raises(TypeError, match=r"^k must be floating"):
    ttt_linear(q, k.astype(jnp.int32), v, eta, ln_w, ln_b, params["W"], params["b"])
  tokens, params = make_inputs(jax.random.key(11), kind="mlp")
  with pytest.raises(ValueError, match=r"^W2 has shape"):
    ttt_mlp(*tokens, params["W1"], params["b1"], params["W2"][:, :-1], params["b2"])
  with pytest.raises(ValueError, match="remat_group"):
    ttt_mlp(*tokens, *params.values(), remat_group=0)


# ------------------------------------------- TTT-MLP hand-written VJP ----


def test_gelu_tanh_derivs_match_autodiff():
  from ttt_jax.ttt_step import gelu_tanh_derivs
  with jax.enable_x64(True):
    x = jnp.linspace(-6.0, 6.0, 1001, dtype=jnp.float64)
    g, g1, g2 = gelu_tanh_derivs(x)
    assert_close(g, gelu_tanh(x), 1e-12)
    assert_close(g1, gelu_tanh_grad(x), 1e-12)
    assert_close(g2, jax.vmap(jax.grad(gelu_tanh_grad))(x), 1e-12)


def test_ln_fit_bwd_matches_autodiff():
  from ttt_jax.ttt_step import ln_fit_bwd, ln_fit_fwd
  with jax.enable_x64(True):
    ks = jax.random.split(jax.random.key(20), 7)
    K, d = 5, 8
    z = 2.0 * jax.random.normal(ks[0], (K, d), jnp.float64) + 0.5
    xk, xv = (jax.random.normal(k_, (K, d), jnp.float64) for k_ in ks[1:3])
    eta = jax.random.uniform(ks[3], (K, 1), jnp.float64)
    ln_w = 1.0 + 0.3 * jax.random.normal(ks[4], (1, d), jnp.float64)
    ln_b = 0.2 * jax.random.normal(ks[5], (1, d), jnp.float64)
    de = jax.random.normal(ks[6], (K, d), jnp.float64)
    fit = lambda *a: ln_fit_fwd(*a, eps=1e-8)[0]
    args = (z, xk, xv, eta, ln_w, ln_b)
    assert_close(fit(*args), eta * layer_norm_vjp(
        layer_norm_fwd(z, ln_w, ln_b)[0] - (xv - xk), *layer_norm_fwd(z, ln_w, ln_b)[1:], ln_w),
        1e-12)
    want = jax.vjp(fit, *args)[1](de)
    dz, dr, deta, dlnw, dlnb = ln_fit_bwd(ln_fit_fwd(*args, eps=1e-8)[1], de, ln_w)
    got = (dz, dr, -dr, deta, dlnw.sum(0, keepdims=True), dlnb.sum(0, keepdims=True))
    for name, a, b in zip(["z", "xk", "xv", "eta", "ln_w", "ln_b"], got, want):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10, err_msg=name)


def test_mlp_shifted_step_matches_mlp_step_and_its_autodiff():
  """One shifted step = mlp_readout at W_{b-1} + mlp_update; its hand-written
  VJP = autodiff of that composition (fp64, leading [B, H] axes)."""
  from ttt_jax.ttt_step import matmul, mlp_readout, mlp_shifted_bwd, mlp_shifted_fwd, mlp_update
  with jax.enable_x64(True):
    tokens, params = make_inputs(jax.random.key(21), B=2, H=2, NC=2, K=4, d=8, kind="mlp",
                                 dtype=jnp.float64)
    q, k, v, eta, ln_w, ln_b = tokens
    xs = (q[:, :, 0], k[:, :, 1], v[:, :, 1], eta[:, :, 1, :, None])
    ln_w, ln_b = ln_w[None, :, None], ln_b[None, :, None]
    W1, b1, W2, b2 = (jnp.broadcast_to(params[n], (2, *params[n].shape))
                      for n in ("W1", "b1", "W2", "b2"))
    mm = matmul(jnp.float64, jnp.float64)

    def ref(state, inputs, ln_w, ln_b):
      xq, xk, xv, e = inputs
      grads = mlp_update(state, xk, xv, e, ln_w, ln_b, eps=1e-8, mm=mm)
      return (tuple(w - g for w, g in zip(state, grads)),
              mlp_readout(state, xq, ln_w, ln_b, eps=1e-8, mm=mm))

    def shifted(state, inputs, ln_w, ln_b):
      W1, b1, W2, b2 = state
      (W1, b1, W2t, b2), z = mlp_shifted_fwd((W1, b1, jnp.swapaxes(W2, -1, -2), b2), inputs,
                                             ln_w, ln_b, eps=1e-8, mm=mm)[0]
      return (W1, b1, jnp.swapaxes(W2t, -1, -2), b2), z

    state = (W1, b1, W2, b2)
    want_out, vjp = jax.vjp(ref, state, xs, ln_w, ln_b)
    got_out = shifted(state, xs, ln_w, ln_b)
    for a, b in zip(jax.tree.leaves(got_out), jax.tree.leaves(want_out)):
      assert_close(a, b, 1e-12)
    cts = jax.tree.map(lambda x: jax.random.normal(jax.random.key(22), x.shape, x.dtype), want_out)
    want = vjp(cts)
    W2t = jnp.swapaxes(W2, -1, -2)
    res = mlp_shifted_fwd((W1, b1, W2t, b2), xs, ln_w, ln_b, eps=1e-8, mm=mm)[1]
    (dW1, db1, dW2, db2), dz = cts
    dstate, dxs, dlnw, dlnb = mlp_shifted_bwd(
        res, ((dW1, db1, jnp.swapaxes(dW2, -1, -2), db2), dz), ln_w, mm=mm)
    dstate = (dstate[0], dstate[1], jnp.swapaxes(dstate[2], -1, -2), dstate[3])
    got = (dstate, dxs, dlnw.sum((0, 2), keepdims=True), dlnb.sum((0, 2), keepdims=True))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      assert_close(a, b, 1e-10)


def _mlp_final_weights_case():
  tokens, params = make_inputs(jax.random.key(23), B=2, H=1, NC=3, K=2, d=4, kind="mlp")
  names = OPS["mlp"][2]
  cot = jax.random.normal(jax.random.key(24), tokens[0].shape)
  w_cot = {n: jax.random.normal(jax.random.key(25 + i), (2, *params[n].shape))
           for i, n in enumerate(names)}

  def loss(z, final):
    return jnp.sum(z * cot) + sum(jnp.sum(final[n] * w_cot[n]) for n in names)

  return tokens, params, names, loss


@functools.lru_cache(maxsize=None)
def _mlp_final_weights_reference():
  tokens, params, _, loss = _mlp_final_weights_case()
  return jax.jit(jax.grad(lambda t, p: loss(*run_naive("mlp", t, p)), argnums=(0, 1)))(
      tokens, params)


@pytest.mark.parametrize("remat_group", [None, 1, 2, 4])
def test_mlp_gradients_incl_final_weights_match_naive(remat_group):
  """Every gradient of ttt_mlp (hand-written VJP) against autodiff of the
  independent per-token reference, with cotangents on z and on the final
  weights, B > 1, and remat groups that do not divide NC (fp32, 1e-4)."""
  tokens, params, names, loss = _mlp_final_weights_case()

  def op_loss(t, p):
    z, final = ttt_mlp(*t, *(p[n] for n in names), remat_group=remat_group,
                       return_final_weights=True)
    return loss(z, dict(zip(names, final)))

  g_op = jax.jit(jax.grad(op_loss, argnums=(0, 1)))(tokens, params)
  g_ref = _mlp_final_weights_reference()
  for name, a, b in zip(["q", "k", "v", "eta", "ln_weight", "ln_bias"], g_op[0], g_ref[0]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)
  for name in names:
    np.testing.assert_allclose(g_op[1][name], g_ref[1][name], rtol=1e-4, atol=1e-4, err_msg=name)


def test_mlp_gradients_under_vmap_and_bf16():
  """vmap of grad works, and bf16-matmul gradients track the fp32 ones."""
  tokens, params = make_inputs(jax.random.key(30), B=1, NC=3, K=8, d=16, kind="mlp")
  names = OPS["mlp"][2]
  cot = jax.random.normal(jax.random.key(31), tokens[0].shape)

  @functools.partial(jax.jit, static_argnums=1)
  def grads(q, matmul_dtype=None):
    loss = lambda t, p: jnp.sum(ttt_mlp(*t, *(p[n] for n in names), remat_group=2,
                                        matmul_dtype=matmul_dtype) * cot)
    return jax.grad(loss, argnums=(0, 1))((q, *tokens[1:]), params)

  qs = jnp.stack([tokens[0], tokens[0][..., ::-1]])
  batched = jax.vmap(grads)(qs)
  for i in range(2):
    for a, b in zip(jax.tree.leaves(grads(qs[i])), jax.tree.leaves(batched)):
      assert_close(a, b[i], 1e-5)
  g32 = jax.tree.leaves(grads(tokens[0]))
  g16 = jax.tree.leaves(grads(tokens[0], jnp.bfloat16))
  for a, b in zip(g16, g32):
    assert a.dtype == b.dtype
    scale = max(1.0, float(jnp.abs(b).max()))
    assert float(jnp.abs(a - b).max()) <= 5e-2 * scale
