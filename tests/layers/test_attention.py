"""Local attention against a naive full-sequence-mask reference; the attention
implementations (chunked, splash, cudnn) against the dense XLA path."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from ttt_jax import preflight
from ttt_jax.data import pipeline
from ttt_jax.layout import VideoLayout
from ttt_jax.layers import attention as attn
from ttt_jax.layers.attention import local_attention
from ttt_jax.layers.rope import apply_rope, rope_angles
from ttt_jax.models import vae

# text_0 = [0, 1], text_1 = [2]; frames 0, 1 -> tokens [3, 4], [5, 6]; frame 2 -> [7, 8].
LAYOUT = VideoLayout(text_lens=(2, 1), segment_frames=(2, 1), height=1, width=2)
# Window members by hand, with each member's window-local frame index (None: text).
WINDOWS = [
    {0: None, 1: None, 3: 0, 4: 0, 5: 1, 6: 1},
    {2: None, 5: 0, 6: 0, 7: 1, 8: 1},  # frame 1 is the shared boundary frame
]


def reference(q, k, v, layout, windows):
  """Full [L, L] masked softmax per window, local RoPE, mean over windows."""
  B, L, H, d = q.shape
  out, count = jnp.zeros_like(q), np.zeros(L)
  for members in windows:
    pos = np.zeros((L, 3), np.int32)
    for tok, t in members.items():
      if t is not None:
        pos[tok] = (t, *layout.positions[tok, 1:])
    angles = rope_angles(jnp.asarray(pos), d)
    qr, kr = apply_rope(q, angles), apply_rope(k, angles)
    inside = np.zeros(L, bool)
    inside[list(members)] = True
    mask = inside[:, None] & inside[None, :]  # [L, L]
    s = jnp.einsum("bqhd,bkhd->bhqk", qr, kr) / np.sqrt(d)
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", jnp.nan_to_num(p), v)
    out = out + jnp.where(inside[None, :, None, None], o, 0)
    count += inside
  return out / count[None, :, None, None]


def test_windows_match_hand_plan():
  win = LAYOUT.attention_windows
  for w, members in enumerate(WINDOWS):
    got = win.index[w][win.valid[w]]
    assert sorted(got.tolist()) == sorted(members)
    t = {int(tok): int(p[0]) for tok, p in zip(got, win.positions[w][win.valid[w]])}
    assert all(t[tok] == (lt or 0) for tok, lt in members.items())


@pytest.mark.parametrize("layout,windows", [
    (LAYOUT, WINDOWS),  # ragged windows (masked padding)
    (VideoLayout(text_lens=(1, 1), segment_frames=(1, 1), height=1, width=2),
     [{0: None, 2: 0, 3: 0}, {1: None, 2: 0, 3: 0, 4: 1, 5: 1}]),
    (VideoLayout(text_lens=(1, 2), segment_frames=(2, 1), height=1, width=1),
     [{0: None, 3: 0, 4: 1}, {1: None, 2: None, 4: 0, 5: 1}]),  # equal windows: no mask
])
def test_local_attention_matches_full_mask_reference(layout, windows):
  B, H, d = 2, 2, 16
  q, k, v = jax.random.normal(jax.random.key(0), (3, B, layout.seq_len, H, d))
  np.testing.assert_allclose(local_attention(q, k, v, layout), reference(q, k, v, layout, windows),
                             rtol=1e-5, atol=1e-5)


def test_tokens_outside_a_window_do_not_affect_it():
  q, k, v = jax.random.normal(jax.random.key(1), (3, 1, LAYOUT.seq_len, 2, 16))
  out = local_attention(q, k, v, LAYOUT)
  # Token 7 (frame 2) is only in window 1; window 0's text token 0 must not see it.
  out2 = local_attention(q, k.at[:, 7].add(3.0), v.at[:, 7].add(3.0), LAYOUT)
  np.testing.assert_allclose(out[:, :2], out2[:, :2], rtol=1e-6)
  assert float(jnp.abs(out[:, 2] - out2[:, 2]).max()) > 1e-3


# ------------------------------------------------------ implementations ----
# fp32: the same terms summed in another order, rescaled a few times by the online softmax;
# measured <= 7e-7 (max error over max value). A wrong mask or block edge costs O(1).
FP32_TOL = 1e-5
# bf16: the dense path rounds normalised probabilities to bf16 before P @ V, the blocked ones
# round unnormalised tiles and normalise in fp32: a few bf16 ulps (2^-8) apart, measured <= 7e-3.
BF16_TOL = 2e-2
dense = jax.nn.dot_product_attention  # the reference, before any test patches jax.nn


def rel_err(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def make_qkv(B, Tq, Tk, H, d, dtype=jnp.float32, masked=True, seed=0):
  """q [B, Tq, H, d], k, v [B, Tk, H, d], a cotangent like q, and a random key-padding mask
  [B, 1, 1, Tk] (not a prefix) in which batch element 0 has no key at all."""
  ks = jax.random.split(jax.random.key(seed), 5)
  q, k, v, ct = (jax.random.normal(key, (B, T, H, d)).astype(dtype)
                 for key, T in zip(ks, (Tq, Tk, Tk, Tq)))
  valid = jax.random.bernoulli(ks[4], 0.6, (B, Tk)).at[0].set(False)
  return q, k, v, ct, valid[:, None, None, :] if masked else None


def assert_matches_dense(fn, q, k, v, ct, mask, tol):
  """fn(q, k, v, mask) and its q/k/v gradients against the dense path; returns the errors."""
  def both(q, k, v, ct):
    return [(out, vjp(ct)) for out, vjp in (jax.vjp(lambda *a: dense(*a, mask=mask), q, k, v),
                                            jax.vjp(lambda *a: fn(*a, mask), q, k, v))]
  (want, want_grads), (got, got_grads) = jax.jit(both)(q, k, v, ct)
  assert got.dtype == want.dtype and got.shape == want.shape
  errors = {"out": rel_err(got, want)}
  errors.update({f"d{name}": rel_err(g, w) for name, g, w in zip("qkv", got_grads, want_grads)})
  assert max(errors.values()) < tol, errors
  return errors


@pytest.mark.parametrize("shape,blocks,masked", [
    ((2, 37, 37, 2, 16), (8, 16), False),  # ragged: 37 = 4 x 8 + 5 queries, 2 x 16 + 5 keys
    ((2, 37, 37, 2, 16), (8, 16), True),  # + key padding; element 0 attends nothing
    ((2, 64, 64, 2, 8), (16, 32), True),  # whole blocks
    ((2, 20, 45, 3, 16), (7, 10), True),  # Tq != Tk, neither a multiple of its block
    ((2, 50, 50, 1, 16), (512, 1024), True),  # default tiles: one block each way
])
def test_chunked_matches_dense_values_and_gradients(shape, blocks, masked):
  block_q, block_k = blocks
  chunked = lambda q, k, v, mask: attn.attention(q, k, v, mask, impl="chunked",
                                                 block_q=block_q, block_k=block_k)
  assert_matches_dense(chunked, *make_qkv(*shape, masked=masked), FP32_TOL)


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_matches_dense_in_bfloat16(masked):
  chunked = lambda q, k, v, mask: attn.attention(q, k, v, mask, impl="chunked", block_q=8,
                                                 block_k=16)
  assert_matches_dense(chunked, *make_qkv(2, 37, 37, 2, 16, jnp.bfloat16, masked), BF16_TOL)


def test_rows_with_no_key_get_the_dense_value_and_finite_gradients():
  """All logits MASK_VALUE: a uniform softmax over the real keys (block padding excluded),
  no logit gradient; dv gets its share."""
  q, k, v, ct, mask = make_qkv(2, 37, 37, 2, 16)
  out = attn.attention(q, k, v, mask, impl="chunked", block_q=8, block_k=16)
  np.testing.assert_allclose(out[0], jnp.broadcast_to(v[0].mean(0), out[0].shape), rtol=1e-5,
                             atol=1e-6)
  grads = jax.grad(lambda *a: jnp.sum(attn.attention(*a, mask, impl="chunked", block_q=8,
                                                     block_k=16) * ct), argnums=(0, 1, 2))(q, k, v)
  assert all(bool(jnp.isfinite(g).all()) for g in grads)
  assert float(jnp.abs(grads[0][0]).max()) == 0 and float(jnp.abs(grads[1][0]).max()) == 0


def test_local_attention_chunked_equals_dense_on_multi_block_windows():
  """Two ragged windows of 1544 and 1160 tokens: 4 query and 2 key tiles of the default
  sizes, both ragged, with the key-padding mask of the shorter window."""
  layout = VideoLayout(text_lens=(8, 8), segment_frames=(4, 2), height=16, width=24)
  assert layout.attention_windows.index.shape == (2, 1544)
  q, k, v = jax.random.normal(jax.random.key(2), (3, 1, layout.seq_len, 2, 16))
  run = jax.jit(lambda q, k, v, impl: local_attention(q, k, v, layout, impl=impl),
                static_argnums=3)
  want = run(q, k, v, "xla")
  assert rel_err(run(q, k, v, "chunked"), want) < FP32_TOL
  np.testing.assert_array_equal(run(q, k, v, "auto"), want)  # 1544 <= DENSE_MAX_LEN: dense


@pytest.mark.parametrize("backend,dtype,head_dim,kv_len,want", [
    ("cpu", jnp.float32, 16, 330, "xla"),  # the tiny preset: small windows stay dense
    ("cpu", jnp.float32, 64, attn.DENSE_MAX_LEN, "xla"),
    ("cpu", jnp.bfloat16, 64, attn.DENSE_MAX_LEN + 1, "chunked"),
    ("gpu", jnp.bfloat16, 64, 17776, "cudnn"),  # paper size
    ("gpu", jnp.float16, 128, 100, "cudnn"),
    ("gpu", jnp.float32, 64, 17776, "chunked"),  # cuDNN has no fp32
    ("gpu", jnp.float32, 64, 100, "xla"),
    ("gpu", jnp.bfloat16, 12, 17776, "chunked"),  # head dim not a multiple of 8
    ("tpu", jnp.float32, 16, 100, "splash"),
    ("tpu", jnp.bfloat16, 64, 17776, "splash"),
])
def test_auto_picks_by_backend_dtype_and_length(monkeypatch, backend, dtype, head_dim, kv_len,
                                                want):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert attn.resolve_impl("auto", dtype, head_dim, kv_len) == want


def test_auto_on_small_windows_is_the_dense_path_exactly():
  q, k, v, _, mask = make_qkv(2, 37, 37, 2, 16)
  np.testing.assert_array_equal(attn.attention(q, k, v, mask), dense(q, k, v, mask=mask))


def test_bad_impls_are_named(monkeypatch):
  q, k, v, _, mask = make_qkv(1, 8, 8, 1, 16)
  with pytest.raises(ValueError, match=r"impl 'flash' is unknown; choose from \('auto', 'xla', "
                                       r"'chunked', 'cudnn', 'splash'\)"):
    attn.attention(q, k, v, impl="flash")
  with pytest.raises(ValueError, match="impl 'flash' is unknown"):
    attn.LocalSelfAttention(32, 2, impl="flash", rngs=nnx.Rngs(0))  # at build, not at trace
  with pytest.raises(ValueError, match="'cudnn' runs on gpu only and the default backend is 'cpu'"):
    attn.attention(q, k, v, impl="cudnn")
  with pytest.raises(ValueError, match="'splash' runs on tpu only and the default backend is 'cpu'"):
    attn.attention(q, k, v, impl="splash")
  with pytest.raises(ValueError, match=r"impl 'chunked' takes a key-padding mask \[B, 1, 1, Tk\] "
                                       r"= \[1, 1, 1, 8\], got mask shape \(1, 1, 8, 8\)"):
    attn.attention(q, k, v, jnp.ones((1, 1, 8, 8), bool), impl="chunked")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with pytest.raises(ValueError, match="'cudnn' takes bfloat16/float16 .* got float32 and head dim 16"):
    attn.attention(q, k, v, impl="cudnn")


@pytest.mark.slow  # ~10 s on 2 cores: the interpreted kernels' forward and two backward passes
@pytest.mark.parametrize("shape,masked", [
    ((2, 100, 200, 2, 64), True),  # padded to whole 128-tiles (100 -> 128, 200 -> 256)
    ((1, 256, 256, 1, 32), False),  # whole tiles, no mask: no segment ids at all
])
def test_splash_wrapper_matches_dense_in_interpret_mode(shape, masked):
  """The real splash kernel, interpreted on CPU: masked and padding keys as segment 1, q
  pre-scaled, an element with no key to attend."""
  splash = lambda q, k, v, mask: attn.splash_attention(
      q, k, v, attn.key_padding(mask, q.shape[0], k.shape[1], "splash"), block_q=128,
      block_k=128, interpret=True)
  assert_matches_dense(splash, *make_qkv(*shape, masked=masked), FP32_TOL)


def test_splash_lowers_for_tpu_at_paper_size(monkeypatch):
  """"auto" on a TPU backend is splash; its forward and both backward kernels lower to Mosaic
  for TPU from this CPU host (jax.export): one 3 s window of CogVideoX-5B (17,776 tokens with
  text, 48 heads of 64, bf16, key-padding mask). Compiling them needs libtpu and a TPU."""
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  L, H, d = 17776, 48, 64
  x = jax.ShapeDtypeStruct((1, L, H, d), jnp.bfloat16)
  mask = jax.ShapeDtypeStruct((1, 1, 1, L), jnp.bool_)
  loss = lambda q, k, v, m: jnp.sum(attn.attention(q, k, v, m).astype(jnp.float32))
  exported = jax.export.export(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), platforms=["tpu"])(
      x, x, x, mask)
  kernels = set(re.findall(r'kernel_name = "([^"]+)"', exported.mlir_module()))
  assert kernels == {"splash_mha_fwd_segmented_residuals", "splash_mha_dq_segmented_no_residuals",
                     "splash_mha_dkv_segmented_no_residuals"}
  assert [o.shape for o in exported.out_avals] == [(1, L, H, d)] * 3


def test_cudnn_wrapper_reorders_keys_and_counts_them(monkeypatch):
  """cuDNN itself needs a GPU; its wrapper's key-padding-to-lengths logic (valid keys moved
  first, counted; rows with no key fixed up) runs here on jax's dense kernel, which honours
  key_value_seq_lengths the same way."""
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, implementation=None, **kw: dense(*a, implementation="xla", **kw))
  cudnn = lambda q, k, v, mask: attn.cudnn_attention(
      q, k, v, attn.key_padding(mask, q.shape[0], k.shape[1], "cudnn"))
  assert_matches_dense(cudnn, *make_qkv(2, 20, 45, 3, 16), FP32_TOL)


def test_chunked_compiles_to_a_fraction_of_the_dense_memory():
  """One 16,384-token window, 4 heads of 64, fp32, compiled only: the dense path's temporaries
  hold the [H, L, L] scores (4 GiB) and more; chunked holds a few tiles and [L, H, d] arrays."""
  L, H, d = 16384, 4, 64
  x = jax.ShapeDtypeStruct((1, L, H, d), jnp.float32)
  temp = {}
  for impl in ("xla", "chunked"):
    fwd = lambda q, k, v: attn.attention(q, k, v, impl=impl)
    fwd_bwd = jax.grad(lambda *a: jnp.sum(fwd(*a)), argnums=(0, 1, 2))
    for name, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
      compiled = jax.jit(fn).lower(x, x, x).compile()
      temp[impl, name] = compiled.memory_analysis().temp_size_in_bytes
  scores = H * L * L * 4
  for name in ("fwd", "fwd_bwd"):
    assert temp["xla", name] >= scores, temp
    assert temp["chunked", name] < 256 * 2**20, temp  # measured 66 MiB and 119 MiB
  assert temp["chunked", "fwd_bwd"] < temp["xla", "fwd_bwd"] / 64, temp


def test_preflight_counts_dense_scores_only_for_the_dense_path():
  """The paper preset's 3 s stage (one window of 458 text + 13 x 1350 frame tokens, 48 heads):
  chunked swaps the fp32 [Lw, Lw] scores of each example on the device for one tile."""
  cfg = common.get_config(3, "paper")
  layout = pipeline.video_layout(cfg.data, 3, vae.CODECS[cfg.data.codec], 2)
  assert layout.attention_windows.index.shape == (1, 18008)
  est = {}
  for impl in ("xla", "chunked", "auto"):
    cfg.model.attention_impl = impl
    est[impl] = preflight.estimate_memory(cfg, "train", dict(data=1, fsdp=1, context=1, tensor=1))
  assert est["auto"] == est["chunked"]  # this CPU host, a long window
  Lw, heads = 18008, 48
  per_device = cfg.train.batch_size // cfg.train.microbatches  # examples live at once
  saved = per_device * heads * (Lw * Lw - attn.BLOCK_Q * attn.BLOCK_K) * 4
  assert est["xla"].activations - est["chunked"].activations == pytest.approx(saved)
  assert est["xla"].params == est["chunked"].params
