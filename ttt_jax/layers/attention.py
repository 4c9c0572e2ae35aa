"""Local (per-segment) self-attention of the video DiT.

Each 3-second segment attends over [its caption; its frames (+ the boundary
frame it shares with the previous segment)] with RoPE positions local to
that window, exactly the clip CogVideoX was pre-trained on: on each window
this computes what CogVideoX's attention computes on that window's tokens
alone (time from 0 in the window, h and w from CogVideoX's crop-region grid
for the model's pre-training size, captions not rotated); TTT carries
information between segments. Windows are gathered with a static index plan
(`VideoLayout.attention_windows`) and batched, so the cost is S windows of
Lw tokens and no full-sequence mask is ever built. A token in two windows
(the boundary frame) gets the mean of its two outputs.

`attention(..., impl=)` runs softmax attention one of four ways, equal to
round-off (see tests/layers/test_attention.py for the tolerances):
  "xla"      `jax.nn.dot_product_attention`'s dense XLA path, the reference:
             it materialises fp32 scores [Lw, Lw] per window and head (~62 GB
             per video at paper size);
  "chunked"  flash attention in jnp/lax (any backend): query blocks, a scan
             over key blocks with an online softmax, and a custom VJP that
             recomputes block scores from the saved logsumexp, so forward and
             backward hold one [block_q, block_k] tile per window and head;
  "cudnn"    cuDNN flash attention (GPU; bf16/fp16);
  "splash"   the Pallas TPU splash attention kernel (TPU).
"auto" picks splash on TPU, cudnn on GPU where it supports the dtype and
head size, else chunked above DENSE_MAX_LEN keys and the dense path below.
Only "xla" takes a general mask; the others take the key-padding mask
[B, 1, 1, Tk] of ragged windows. A row with no key to attend gets what the
dense path gives it: all its logits are MASK_VALUE, a uniform softmax, so the
mean of v.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from ttt_jax.layout import VideoLayout
from ttt_jax.parallel.context import heads_parallel
from ttt_jax.parallel.sharding import constrain
from ttt_jax.layers.linear import dense, layer_norm
from ttt_jax.layers.rope import apply_rope, crop_region_grid, rope_angles

Array = jax.Array

IMPLS = ("auto", "xla", "chunked", "cudnn", "splash")
NATIVE = {"cudnn": "gpu", "splash": "tpu"}  # impl -> the jax.default_backend() it runs on
DENSE_MAX_LEN = 2048  # "auto" keeps the dense path up to this many keys (16 MiB of scores a head)
BLOCK_Q, BLOCK_K = 512, 1024  # query / key tile of chunked and splash: a 2 MiB fp32 tile a head
LANES = 128  # splash tiles are whole 128-lane vector registers
# The masked logit of jax's dense path and of splash: finite, so a row with nothing to
# attend stays finite (uniform) instead of 0 / 0.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def cudnn_supports(dtype: Any, head_dim: int) -> bool:
  """Whether cuDNN flash attention takes this dtype and head size (head dim <= 128 on every
  architecture; Hopper allows 256, not relied on)."""
  return jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128


def check_impl(impl: str, dtype: Any, head_dim: int) -> None:
  """ValueError unless `impl` is known and can run on jax.default_backend() at this dtype."""
  if impl not in IMPLS:
    raise ValueError(f"attention impl {impl!r} is unknown; choose from {IMPLS}")
  backend = jax.default_backend()
  if impl in NATIVE and backend != NATIVE[impl]:
    raise ValueError(f"attention impl {impl!r} runs on {NATIVE[impl]} only and the default "
                     f"backend is {backend!r}; use 'chunked' (any backend) or 'auto'")
  if impl == "cudnn" and not cudnn_supports(dtype, head_dim):
    raise ValueError(f"attention impl 'cudnn' takes bfloat16/float16 with a head dim that is a "
                     f"multiple of 8 up to 128, got {jnp.dtype(dtype).name} and head dim "
                     f"{head_dim}; use 'chunked' or 'auto'")


def resolve_impl(impl: str, dtype: Any, head_dim: int, kv_len: int) -> str:
  """The implementation `attention` runs for `impl` (decided by jax.default_backend())."""
  check_impl(impl, dtype, head_dim)
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  if backend == "tpu":
    return "splash"
  if backend == "gpu" and cudnn_supports(dtype, head_dim):
    return "cudnn"
  return "chunked" if kv_len > DENSE_MAX_LEN else "xla"


def score_bytes(impl: str, windows: int, heads: int, q_len: int, kv_len: int) -> int:
  """Device bytes of attention scores live at once, for a resolved impl (an estimate):
  the dense path holds fp32 [q_len, kv_len] per window and head, chunked one fp32 tile,
  the fused kernels keep their tiles on chip and write only a fp32 logsumexp per query."""
  if impl == "xla":
    return windows * heads * q_len * kv_len * 4
  if impl == "chunked":
    return windows * heads * min(BLOCK_Q, q_len) * min(BLOCK_K, kv_len) * 4
  return windows * heads * q_len * 4


def attention(q: Array, k: Array, v: Array, mask: Array | None = None, *, impl: str = "auto",
              block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> Array:
  """Softmax attention, q [B, Tq, H, d], k/v [B, Tk, H, d] -> [B, Tq, H, d].

  The one attention function of the model. mask: bool, True = attend; for
  every impl but "xla" a key-padding mask [B, 1, 1, Tk] (a leading 1
  broadcasts). block_q / block_k: the tiles of "chunked" and "splash" (which
  rounds them up to 128).
  """
  impl = resolve_impl(impl, q.dtype, q.shape[-1], k.shape[1])
  if impl == "xla":
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
  valid = key_padding(mask, q.shape[0], k.shape[1], impl)
  if impl == "chunked":
    return chunked_attention(q, k, v, valid, block_q=block_q, block_k=block_k)
  if impl == "cudnn":
    return cudnn_attention(q, k, v, valid)
  return splash_attention(q, k, v, valid, block_q=block_q, block_k=block_k)


def key_padding(mask: Array | None, batch: int, kv_len: int, impl: str) -> Array | None:
  """A key-padding mask [B|1, 1, 1, Tk|1] -> the keys to attend [B, Tk]; None stays None."""
  if mask is None:
    return None
  if not (mask.ndim == 4 and mask.shape[1:3] == (1, 1) and mask.shape[0] in (1, batch)
          and mask.shape[3] in (1, kv_len)):
    raise ValueError(f"attention impl {impl!r} takes a key-padding mask [B, 1, 1, Tk] = "
                     f"[{batch}, 1, 1, {kv_len}], got mask shape {tuple(mask.shape)}; "
                     f"use impl='xla' for other masks")
  return jnp.broadcast_to(mask[:, 0, 0].astype(bool), (batch, kv_len))


def fully_masked_as_dense(out: Array, v: Array, valid: Array) -> Array:
  """Rows of a batch element with no key to attend -> the mean of v, as the dense path gives
  (the fused kernels would average over their padding keys too, or divide by 0)."""
  empty = ~valid.any(axis=1)[:, None, None, None]  # [B, 1, 1, 1]
  return jnp.where(empty, v.mean(axis=1, keepdims=True, dtype=jnp.float32).astype(out.dtype), out)


# ------------------------------------------------------------- chunked ----
def _split(x: Array, block: int) -> Array:
  """[B, T, ...] -> [n, B, block, ...]: zero-padded to n = ceil(T / block) whole blocks."""
  B, T = x.shape[:2]
  n = -(-T // block)
  x = jnp.pad(x, [(0, 0), (0, n * block - T)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(B, n, block, *x.shape[2:]), 1, 0)


def _merge(x: Array, T: int) -> Array:
  """Inverse of `_split`: [n, B, block, ...] -> [B, T, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :T]


