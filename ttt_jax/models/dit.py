"""CogVideoX-style video diffusion transformer with bidirectional TTT layers.

    latents [B, T, h, w, 16] --2x2 patchify--> video tokens     \\   (patch = Conv2d layout)
    captions [B, Lt, text_dim] --linear-----> text tokens       -> [B, L, D]
    timestep --sinusoid -> MLP--> emb [B, E]
    for every block (stacked params, `nnx.scan` over depth, remat policy):
      h, g = adaLN(x, emb)           separate shift/scale/gate for text and video
      a    = local attention(h)      per segment, QK-LayerNorm, local 3D RoPE
      a    = bidirectional TTT(a)    global over the whole video (gated residuals; or a
                                     baseline in its place, `ttt_jax.layers.sequence`)
      x    = x + g * a
      h, g = adaLN(x, emb);  x = x + g * MLP(h)     (GELU-tanh, 4x)
    final LayerNorm + adaLN + linear -> unpatchify -> v prediction [B, T, h, w, 16]

With `sequence_layer="local"` and one segment this is diffusers'
`CogVideoXTransformer3DModel` (CogVideoX 1.0, RoPE) parameter for parameter
and, to fp32 round-off, output for output; `ttt_jax.convert` loads its
weights. Hyper-parameters come from `VARIANTS` (paper scale: CogVideoX-5B)
overridden by config; see `VideoDiT.from_config`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from ttt_jax.layout import VideoLayout
from ttt_jax.layers.attention import LocalSelfAttention
from ttt_jax.layers.sequence import make_sequence_layer
from ttt_jax.parallel.context import context_size
from ttt_jax.layers.linear import dense, layer_norm
from ttt_jax.parallel.sharding import constrain

Array = jax.Array

VARIANTS: dict[str, dict[str, Any]] = {
    # CogVideoX-5B: hidden 3072, 42 layers, 48 heads of 64, T5-XXL text, 512-d time embedding.
    # sample_size: its pre-training latent size (480x720 pixels / 8), which sets RoPE positions.
    "cogvideox-5b": dict(width=3072, depth=42, num_heads=48, text_dim=4096, time_embed_dim=512,
                         sample_size=(60, 90)),
    # A few-minute CPU model with the same structure (head dim 16: the smallest for 3D RoPE),
    # "pre-trained" at the tiny preset's 64x96 pixels.
    "tiny": dict(width=64, depth=2, num_heads=4, text_dim=32, time_embed_dim=64,
                 sample_size=(8, 12)),
    # 8 heads of 16, twice as wide and deep as tiny (the first evaluation's base).
    # After 3000 steps on 3 s toy cartoons tiny's training loss is 0.51 and its samples are
    # colour noise; this size reaches 0.31 (0.24 at 6000) and draws the backdrops and
    # characters, at 0.33 s a step against tiny's 0.2-0.3 on the 2-core CPU (RESULTS.md).
    "small": dict(width=128, depth=4, num_heads=8, text_dim=32, time_embed_dim=128,
                  sample_size=(8, 12)),
}

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def timestep_sinusoid(t: Array, dim: int, max_period: float = 10000.0) -> Array:
  """t [B] -> [B, dim]: [cos, sin] of t at frequencies max_period^(-i / (dim/2)).

  diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`,
  CogVideoX's time projection.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class AdaLNZero(nnx.Module):
  """LayerNorm modulated by the timestep: shift/scale/gate, text and video apart.

  The modulation projection is zero-initialised (adaLN-Zero), so a freshly
  made block is the identity until training moves its gates.
  """

  def __init__(self, time_dim: int, width: int, *, eps: float, dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    self.linear = dense(time_dim, 6 * width, ("in_features", "embed"), zero=True, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs)
    self.norm = layer_norm(width, eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: Array, emb: Array, is_video: Array) -> tuple[Array, Array]:
    """x [B, L, D], emb [B, E], is_video [L] -> (modulated x, gate) each [B, L, D]."""
    mods = jnp.split(self.linear(jax.nn.silu(emb)), 6, axis=-1)  # 6 x [B, D]
    pick = lambda video, text: jnp.where(is_video[None, :, None], video[:, None], text[:, None])
    shift, scale, gate = (pick(mods[i], mods[i + 3]) for i in range(3))
    return self.norm(x) * (1 + scale) + shift, gate


class DiTBlock(nnx.Module):
  """adaLN -> local attention -> bidirectional TTT -> gated residual -> adaLN -> MLP.

  `ttt` is the global sequence slot: TTT, a baseline, or None ("local").
  """

  def __init__(self, width: int, num_heads: int, time_dim: int, *, mlp_ratio: int,
               sequence_layer: str, sequence_options: Mapping[str, Any], norm_eps: float,
               rope_base_grid: tuple[int, int] | None, attention_impl: str, dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = AdaLNZero(time_dim, width, eps=norm_eps, **kw)
    self.attn = LocalSelfAttention(width, num_heads, rope_base_grid=rope_base_grid,
                                   impl=attention_impl, **kw)
    self.ttt = make_sequence_layer(sequence_layer, width, num_heads, sequence_options, **kw)
    self.norm2 = AdaLNZero(time_dim, width, eps=norm_eps, **kw)
    self.ff_in = dense(width, mlp_ratio * width, ("embed", "mlp"), **kw)
    self.ff_out = dense(mlp_ratio * width, width, ("mlp", "embed"), **kw)

  def __call__(self, x: Array, emb: Array, layout: VideoLayout) -> Array:
    x = constrain(x, "act_batch", "act_length", "act_embed")  # [B, L, D]
    is_video = jnp.asarray(layout.is_video)
    h, gate = self.norm1(x, emb, is_video)
    a = self.attn(h, layout)
    if self.ttt is not None:
      a = self.ttt(a, layout)
    x = x + gate * a
    h, gate = self.norm2(x, emb, is_video)
    return x + gate * self.ff_out(jax.nn.gelu(self.ff_in(h), approximate=True))


class VideoDiT(nnx.Module):
  """Text-to-video DiT over a multi-scene `VideoLayout`; predicts v."""

  def __init__(self, *, width: int, depth: int, num_heads: int, text_dim: int,
               time_embed_dim: int = 512, latent_channels: int = 16, patch_size: int = 2,
               mlp_ratio: int = 4, sequence_layer: str = "ttt",
               ttt: Mapping[str, Any] | None = None,
               baselines: Mapping[str, Mapping[str, Any]] | None = None,
               scan_layers: bool = True, remat_policy: str = "none", norm_eps: float = 1e-5,
               sample_size: tuple[int, int] | None = None, attention_impl: str = "auto",
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
    """sample_size: the (h, w) latent size the weights were pre-trained at
    (CogVideoX's sample_height/width); it fixes the attention's RoPE grid at
    every resolution. None: each input's own grid (integer positions).
    attention_impl: how local attention is computed (`ttt_jax.layers.attention`);
    no part of the architecture, the weights do not depend on it.
    sequence_layer: what fills the global slot (`ttt_jax.layers.sequence`), built
    from `ttt` (TTT's options) or `baselines[sequence_layer]`."""
    if remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {sorted(REMAT_POLICIES)}, got {remat_policy!r}")
    if sample_size is not None and any(n % patch_size for n in sample_size):
      raise ValueError(f"sample_size {tuple(sample_size)} is not divisible by patch_size {patch_size}")
    # What pretrained weights must agree with (see ttt_jax.convert).
    self.arch = dict(width=width, depth=depth, num_heads=num_heads, text_dim=text_dim,
                     time_embed_dim=time_embed_dim, latent_channels=latent_channels,
                     patch_size=patch_size, mlp_ratio=mlp_ratio, norm_eps=norm_eps,
                     sample_size=None if sample_size is None else tuple(sample_size))
    self.width, self.depth, self.patch_size = width, depth, patch_size
    self.latent_channels, self.text_dim = latent_channels, text_dim
    self.scan_layers, self.remat_policy = scan_layers, remat_policy
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    patch_dim = patch_size * patch_size * latent_channels

    # = Conv2d(k=stride=patch), (C, p, p) features
    self.patch_embed = dense(patch_dim, width, ("in_features", "embed"), **kw)
    self.text_proj = dense(text_dim, width, ("in_features", "embed"), **kw)
    self.time_in = dense(width, time_embed_dim, ("in_features", "in_features"), **kw)
    self.time_out = dense(time_embed_dim, time_embed_dim, ("in_features", "in_features"), **kw)

    rope_base_grid = None if sample_size is None else tuple(n // patch_size for n in sample_size)
    options = ttt if sequence_layer == "ttt" else (baselines or {}).get(sequence_layer)
    block_kw = dict(mlp_ratio=mlp_ratio, sequence_layer=sequence_layer,
                    sequence_options=dict(options or {}),
                    norm_eps=norm_eps, rope_base_grid=rope_base_grid,
                    attention_impl=attention_impl, dtype=dtype, param_dtype=param_dtype)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs: nnx.Rngs) -> DiTBlock:
      return DiTBlock(width, num_heads, time_embed_dim, rngs=rngs, **block_kw)

    self.blocks = make_blocks(rngs)  # parameters stacked on a leading [depth] axis

    self.norm_final = layer_norm(width, norm_eps, **kw)
    self.out_mod = dense(time_embed_dim, 2 * width, ("in_features", "embed"), zero=True, **kw)
    self.norm_out = layer_norm(width, norm_eps, **kw)
    self.proj_out = dense(width, patch_dim, ("embed", "in_features"), zero=True, **kw)

  @classmethod
  def from_config(cls, variant: str, *, rngs: nnx.Rngs, **overrides) -> VideoDiT:
    """Build a named size from `VARIANTS`, with any field overridden."""
    if variant not in VARIANTS:
      raise ValueError(f"unknown model variant {variant!r}; known: {sorted(VARIANTS)}")
    return cls(**{**VARIANTS[variant], **overrides}, rngs=rngs)

  # ------------------------------------------------------------- layout ----
  def _check(self, latents: Array, text: Array, t: Array, layout: VideoLayout) -> None:
    chex.assert_rank([latents, text, t], [5, 3, 1])
    B, T, h, w, C = latents.shape
    p = self.patch_size
    if h % p or w % p or C != self.latent_channels:
      raise ValueError(f"latents {latents.shape}: need h, w divisible by patch {p} and "
                       f"{self.latent_channels} channels")
    got = (T, h // p, w // p, text.shape[1], text.shape[2])
    want = (layout.num_frames, layout.height, layout.width, layout.num_text, self.text_dim)
    if got != want:
      raise ValueError(f"inputs do not match the layout: latents {latents.shape} and text "
                       f"{text.shape} give (frames, grid h, grid w, text len, text dim) = {got}, "
                       f"layout and model expect {want}")
    chex.assert_shape([text, t], [(B, None, None), (B,)])

  def patchify(self, latents: Array) -> Array:
    """[B, T, h, w, C] -> [B, T*(h/p)*(w/p), C*p*p]: tokens frame, row, column; features (C, p, p).

    The feature order is a Conv2d weight's [D, C, p, p] flattened, so
    CogVideoX's patch embedding converts to `patch_embed` by a reshape.
    """
    B, T, h, w, C = latents.shape
    p = self.patch_size
    x = latents.reshape(B, T, h // p, p, w // p, p, C).transpose(0, 1, 2, 4, 6, 3, 5)
    return x.reshape(B, T * (h // p) * (w // p), C * p * p)

  def unpatchify(self, x: Array, T: int, h: int, w: int) -> Array:
    """Inverse of `patchify` ((C, p, p) features, as CogVideoX's proj_out writes them)."""
    B, p, C = x.shape[0], self.patch_size, self.latent_channels
    x = x.reshape(B, T, h // p, w // p, C, p, p).transpose(0, 1, 2, 5, 3, 6, 4)
    return x.reshape(B, T, h, w, C)

  # ------------------------------------------------------------ forward ----
  def run_blocks(self, x: Array, emb: Array, layout: VideoLayout) -> Array:
    """All blocks: `nnx.scan` over the stacked depth axis, or a Python loop."""
    if not self.scan_layers:
      graph, state = nnx.split(self.blocks)
      for i in range(self.depth):
        x = nnx.merge(graph, jax.tree.map(lambda a: a[i], state))(x, emb, layout)
      return x

    def body(x: Array, block: DiTBlock) -> Array:
      return block(x, emb, layout)

    policy = REMAT_POLICIES[self.remat_policy]
    if self.remat_policy != "none":
      body = nnx.remat(body, policy=policy, prevent_cse=False)
    return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)

  def __call__(self, latents: Array, text: Array, t: Array, layout: VideoLayout) -> Array:
    """latents [B, T, h, w, C], text [B, Lt, text_dim], t [B] -> v [B, T, h, w, C]."""
    self._check(latents, text, t, layout)
    B, T, h, w, _ = latents.shape
    # Padding tokens make the sequence split evenly over a context-parallel mesh.
    layout = layout.padded(context_size())
    Lt, Lv = layout.num_text, layout.num_video
    emb = self.time_out(jax.nn.silu(self.time_in(timestep_sinusoid(t, self.width))))  # [B, E]
    video = self.patch_embed(self.patchify(latents))  # [B, Lv, D]
    x = jnp.concatenate([self.text_proj(text), video,
                         jnp.zeros((B, layout.pad, self.width), video.dtype)], axis=1)
    x = self.run_blocks(x, emb, layout)  # [B, L, D]

    # The output head is per token: run on the whole (sequence-sharded) stream, then keep
    # the video's patch features (64 wide), never gathering a [L, D] array.
    shift, scale = jnp.split(self.out_mod(jax.nn.silu(emb)), 2, axis=-1)
    x = self.norm_out(self.norm_final(x)) * (1 + scale[:, None]) + shift[:, None]
    x = self.proj_out(x)[:, Lt:Lt + Lv]  # [B, Lv, C p p]
    return self.unpatchify(x, T, h, w).astype(latents.dtype)


def build(model_cfg: Mapping[str, Any], *, text_dim: int, rngs: nnx.Rngs) -> VideoDiT:
  """The model a config describes (`config.model`, dtypes given by name)."""
  ttt = dict(model_cfg["ttt"])
  ttt["matmul_dtype"] = jnp.dtype(ttt["matmul_dtype"]) if ttt.get("matmul_dtype") else None
  # Workdir configs from before sequence_layer said use_ttt.
  layer = model_cfg.get("sequence_layer") or ("ttt" if model_cfg.get("use_ttt", True) else "local")
  baselines = {k: dict(v) for k, v in dict(model_cfg.get("baselines") or {}).items()}
  return VideoDiT.from_config(
      model_cfg["variant"], text_dim=text_dim, sequence_layer=layer, baselines=baselines,
      scan_layers=model_cfg["scan_layers"], remat_policy=model_cfg["remat_policy"],
      # .get: workdir configs written before the key existed
      attention_impl=model_cfg.get("attention_impl", "auto"),
      dtype=jnp.dtype(model_cfg["dtype"]), ttt=ttt, rngs=rngs)
