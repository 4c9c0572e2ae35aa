"""TTT layer: an independent reference, the release's target, eta alignment, gates.

`reference_ttt` rebuilds the layer from its parameters and the paper's
equations alone. It reuses nothing of the code under test: the TTT order is
built from the segment lists, global positions from the token grid, RoPE
from its formula as a complex rotation, the reconstruction target with the
release's own torch expression (unbiased std, eps on the std), and the
inner loop is the per-token naive loop of tests/ops/naive_ttt.py with a
ragged last mini-batch instead of padding. fp32, tolerance 1e-5 on O(1)
outputs: only summation order differs.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from flax import nnx

from tests.ops.naive_ttt import g_linear, g_mlp, naive_ttt_head
from ttt_jax.layout import VideoLayout
from ttt_jax.layers.ttt import TTT, BidirectionalTTT, reconstruction_target

WIDTH, HEADS = 32, 2  # head_dim 16: the smallest 3D-RoPE-compatible size
MULTI = VideoLayout(text_lens=(3, 2, 4), segment_frames=(2, 1, 1), height=1, width=3)  # L = 21
GRID = VideoLayout(text_lens=(2, 3), segment_frames=(2, 1), height=2, width=3)  # L = 23, 2-D grid


def make_layer(inner="mlp", K=4, **kw):
  return TTT(WIDTH, HEADS, inner=inner, mini_batch_size=K, rngs=nnx.Rngs(0), **kw)


def make_x(layout, B=2, seed=1):
  return jax.random.normal(jax.random.key(seed), (B, layout.seq_len, WIDTH))


def ttt_order_from_segments(text_lens, segment_frames, tokens_per_frame, reverse):
  """Canonical [texts; frames] index at each TTT position, from the segment lists."""
  n_text = sum(text_lens)
  segments, t0, f0 = [], 0, 0
  for n_t, n_f in zip(text_lens, segment_frames):
    text = list(range(t0, t0 + n_t))
    video = list(range(n_text + f0 * tokens_per_frame, n_text + (f0 + n_f) * tokens_per_frame))
    segments.append((text, video))
    t0, f0 = t0 + n_t, f0 + n_f
  if reverse:  # captions in reverse order, each before its own flipped frames
    segments = [(text, video[::-1]) for text, video in reversed(segments)]
  return [i for text, video in segments for i in text + video]


def rope_from_formula(x, pos, theta=10000.0):
  """x [d] rotated at grid position pos = (t, h, w): bands d/4, 3d/8, 3d/8 of complex pairs."""
  d = x.shape[-1]
  out, start = [], 0
  for p, n in zip(pos, (d // 4, 3 * d // 8, 3 * d // 8)):
    band = x[start:start + n]
    pairs = band[0::2] + 1j * band[1::2]
    rotated = pairs * np.exp(1j * p * theta ** (-np.arange(0, n, 2) / n))
    out.append(np.stack([rotated.real, rotated.imag], -1).reshape(n))
    start += n
  return np.concatenate(out)


def release_target(v, k, ln_w, ln_b):
  """The release's ln_reconstruction_target, written in torch: v' = LN(v - k) + k."""
  v, k = torch.from_numpy(np.asarray(v, np.float64)), torch.from_numpy(np.asarray(k, np.float64))
  t = v - k
  t = (t - t.mean(dim=-1, keepdim=True)) / (t.std(dim=-1, keepdim=True) + 1e-8)
  t = torch.from_numpy(np.asarray(ln_w, np.float64)) * t + torch.from_numpy(np.asarray(ln_b, np.float64))
  return (t + k).numpy()


def reference_ttt(m: TTT, x, layout: VideoLayout, reverse: bool):
  B, L, D = x.shape
  H, d, K = m.num_heads, m.head_dim, m.mini_batch_size
  P = layout.height * layout.width
  n_text = sum(layout.text_lens)
  order = ttt_order_from_segments(layout.text_lens, layout.segment_frames, P, reverse)
  assert sorted(order) == list(range(L))
  p = lambda a: np.asarray(a[...], np.float64)
  dense = lambda lin, t: t @ p(lin.kernel) + p(lin.bias)
  unit = lambda t: t / np.linalg.norm(t, axis=-1, keepdims=True)
  xs = np.asarray(x, np.float64)[:, order]  # [B, L, D] in TTT order
  q = unit(dense(m.q_proj, xs).reshape(B, L, H, d))
  k = unit(dense(m.k_proj, xs).reshape(B, L, H, d))
  for j, n in enumerate(order):  # video tokens rotate at their GLOBAL grid position
    if n >= n_text:
      f, r = divmod(n - n_text, P)
      pos = (f, *divmod(r, layout.width))
      for b in range(B):
        for h in range(H):
          q[b, j, h], k[b, j, h] = rope_from_formula(q[b, j, h], pos), rope_from_formula(k[b, j, h], pos)
  v = release_target(dense(m.v_proj, xs).reshape(B, L, H, d), k, p(m.ln_weight), p(m.ln_bias))
  gate = np.einsum("bld,hd->blh", xs, p(m.lr_weight)) + p(m.lr_bias)
  eta = m.base_lr / (1 + np.exp(-gate)) / (d * K)  # [B, L, H]
  g = g_linear if m.inner == "linear" else g_mlp
  names = ("W", "b") if m.inner == "linear" else ("W1", "b1", "W2", "b2")
  sizes = [K] * (L // K) + ([L % K] if L % K else [])
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  z = np.stack([
      np.concatenate([
          np.asarray(naive_ttt_head(g, f32(q[b, :, h]), f32(k[b, :, h]), f32(v[b, :, h]),
                                    f32(eta[b, :, h]), m.ln_weight[...][h], m.ln_bias[...][h],
                                    {n: getattr(m, n)[...][h] for n in names}, sizes)[0])
          for h in range(H)], axis=-1)
      for b in range(B)]).astype(np.float64)  # [B, L, D]
  mu = z.mean(-1, keepdims=True)
  z = (z - mu) / np.sqrt(((z - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
  z = z * p(m.post_norm.scale) + p(m.post_norm.bias)
  out = np.zeros((B, L, D))
  out[:, order] = dense(m.o_proj, z)
  return out


@pytest.mark.parametrize("inner", ["linear", "mlp"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("layout", [MULTI, GRID], ids=["row", "grid"])
def test_layer_matches_reference(inner, reverse, layout):
  m = make_layer(inner, K=4, base_lr=20.0)  # large lr: the inner steps matter
  # Non-trivial target LayerNorm parameters, so a missing or mis-applied affine shows.
  m.ln_weight[...] = 1.0 + 0.5 * jax.random.normal(jax.random.key(7), m.ln_weight[...].shape)
  m.ln_bias[...] = 0.3 * jax.random.normal(jax.random.key(8), m.ln_bias[...].shape)
  x = make_x(layout, B=1)
  assert layout.seq_len % 4  # exercises the padded last mini-batch
  np.testing.assert_allclose(m(x, layout, reverse=reverse), reference_ttt(m, x, layout, reverse),
                             rtol=1e-5, atol=1e-5)


def test_reference_detects_a_raw_target():
  """The reference is sharp enough to see the defect it guards: feeding the raw v - k."""
  m = make_layer("mlp", K=4, base_lr=20.0)
  x = make_x(MULTI, B=1)
  raw = lambda v, k, w, b: v
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr("ttt_jax.layers.ttt.reconstruction_target", raw)
    err = np.abs(np.asarray(m(x, MULTI)) - reference_ttt(m, x, MULTI, False)).max()
  assert err > 1e-2


def test_reconstruction_target_is_the_releases():
  """v' - k = w * (t - mean) / (std_unbiased + 1e-8) + b with t = v - k, per head; fp32 vs fp64 torch."""
  ks = jax.random.split(jax.random.key(0), 4)
  v = 3.0 * jax.random.normal(ks[0], (2, 5, HEADS, 16)) + 1.0
  k = jax.random.normal(ks[1], (2, 5, HEADS, 16))
  w = 1.0 + 0.5 * jax.random.normal(ks[2], (HEADS, 16))
  b = 0.3 * jax.random.normal(ks[3], (HEADS, 16))
  got = reconstruction_target(v, k, w, b)
  np.testing.assert_allclose(got, release_target(v, k, w, b), rtol=1e-5, atol=1e-5)
  # With w = 1, b = 0: zero mean and unbiased std 1 over the head dim.
  unit = np.asarray(reconstruction_target(v, k, jnp.ones((HEADS, 16)), jnp.zeros((HEADS, 16))) - k)
  np.testing.assert_allclose(unit.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(unit.std(-1, ddof=1), 1.0, rtol=1e-5)
  assert reconstruction_target(v.astype(jnp.bfloat16), k.astype(jnp.bfloat16), w, b).dtype == jnp.bfloat16


def arranged(m, x, layout, reverse=False):
  """The inner loop's q, k, v', eta of layer m on x (all heads)."""
  return m.arrange(*m.project(x), m.ln_weight[...], m.ln_bias[...], layout, reverse)


def test_eta_is_computed_per_token_after_interleave():
  m = make_layer("mlp", K=4)
  x = make_x(MULTI)
  _, _, _, eta = arranged(m, x, MULTI)
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
    eta = arranged(m, x_, layout, reverse)[3]
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


@pytest.mark.parametrize("inner", ["linear", "mlp"])
def test_padding_tokens_do_not_change_real_tokens(inner):
  """A context-parallel mesh pads the sequence: padding gets eta = 0 and sits last in both
  TTT orders, so every real token's output is the unpadded layer's."""
  m = BidirectionalTTT(WIDTH, HEADS, inner=inner, mini_batch_size=4, base_lr=20.0,
                       rngs=nnx.Rngs(0))
  x = make_x(MULTI)
  padded = MULTI.padded(8)  # 21 -> 24 tokens
  junk = 5.0 * jax.random.normal(jax.random.key(3), (x.shape[0], padded.pad, WIDTH))
  got = m(jnp.concatenate([x, junk], axis=1), padded)[:, :MULTI.seq_len]
  np.testing.assert_allclose(got, m(x, MULTI), rtol=1e-5, atol=1e-5)
  eta = arranged(m.ttt, jnp.concatenate([x, junk], axis=1), padded)[3]
  np.testing.assert_array_equal(eta.reshape(*eta.shape[:2], -1)[..., MULTI.seq_len:], 0.0)