def _key_blocks(k: Array, v: Array, valid: Array, block_k: int) -> tuple[Array, ...]:
  """The scanned key side: k, v [nk, B, bk, H, d], valid [nk, B, bk], fill [nk, bk].

  fill is the logit of a key not attended: MASK_VALUE for a masked key (as
  the dense path), -inf for block padding, which must not count even in a row
  with nothing to attend (the first block always holds a real key, so the
  running max is finite and exp(-inf - max) = 0).
  """
  Tk = k.shape[1]
  real = _split(jnp.ones((1, Tk), bool), block_k)[:, 0]  # [nk, bk]
  fill = jnp.where(real, MASK_VALUE, -jnp.inf).astype(jnp.float32)
  return _split(k, block_k), _split(v, block_k), _split(valid, block_k), fill


def _block_logits(qb: Array, kb: Array, valid_b: Array, fill_b: Array) -> Array:
  """Scaled, masked fp32 logits [B, H, bq, bk] of q [B, bq, H, d] and k [B, bk, H, d]."""
  s = jnp.einsum("bqhd,bkhd->bhqk", qb, kb, preferred_element_type=jnp.float32)
  s = s * (1.0 / math.sqrt(qb.shape[-1]))
  # Tied to s: the mask's broadcast to [B, H, bq, bk] depends on nothing differentiated,
  # so under remat JAX would compute it for every key block up front and keep it
  # (a [n_k, B, H, bq, bk] residual, 12 GB a device at paper scale).
  valid_b, fill_b, s = lax.optimization_barrier((valid_b, fill_b, s))
  return jnp.where(valid_b[:, None, None, :], s, fill_b[None, None, None, :])


