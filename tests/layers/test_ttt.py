"""TTT layer: full independent reference, eta alignment, layouts, gates.

The reference below rebuilds the layer from its parameters with plain jnp and
the per-token naive inner loop of tests/ops/naive_ttt.py, with a ragged last
mini-batch instead of padding, so it checks the interleave, padding, RoPE
positions, eta and post-norm all at once (fp32, tolerance 1e-5 on O(1)
outputs; only summation order differs).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tests.ops.naive_ttt import g_linear, g_mlp, naive_ttt_head
from ttt_jax.data.layout import VideoLayout
from ttt_jax.layers.rope import apply_rope, rope_angles
from ttt_jax.layers.ttt import TTT, BidirectionalTTT

WIDTH, HEADS = 32, 2  # head_dim 16: the smallest 3D-RoPE-compatible size
MULTI = VideoLayout(text_lens=(3, 2, 4), segment_frames=(2, 1, 1), height=1, width=3)  # L = 21


def make_layer(inner="mlp", K=4, **kw):
  return TTT(WIDTH, HEADS, inner=inner, mini_batch_size=K, rngs=nnx.Rngs(0), **kw)


def make_x(layout, B=2, seed=1):
  return jax.random.normal(jax.random.key(seed), (B, layout.seq_len, WIDTH))


def reference_ttt(m: TTT, x, layout: VideoLayout, reverse: bool):
  B, L, D = x.shape
  H, d, K = m.num_heads, m.head_dim, m.mini_batch_size
  order = layout.ttt_order(reverse)
  xs = x[:, order]
  dense = lambda lin, t: t @ lin.kernel[...] + lin.bias[...]
  unit = lambda t: t / jnp.linalg.norm(t, axis=-1, keepdims=True)
  angles = rope_angles(jnp.asarray(layout.positions[order]), d)
  q = apply_rope(unit(dense(m.q_proj, xs).reshape(B, L, H, d)), angles)
  k = apply_rope(unit(dense(m.k_proj, xs).reshape(B, L, H, d)), angles)
  v = dense(m.v_proj, xs).reshape(B, L, H, d)
  eta = m.base_lr * jax.nn.sigmoid(xs @ m.lr_weight[...].T + m.lr_bias[...]) / (d * K)  # [B, L, H]
  g = g_linear if m.inner == "linear" else g_mlp
  names = ("W", "b") if m.inner == "linear" else ("W1", "b1", "W2", "b2")
  sizes = [K] * (L // K) + ([L % K] if L % K else [])
  z = jnp.stack([
      jnp.concatenate([
          naive_ttt_head(g, q[b, :, h], k[b, :, h], v[b, :, h], eta[b, :, h],
                         m.ln_weight[...][h], m.ln_bias[...][h],
                         {n: getattr(m, n)[...][h] for n in names}, sizes)[0]
          for h in range(H)], axis=-1)
      for b in range(B)])  # [B, L, D]
  mu = z.mean(-1, keepdims=True)
  z = (z - mu) / jnp.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
  z = z * m.post_norm.scale[...] + m.post_norm.bias[...]
  return jnp.zeros_like(x).at[:, order].set(dense(m.o_proj, z))


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_matches_reference(inner, reverse):
  m = make_layer(inner, K=4, base_lr=20.0)  # large lr: the inner steps matter
  x = make_x(MULTI, B=1)
  assert MULTI.seq_len % 4  # exercises the padded last mini-batch
  np.testing.assert_allclose(m(x, MULTI, reverse=reverse), reference_ttt(m, x, MULTI, reverse),
                             rtol=1e-5, atol=1e-5)


def test_eta_is_computed_per_token_after_interleave():
  m = make_layer("mlp", K=4)
  x = make_x(MULTI)
  _, _, _, eta = m.inner_inputs(x, MULTI)
  L = MULTI.seq_len
  eta = eta.reshape(*eta.shape[:2], -1)  # [B, H, NC*K]
  np.testing.assert_array_equal(eta[..., L:], 0.0)  # padding never updates weights
  xs = x[:, MULTI.ttt_order()]
  expected = 0.1 * jax.nn.sigmoid(jnp.einsum("bld,hd->bhl", xs, m.lr_weight[...])
                                  + m.lr_bias[...][:, None]) / (16 * 4)
  np.testing.assert_allclose(eta[..., :L], expected, rtol=1e-6)


def _permute_segments(x, layout: VideoLayout, perm):
  """Canonical input and layout of the same video with its segments reordered."""
  segs = layout._segment_slices()
  text = np.concatenate([segs[i][0] for i in perm])
  video = np.concatenate([segs[i][1] for i in perm])
  ids = np.concatenate([text, video])  # original canonical index of each new token
  new_layout = VideoLayout(tuple(layout.text_lens[i] for i in perm),
                           tuple(layout.segment_frames[i] for i in perm),
                           layout.height, layout.width)
  return x[:, ids], new_layout, ids


@pytest.mark.parametrize("reverse", [False, True])
def test_eta_moves_with_its_token_when_segments_are_reordered(reverse):
  """Regression for the public release, whose eta stayed in pre-interleave order."""
  m = make_layer("linear", K=4)
  x = make_x(MULTI)
  L = MULTI.seq_len

  def eta_by_token(x_, layout, ids):
    eta = m.inner_inputs(x_, layout, reverse=reverse)[3]
    eta = eta.reshape(*eta.shape[:2], -1)[..., :L]  # [B, H, L] in TTT order
    out = np.zeros(eta.shape)
    out[..., ids[layout.ttt_order(reverse)]] = eta  # indexed by original token
    return out

  base = eta_by_token(x, MULTI, np.arange(L))
  for perm in [(2, 0, 1), (1, 2, 0), (2, 1, 0)]:
    x_p, layout_p, ids = _permute_segments(x, MULTI, perm)
    np.testing.assert_allclose(eta_by_token(x_p, layout_p, ids), base, rtol=1e-6)


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("layout", [
    VideoLayout.from_seconds(3, text_len=3, height=2, width=2),  # single scene
    VideoLayout.from_seconds(9, text_len=(2, 4, 3), height=2, width=2, frames_per_segment=2),
], ids=["single_scene", "multi_scene"])
def test_bidirectional_shapes_and_grads(inner, layout):
  m = BidirectionalTTT(WIDTH, HEADS, inner=inner, mini_batch_size=8, remat_group=2,
                       rngs=nnx.Rngs(0))
  x = make_x(layout)
  y = nnx.jit(lambda m, x: m(x, layout))(m, x)
  assert y.shape == x.shape and bool(jnp.isfinite(y).all())

  grads = nnx.grad(lambda m: jnp.sum(m(x, layout) ** 2))(m)
  for path, g in jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param)):
    assert bool(jnp.isfinite(g).all()), path
    assert float(jnp.abs(g).max()) > 0, path


def test_bidirectional_is_the_gated_composition():
  m = BidirectionalTTT(WIDTH, HEADS, inner="mlp", mini_batch_size=4, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(jnp.tanh(m.alpha_fwd_video[...]), 0.1, rtol=1e-6)
  # Distinct gates per token type and direction, to see each used in its place.
  m.alpha_fwd_text[...] = jnp.full((WIDTH,), 0.3)
  m.alpha_bwd_video[...] = jnp.full((WIDTH,), -0.5)
  x = make_x(MULTI)
  is_video = jnp.asarray(MULTI.is_video)[:, None]
  gate = lambda t, v: jnp.where(is_video, jnp.tanh(v[...]), jnp.tanh(t[...]))
  a1 = x + gate(m.alpha_fwd_text, m.alpha_fwd_video) * m.ttt(x, MULTI)
  a2 = a1 + gate(m.alpha_bwd_text, m.alpha_bwd_video) * m.ttt(a1, MULTI, reverse=True)
  np.testing.assert_allclose(m(x, MULTI), a2, rtol=1e-6, atol=1e-6)
  for alpha in (m.alpha_fwd_text, m.alpha_fwd_video, m.alpha_bwd_text, m.alpha_bwd_video):
    alpha[...] = jnp.zeros((WIDTH,))
  np.testing.assert_array_equal(m(x, MULTI), x)


def test_selectable_from_config_and_deterministic():
  cfg = ml_collections.ConfigDict(dict(inner="linear", mini_batch_size=8, base_lr=0.5,
                                       remat_group=4, matmul_dtype=None))
  a = TTT(WIDTH, HEADS, rngs=nnx.Rngs(3), **cfg)
  b = TTT(WIDTH, HEADS, rngs=nnx.Rngs(3), **cfg)
  assert a.W[...].shape == (HEADS, 16, 16) and not hasattr(a, "W1")
  x = make_x(MULTI)
  np.testing.assert_array_equal(a(x, MULTI), b(x, MULTI))
  cfg.inner = "mlp"
  c = TTT(WIDTH, HEADS, rngs=nnx.Rngs(3), **cfg)
  assert c.W1[...].shape == (HEADS, 16, 64) and c.base_lr == 0.5


def test_bf16_layer_tracks_fp32():
  """bf16 projections and inner matmuls; state fp32. 8-bit mantissa -> ~5e-2 abs."""
  x = make_x(MULTI)
  ref = make_layer("mlp")(x, MULTI)
  m16 = make_layer("mlp", dtype=jnp.bfloat16, matmul_dtype=jnp.bfloat16)
  y = m16(x.astype(jnp.bfloat16), MULTI)
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(y.astype(jnp.float32), ref, atol=5e-2, rtol=5e-2)


def test_bad_input_errors():
  with pytest.raises(ValueError, match="inner model must be one of"):
    make_layer("rnn")
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    TTT(30, 4, rngs=nnx.Rngs(0))
  m = make_layer()
  with pytest.raises(ValueError, match=r"TTT input has shape \(2, 20, 32\), expected \[B, 21, 32\]"):
    m(jnp.zeros((2, 20, WIDTH)), MULTI)