def chunked_attention(q: Array, k: Array, v: Array, valid: Array | None = None, *,
                      block_q: int = BLOCK_Q, block_k: int = BLOCK_K) -> Array:
  """Flash attention in XLA: q [B, Tq, H, d], k/v [B, Tk, H, d], valid [B, Tk] -> [B, Tq, H, d].

  Tiles are min(block, length); ragged ends are zero-padded and masked.
  """
  if valid is None:
    valid = jnp.ones(k.shape[:2], bool)
  return _flash(min(block_q, q.shape[1]), min(block_k, k.shape[1]), q, k, v, valid)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(block_q: int, block_k: int, q: Array, k: Array, v: Array, valid: Array) -> Array:
  return _flash_fwd(block_q, block_k, q, k, v, valid)[0]


def _flash_fwd(block_q: int, block_k: int, q: Array, k: Array, v: Array, valid: Array
               ) -> tuple[Array, tuple[Array, ...]]:
  B, Tq, H, d = q.shape
  f32 = jnp.float32
  keys = _key_blocks(k, v, valid, block_k)

  def query_block(qb: Array) -> tuple[Array, Array, Array]:
    """qb [B, bq, H, d] -> out [B, bq, H, d], row max and log denominator [B, H, bq]."""

    def key_block(carry, xs):
      m, l, acc = carry  # running max, denominator [B, H, bq]; numerator [B, H, bq, d]
      kb, vb, valid_b, fill_b = xs
      s = _block_logits(qb, kb, valid_b, fill_b)
      m_new = jnp.maximum(m, s.max(axis=-1))
      p = jnp.exp(s - m_new[..., None])
      rescale = jnp.exp(m - m_new)
      pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(vb.dtype), vb, preferred_element_type=f32)
      return (m_new, l * rescale + p.sum(axis=-1), acc * rescale[..., None] + pv), None

    init = (jnp.full((B, H, block_q), -jnp.inf, f32), jnp.zeros((B, H, block_q), f32),
            jnp.zeros((B, H, block_q, d), f32))
    (m, l, acc), _ = lax.scan(key_block, init, keys)
    return (acc / l[..., None]).transpose(0, 2, 1, 3).astype(q.dtype), m, jnp.log(l)

  # The logsumexp is kept as (max, log denominator): m + log l would round to m in a row with
  # nothing to attend (m = MASK_VALUE ~ -2.4e38), which then recomputes p = 1, not 1 / Tk.
  out, m, log_l = lax.map(query_block, _split(q, block_q))  # [nq, B, bq, H, d], 2 x [nq, B, H, bq]
  out = _merge(out, Tq)
  return out, (q, k, v, valid, out, m, log_l)


def _flash_bwd(block_q: int, block_k: int, res: tuple[Array, ...], dout: Array
               ) -> tuple[Array, Array, Array, None]:
  """FlashAttention-2's backward: one pass over key blocks, each over all query blocks,
  probabilities recomputed from the logsumexp; dq [nq, B, bq, H, d] is the carry."""
  q, k, v, valid, out, m, log_l = res
  f32 = jnp.float32
  q_blocks, do_blocks = _split(q, block_q), _split(dout, block_q)  # [nq, B, bq, H, d]
  delta = jnp.einsum("nbqhd,nbqhd->nbhq", do_blocks.astype(f32),
                     _split(out, block_q).astype(f32))  # rowsum(dO * O) [nq, B, H, bq]
  scale = 1.0 / math.sqrt(q.shape[-1])

  def key_block(dq, xs):
    kb, vb, valid_b, fill_b = xs

    def query_block(carry, ys):
      dk, dv = carry  # [B, bk, H, d] fp32
      qb, dob, m_b, log_l_b, delta_b, dq_b = ys
      s = _block_logits(qb, kb, valid_b, fill_b)
      p = jnp.exp(s - m_b[..., None] - log_l_b[..., None])  # [B, H, bq, bk]
      dv = dv + jnp.einsum("bhqk,bqhd->bkhd", p.astype(dob.dtype), dob, preferred_element_type=f32)
      dp = jnp.einsum("bqhd,bkhd->bhqk", dob, vb, preferred_element_type=f32)
      # Masked keys get no logit gradient (a row with nothing to attend has p > 0 on them).
      ds = jnp.where(valid_b[:, None, None, :], p * (dp - delta_b[..., None]), 0.0) * scale
      dq_b = dq_b + jnp.einsum("bhqk,bkhd->bqhd", ds.astype(kb.dtype), kb,
                               preferred_element_type=f32)
      dk = dk + jnp.einsum("bhqk,bqhd->bkhd", ds.astype(qb.dtype), qb, preferred_element_type=f32)
      return (dk, dv), dq_b

    zeros = jnp.zeros(kb.shape, f32)
    (dk, dv), dq = lax.scan(query_block, (zeros, zeros),
                            (q_blocks, do_blocks, m, log_l, delta, dq))
    return dq, (dk, dv)

  dq, (dk, dv) = lax.scan(key_block, jnp.zeros(q_blocks.shape, f32),
                          _key_blocks(k, v, valid, block_k))
  return (_merge(dq, q.shape[1]).astype(q.dtype), _merge(dk, k.shape[1]).astype(k.dtype),
          _merge(dv, k.shape[1]).astype(v.dtype), None)


# optimize_remat: under jax.checkpoint (the block remat) JAX would otherwise linearize the
# forward's key-block scan and stack its per-tile residuals, [n_k, B, H, bq, bk] per query
# block (9.5 GB a device at paper scale), instead of using this rule's residuals.
_flash.defvjp(_flash_fwd, _flash_bwd, optimize_remat=True)


# ------------------------------------------------------- fused kernels ----
def cudnn_attention(q: Array, k: Array, v: Array, valid: Array | None = None) -> Array:
  """cuDNN flash attention (GPU), q [B, Tq, H, d], k/v [B, Tk, H, d], valid [B, Tk]."""
  if valid is None:
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  # cuDNN masks padding by length only: move each row's attended keys first (attention
  # without a causal mask does not depend on key order) and count them.
  order = jnp.argsort((~valid).astype(jnp.int32), axis=1, stable=True)  # [B, Tk]
  first = lambda x: jnp.take_along_axis(x, order[:, :, None, None], axis=1)
  lengths = jnp.maximum(valid.sum(axis=1), 1).astype(jnp.int32)  # >= 1: finite empty rows
  out = jax.nn.dot_product_attention(q, first(k), first(v), key_value_seq_lengths=lengths,
                                     implementation="cudnn")
  return fully_masked_as_dense(out, v, valid)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def splash_attention(q: Array, k: Array, v: Array, valid: Array | None = None, *,
                     block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
                     interpret: bool = False) -> Array:
  """Pallas TPU splash attention, q [B, Tq, H, d], k/v [B, Tk, H, d], valid [B, Tk].

  Splash takes [H, T, d] per example (vmapped over B), lengths that are
  whole tiles (zero-padded here) and unscaled logits (q is scaled here).
  Masked and padding keys get segment id 1, everything else 0, so every
  query (padding queries too) attends exactly the keys `valid` names.
  interpret: run the kernel in Pallas interpret mode (e.g. on CPU in tests).
  """
  B, Tq, H, d = q.shape
  Tk = k.shape[1]
  bq = min(_round_up(block_q, LANES), _round_up(Tq, LANES))
  bk = min(_round_up(block_k, LANES), _round_up(Tk, LANES))
  Tq_pad, Tk_pad = _round_up(Tq, bq), _round_up(Tk, bk)
  heads_major = lambda x, T: jnp.pad(x, ((0, 0), (0, T - x.shape[1]), (0, 0), (0, 0))
                                     ).transpose(0, 2, 1, 3)  # [B, H, T, d]
  segment_ids = None
  if valid is not None or Tk_pad > Tk:
    keys = jnp.ones((B, Tk), bool) if valid is None else valid
    kv_ids = jnp.pad(~keys, ((0, 0), (0, Tk_pad - Tk)), constant_values=True)  # [B, Tk_pad]
    segment_ids = splash.SegmentIds(q=jnp.zeros((B, Tq_pad), jnp.int32),
                                    kv=kv_ids.astype(jnp.int32))
  blocks = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                             block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                             block_kv_dq=bk)
  kernel = splash.make_splash_mha(splash.MultiHeadMask([splash.FullMask((Tq_pad, Tk_pad))] * H),
                                  block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
  scaled = (q * (1.0 / math.sqrt(d))).astype(q.dtype)
  out = jax.vmap(kernel)(heads_major(scaled, Tq_pad), heads_major(k, Tk_pad),
                         heads_major(v, Tk_pad), segment_ids)  # [B, H, Tq_pad, d]
  out = out.transpose(0, 2, 1, 3)[:, :Tq]
  return out if valid is None else fully_masked_as_dense(out, v, valid)


# ---------------------------------------------------- local attention ----
def window_rope_angles(layout: VideoLayout, head_dim: int, rope_theta: float = 10000.0,
                       rope_base_grid: tuple[int, int] | None = None) -> Array:
  """RoPE angles [S*Lw, d/2] of every window slot; zero (no rotation) on captions and padding.

  Time is local to the window; h and w are `crop_region_grid` positions of
  the layout's token grid in `rope_base_grid` (None: the layout's own grid,
  i.e. integer positions).
  """
  win = layout.attention_windows
  grid = (layout.height, layout.width)
  h_pos, w_pos = crop_region_grid(grid, rope_base_grid or grid)
  t, h, w = (win.positions[..., i].reshape(-1) for i in range(3))
  positions = np.stack([t.astype(np.float32), h_pos[h], w_pos[w]], axis=-1)  # [S*Lw, 3]
  rotated = (layout.is_video[win.index] & win.valid).reshape(-1, 1)
  return rope_angles(jnp.asarray(positions), head_dim, rope_theta) * jnp.asarray(rotated)


def local_attention(q: Array, k: Array, v: Array, layout: VideoLayout,
                    rope_theta: float = 10000.0,
                    rope_base_grid: tuple[int, int] | None = None, *,
                    impl: str = "auto") -> Array:
  """q, k, v [B, L, H, d] in canonical order -> [B, L, H, d]; impl: see `attention`."""
  B, L, H, d = q.shape
  win = layout.attention_windows
  S, Lw = win.index.shape
  flat_index = win.index.reshape(-1)  # [S*Lw]
  angles = window_rope_angles(layout, d, rope_theta, rope_base_grid)  # [S*Lw, d/2]
  gather = lambda t: t[:, flat_index]  # [B, S*Lw, H, d]
  windows = lambda t: t.reshape(B * S, Lw, H, d)
  qw = windows(apply_rope(gather(q), angles))
  kw = windows(apply_rope(gather(k), angles))
  vw = windows(gather(v))
  mask = None
  if not win.valid.all():  # ragged windows: mask the padding keys of each window
    mask = jnp.broadcast_to(jnp.asarray(win.valid)[None], (B, S, Lw)).reshape(B * S, 1, 1, Lw)
  out = attention(qw, kw, vw, mask, impl=impl).reshape(B, S * Lw, H, d)
  out = out * jnp.asarray(win.weight.reshape(-1), out.dtype)[None, :, None, None]
  return jnp.zeros_like(q).at[:, flat_index].add(out)


class LocalSelfAttention(nnx.Module):
  """q/k/v projections with bias, QK LayerNorm per head, local attention, output projection.

  rope_base_grid: the token grid of the resolution the weights were
  pre-trained at (CogVideoX: sample_height / patch x sample_width / patch),
  which sets the RoPE positions at every other resolution; None: the input's
  own grid. impl: the `attention` implementation (checked here, resolved per
  call from the window length).
  """

  def __init__(self, width: int, num_heads: int, *, qk_norm_eps: float = 1e-6,
               rope_theta: float = 10000.0, rope_base_grid: tuple[int, int] | None = None,
               impl: str = "auto", dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    if width % num_heads:
      raise ValueError(f"attention width {width} is not divisible by num_heads {num_heads}")
    self.num_heads, self.head_dim, self.rope_theta = num_heads, width // num_heads, rope_theta
    check_impl(impl, dtype, self.head_dim)
    self.impl = impl
    self.rope_base_grid = None if rope_base_grid is None else tuple(rope_base_grid)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.to_q, self.to_k, self.to_v = (dense(width, width, ("embed", "heads"), **kw)
                                       for _ in range(3))
    self.to_out = dense(width, width, ("heads", "embed"), **kw)
    norm = lambda: layer_norm(self.head_dim, qk_norm_eps, "kv", **kw)
    self.norm_q, self.norm_k = norm(), norm()

  def __call__(self, x: Array, layout: VideoLayout) -> Array:
    """x [B, L, D] canonical (sequence-sharded under context parallelism) -> [B, L, D]."""
    B, L, D = x.shape
    heads = lambda proj: constrain(proj(x).reshape(B, L, self.num_heads, self.head_dim),
                                   "act_batch", "act_length", "act_heads", "act_kv")
    q = self.norm_q(heads(self.to_q))
    k = self.norm_k(heads(self.to_k))
    attend = functools.partial(local_attention, layout=layout, rope_theta=self.rope_theta,
                               rope_base_grid=self.rope_base_grid, impl=self.impl)
    out = heads_parallel(attend, (q, k, heads(self.to_v)))  # whole windows on each device
    return self.to_out(out.reshape(B, L, D))
