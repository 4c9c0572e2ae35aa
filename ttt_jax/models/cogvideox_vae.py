"""CogVideoX's causal 3D VAE (diffusers' AutoencoderKLCogVideoX) in Flax NNX, channels-last.

    encoder  video [B, T, H, W, 3] in [-1, 1]
             -> conv_in                                 causal 3x3x3 conv
             -> down block i < n: layers_per_block ResNets, then (all but the last
                block) a stride-2 3x3 conv per frame; blocks i < log2(ratio) first halve
                time (an odd chunk keeps its first frame, the rest average in pairs)
             -> mid block: 2 ResNets -> GroupNorm, SiLU, conv_out
             -> [B, N, H/f, W/f, 2L]                    posterior mean, log-variance
    decoder  z [B, N, h, w, L]
             -> conv_in -> mid block: 2 ResNets
             -> up block i < n: layers_per_block + 1 ResNets, then (all but the last)
                nearest 2x in space and, for i < log2(ratio), in time (an odd chunk's
                first frame in space only), then a 3x3 conv per frame
             -> SpatialNorm, SiLU, conv_out -> [B, 1 + ratio (N - 1), f h, f w, 3]

f = 2^(n - 1) and N = 1 + (T - 1) / ratio. A ResNet is norm, SiLU, conv, norm, SiLU,
conv plus a (1x1x1 conv) skip; its convs are causal in time. Every decoder norm
is a SpatialNorm3D conditioned on the latent chunk z:
GroupNorm(x) * conv_y(z') + conv_b(z'), with z' = z resized (nearest) to x's
frames and pixels, an odd chunk's first frame from z's first frame alone.

Videos go through in frame chunks, as diffusers runs them: 8 frames per
encoder chunk and 2 latent frames per decoder chunk, the remainder joining
the first chunk (49 frames -> 9, 8, 8, 8, 8, 8; 13 latents -> 3, 2, 2, 2, 2, 2).
Every causal conv pads the first chunk with copies of its first input frame
and carries the last k - 1 input frames to the next chunk; those caches are
an explicit pytree, so a chunk step `(state, x, caches) -> (y, caches)` is a
pure function, jitted once per chunk shape. GroupNorm statistics are taken
per chunk, so the chunking is part of the model: all frames at once give a
different result. `ChunkedVAE` adds diffusers' spatial tiling and a
generator of decoded chunks (memory: one chunk's activations plus the
caches, for any video length). `load_cogvideox_vae` streams a diffusers
`vae/` folder through `ttt_jax.weights`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.weights import Entry, SafetensorsCheckpoint, same, stream

Array = jax.Array
Cache = Any  # nested dicts / lists of [B, k - 1, H, W, C] arrays, mirroring the modules; None first

DIFFUSERS_CLASS = "AutoencoderKLCogVideoX"
# Fixed by diffusers whatever norm_eps says: the encoder's norm_out and every SpatialNorm3D.
FIXED_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class CogVideoXVAEConfig:
  """diffusers' AutoencoderKLCogVideoX settings (defaults are diffusers', i.e. CogVideoX-2B's)."""
  block_out_channels: tuple[int, ...] = (128, 256, 256, 512)
  latent_channels: int = 16
  layers_per_block: int = 3
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  temporal_compression_ratio: int = 4
  scaling_factor: float = 1.15258426
  in_channels: int = 3
  out_channels: int = 3
  sample_height: int = 480  # tiling's default tile is half of these
  sample_width: int = 720

  def __post_init__(self):
    n, ratio = len(self.block_out_channels), self.temporal_compression_ratio
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every "
                       f"block_out_channels entry, not {bad}")
    if ratio < 1 or ratio & (ratio - 1) or ratio > 2 ** (n - 1):
      raise ValueError(f"temporal_compression_ratio={ratio} must be a power of 2 of at most "
                       f"2^(len(block_out_channels) - 1) = {2 ** (n - 1)}")

  @property
  def spatial_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def time_levels(self) -> int:
    """How many blocks (the first ones) halve / double time."""
    return int(math.log2(self.temporal_compression_ratio))

  @classmethod
  def from_json(cls, file: str | pathlib.Path) -> CogVideoXVAEConfig:
    """Read a diffusers config.json; a ValueError names the file and any unsupported key."""
    file = pathlib.Path(file)
    raw = json.loads(file.read_text())
    n = len(raw.get("block_out_channels", cls.block_out_channels))
    fixed = {"_class_name": DIFFUSERS_CLASS, "act_fn": "silu", "use_quant_conv": False,
             "use_post_quant_conv": False, "shift_factor": None, "latents_mean": None,
             "latents_std": None, "down_block_types": ["CogVideoXDownBlock3D"] * n,
             "up_block_types": ["CogVideoXUpBlock3D"] * n}
    for key, supported in fixed.items():
      if key in raw and raw[key] != supported:
        raise ValueError(f"{file}: {key}={raw[key]!r} is not supported (CogVideoX's VAE has "
                         f"{key}={supported!r})")
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in fields}
    try:
      return cls(**values)
    except ValueError as e:
      raise ValueError(f"{file}: {e}") from None


# ----------------------------------------------------------------------------
# Layers. Activations are [B, T, H, W, C].
# ----------------------------------------------------------------------------


def _sub(cache: Cache, key: str | int) -> Cache:
  return None if cache is None else cache[key]


def _group_norm(channels: int, groups: int, eps: float, rngs: nnx.Rngs) -> nnx.GroupNorm:
  # Statistics over (T, H, W, C / groups) of each sample, two-pass like torch's.
  return nnx.GroupNorm(channels, groups, epsilon=eps, use_fast_variance=False, rngs=rngs)


def _resize_nearest(x: Array, size: tuple[int, int, int]) -> Array:
  """[B, T, H, W, C] -> [B, *size, C] by whole factors, where torch's 'nearest' (source
  index floor(i * in / out)) is a repeat; XLA fuses repeats into their consumer."""
  for axis, out in zip((1, 2, 3), size):
    if out % x.shape[axis]:
      raise ValueError(f"cannot resize axis {axis} of {x.shape} to {out} by a whole factor")
    x = jnp.repeat(x, out // x.shape[axis], axis=axis)
  return x


class Conv3d(nnx.Module):
  """k x k x k conv, unpadded in time (T -> T - k + 1), H and W zero-padded to keep their size."""

  def __init__(self, cin: int, cout: int, k: int, *, rngs: nnx.Rngs):
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (k, k, k, cin, cout)))
    self.bias = nnx.Param(jnp.zeros((cout,)))

  def __call__(self, x: Array) -> Array:
    """[B, T, H, W, Cin] -> [B, T - k + 1, H, W, Cout]."""
    kernel = self.kernel[...]  # [k, k, k, Cin, Cout]
    k, (b, t, h, w, c) = kernel.shape[0], x.shape
    n, pad = t - k + 1, ((k // 2, k // 2), (k // 2, k // 2))
    # The sum over time taps of per-frame 2D convs: the same arithmetic as one 3D
    # conv, which XLA:CPU runs 3-9x slower.
    y = sum(jax.lax.conv_general_dilated(x[:, d:d + n].reshape(b * n, h, w, c), kernel[d], (1, 1),
                                         pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
            for d in range(k))
    return (y + self.bias[...]).reshape(b, n, h, w, -1)


class CausalConv3d(nnx.Module):
  """k x k x k conv; output frame t sees input frames t - k + 1 .. t, H and W zero-padded."""

  def __init__(self, cin: int, cout: int, k: int = 3, *, rngs: nnx.Rngs):
    self.k = k
    self.conv = Conv3d(cin, cout, k, rngs=rngs)

  def __call__(self, x: Array, cache: Array | None) -> tuple[Array, Array]:
    """x [B, T, H, W, Cin], cache [B, k-1, H, W, Cin] (None: the first chunk) -> y, cache."""
    # Before the first chunk, the past is the first frame repeated.
    past = jnp.repeat(x[:, :1], self.k - 1, axis=1) if cache is None else cache
    x = jnp.concatenate([past, x], axis=1)  # [B, k-1+T, H, W, Cin]
    return self.conv(x), x[:, x.shape[1] - (self.k - 1):]


class SpatialNorm3D(nnx.Module):
  """GroupNorm(x) * conv_y(z') + conv_b(z'), z' = z resized to x: the decoder's norm."""

  def __init__(self, channels: int, z_channels: int, groups: int, *, rngs: nnx.Rngs):
    self.norm_layer = _group_norm(channels, groups, FIXED_NORM_EPS, rngs)
    # Causal convs of a 1-frame kernel: plain 1x1x1 convs (their inner conv alone).
    self.conv_y = CausalConv3d(z_channels, channels, 1, rngs=rngs)
    self.conv_b = CausalConv3d(z_channels, channels, 1, rngs=rngs)

  def __call__(self, x: Array, z: Array) -> Array:
    """x [B, T, H, W, C], z [B, n, h, w, L] -> [B, T, H, W, C]."""
    # A 1x1x1 conv commutes with nearest resizing, so both convs run at z's size and
    # their outputs are repeated inside the fused product: no full-size copies of z,
    # conv_y(z) or conv_b(z), which XLA would compute up front and keep for every norm.
    scale, shift = self.conv_y.conv(z), self.conv_b.conv(z)  # [B, n, h, w, C]
    return self.norm_layer(x) * _resize_to(scale, x) + _resize_to(shift, x)


def _resize_to(z: Array, x: Array) -> Array:
  """z [B, n, h, w, C] resized (nearest) to x's frames and pixels; for an odd frame count,
  frame 0 comes from z's frame 0 alone and the rest from the rest."""
  t, (height, width) = x.shape[1], x.shape[2:4]
  if t > 1 and t % 2:  # in time first, at z's size: a concat is materialised, unlike repeats
    z = jnp.concatenate([z[:, :1], _resize_nearest(z[:, 1:], (t - 1, *z.shape[2:4]))], axis=1)
  return _resize_nearest(z, (t, height, width))


class ResnetBlock3D(nnx.Module):
  """x + conv2(SiLU(norm2(conv1(SiLU(norm1(x)))))), the skip a 1x1x1 conv where C changes.

  z_channels: None for GroupNorms (encoder), else the SpatialNorm3D's latent channels.
  """

  def __init__(self, cin: int, cout: int, cfg: CogVideoXVAEConfig, z_channels: int | None,
               *, rngs: nnx.Rngs):
    groups = cfg.norm_num_groups
    norm = ((lambda c: _group_norm(c, groups, cfg.norm_eps, rngs)) if z_channels is None else
            (lambda c: SpatialNorm3D(c, z_channels, groups, rngs=rngs)))
    self.norm1, self.norm2 = norm(cin), norm(cout)
    self.conv1 = CausalConv3d(cin, cout, rngs=rngs)
    self.conv2 = CausalConv3d(cout, cout, rngs=rngs)
    self.conv_shortcut = Conv3d(cin, cout, 1, rngs=rngs) if cin != cout else None

  def _norm(self, norm: nnx.Module, x: Array, z: Array | None) -> Array:
    return jax.nn.silu(norm(x) if z is None else norm(x, z))

  def __call__(self, x: Array, z: Array | None, cache: Cache) -> tuple[Array, Cache]:
    h, c1 = self.conv1(self._norm(self.norm1, x, z), _sub(cache, "conv1"))
    h, c2 = self.conv2(self._norm(self.norm2, h, z), _sub(cache, "conv2"))
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return h + skip, {"conv1": c1, "conv2": c2}


def _resnets(resnets: nnx.List, x: Array, z: Array | None, cache: Cache) -> tuple[Array, Cache]:
  caches = []
  for i, resnet in enumerate(resnets):
    x, c = resnet(x, z, _sub(cache, i))
    caches.append(c)
  return x, caches


class Downsample3D(nnx.Module):
  """Optionally halve time, then a stride-2 3x3 conv per frame (zero pad right and bottom only)."""

  def __init__(self, channels: int, compress_time: bool, *, rngs: nnx.Rngs):
    self.compress_time = compress_time
    self.conv = nnx.Conv(channels, channels, (3, 3), strides=2, padding=((0, 1), (0, 1)), rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """[B, T, H, W, C] -> [B, T', ceil(H/2), ceil(W/2), C], T' = T//2 (even T) or 1 + T//2 (odd)."""
    if self.compress_time:
      b, t, h, w, c = x.shape
      keep = t % 2  # an odd chunk keeps its first frame
      pairs = (t - keep) // 2
      rest = x[:, keep:keep + 2 * pairs].reshape(b, pairs, 2, h, w, c).mean(axis=2)
      x = jnp.concatenate([x[:, :keep], rest], axis=1)
    return self.conv(x)


class Upsample3D(nnx.Module):
  """Nearest 2x in space and optionally time (an odd chunk's first frame once), then a 3x3 conv."""

  def __init__(self, channels: int, compress_time: bool, *, rngs: nnx.Rngs):
    self.compress_time = compress_time
    self.conv = nnx.Conv(channels, channels, (3, 3), padding=((1, 1), (1, 1)), rngs=rngs)

  def __call__(self, x: Array) -> Array:
    """[B, T, H, W, C] -> [B, T', 2H, 2W, C], T' = 2T (even T), 2T - 1 (odd T > 1), or T."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
    t = x.shape[1]
    if self.compress_time and t > 1:
      keep = t % 2
      x = jnp.concatenate([x[:, :keep], jnp.repeat(x[:, keep:], 2, axis=1)], axis=1)
    return self.conv(x)


class DownBlock3D(nnx.Module):
  def __init__(self, cin: int, cout: int, cfg: CogVideoXVAEConfig, downsample: bool,
               compress_time: bool, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock3D(cin if j == 0 else cout, cout, cfg, None, rngs=rngs)
                             for j in range(cfg.layers_per_block)])
    self.downsamplers = nnx.List([Downsample3D(cout, compress_time, rngs=rngs)] if downsample else [])

  def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
    x, cache = _resnets(self.resnets, x, None, cache)
    for down in self.downsamplers:
      x = down(x)
    return x, cache


class MidBlock3D(nnx.Module):
  def __init__(self, channels: int, cfg: CogVideoXVAEConfig, z_channels: int | None,
               *, rngs: nnx.Rngs):
    self.resnets = nnx.List([ResnetBlock3D(channels, channels, cfg, z_channels, rngs=rngs)
                             for _ in range(2)])

  def __call__(self, x: Array, z: Array | None, cache: Cache) -> tuple[Array, Cache]:
    return _resnets(self.resnets, x, z, cache)


class UpBlock3D(nnx.Module):
  def __init__(self, cin: int, cout: int, cfg: CogVideoXVAEConfig, upsample: bool,
               compress_time: bool, *, rngs: nnx.Rngs):
    self.resnets = nnx.List([
        ResnetBlock3D(cin if j == 0 else cout, cout, cfg, cfg.latent_channels, rngs=rngs)
        for j in range(cfg.layers_per_block + 1)])
    self.upsamplers = nnx.List([Upsample3D(cout, compress_time, rngs=rngs)] if upsample else [])

  def __call__(self, x: Array, z: Array, cache: Cache) -> tuple[Array, Cache]:
    x, cache = _resnets(self.resnets, x, z, cache)
    for up in self.upsamplers:
      x = up(x)
    return x, cache


class Encoder3D(nnx.Module):
  def __init__(self, cfg: CogVideoXVAEConfig, *, rngs: nnx.Rngs):
    ch, n = cfg.block_out_channels, len(cfg.block_out_channels)
    self.conv_in = CausalConv3d(cfg.in_channels, ch[0], rngs=rngs)
    self.down_blocks = nnx.List([
        DownBlock3D(ch[max(i - 1, 0)], ch[i], cfg, i < n - 1, i < cfg.time_levels, rngs=rngs)
        for i in range(n)])
    self.mid_block = MidBlock3D(ch[-1], cfg, None, rngs=rngs)
    self.norm_out = _group_norm(ch[-1], cfg.norm_num_groups, FIXED_NORM_EPS, rngs)
    self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, rngs=rngs)

  def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
    """One chunk: video [B, t, H, W, 3] -> moments [B, n, H/f, W/f, 2L] (mean, logvar), caches."""
    x, c_in = self.conv_in(x, _sub(cache, "conv_in"))  # [B, t, H, W, C0]
    downs = []
    for i, block in enumerate(self.down_blocks):
      x, c = block(x, _sub(_sub(cache, "down_blocks"), i))
      downs.append(c)
    x, c_mid = self.mid_block(x, None, _sub(cache, "mid_block"))  # [B, n, H/f, W/f, C]
    x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), _sub(cache, "conv_out"))
    return x, {"conv_in": c_in, "down_blocks": downs, "mid_block": c_mid, "conv_out": c_out}


class Decoder3D(nnx.Module):
  def __init__(self, cfg: CogVideoXVAEConfig, *, rngs: nnx.Rngs):
    ch, n, lat = cfg.block_out_channels[::-1], len(cfg.block_out_channels), cfg.latent_channels
    self.conv_in = CausalConv3d(lat, ch[0], rngs=rngs)
    self.mid_block = MidBlock3D(ch[0], cfg, lat, rngs=rngs)
    self.up_blocks = nnx.List([
        UpBlock3D(ch[max(i - 1, 0)], ch[i], cfg, i < n - 1, i < cfg.time_levels, rngs=rngs)
        for i in range(n)])
    self.norm_out = SpatialNorm3D(ch[-1], lat, cfg.norm_num_groups, rngs=rngs)
    self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, rngs=rngs)

  def __call__(self, z: Array, cache: Cache) -> tuple[Array, Cache]:
    """One chunk: latents [B, n, h, w, L] -> video [B, t, f h, f w, 3], caches."""
    x, c_in = self.conv_in(z, _sub(cache, "conv_in"))  # [B, n, h, w, C]
    x, c_mid = self.mid_block(x, z, _sub(cache, "mid_block"))
    ups = []
    for i, block in enumerate(self.up_blocks):
      x, c = block(x, z, _sub(_sub(cache, "up_blocks"), i))  # [B, t_i, 2^i h, 2^i w, C_i]
      ups.append(c)
    x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x, z)), _sub(cache, "conv_out"))
    return x, {"conv_in": c_in, "mid_block": c_mid, "up_blocks": ups, "conv_out": c_out}


class CogVideoXVAE(nnx.Module):
  """Encoder and decoder; each call runs one frame chunk (see `ChunkedVAE` for whole videos)."""

  def __init__(self, cfg: CogVideoXVAEConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.encoder = Encoder3D(cfg, rngs=rngs)
    self.decoder = Decoder3D(cfg, rngs=rngs)


# ----------------------------------------------------------------------------
# Whole videos: diffusers' frame chunking and spatial tiling.
# ----------------------------------------------------------------------------

ENCODE_CHUNK = 8  # frames per encoder chunk (diffusers' num_sample_frames_batch_size)
DECODE_CHUNK = 2  # latent frames per decoder chunk (num_latent_frames_batch_size)


def frame_chunks(total: int, size: int) -> list[tuple[int, int]]:
  """[start, stop) of diffusers' chunks: `size` frames each, the remainder in the first one."""
  rem = total % size
  return [(0 if k == 0 else k * size + rem, min((k + 1) * size + rem, total))
          for k in range(max(total // size, 1))]


@dataclasses.dataclass(frozen=True)
class Tiling:
  """diffusers' enable_tiling(): overlapping tiles in H and W, each through every frame chunk.

  Tile sizes are in pixels; None takes diffusers' default, half the config's
  sample_height / sample_width (240 x 360, i.e. 30 x 45 latents, for CogVideoX).
  Overlaps are fractions of a tile, blended linearly into the next tile.
  """
  sample_height: int | None = None
  sample_width: int | None = None
  overlap_height: float = 1 / 6
  overlap_width: float = 1 / 5


@dataclasses.dataclass(frozen=True)
class _TileGrid:
  """Where tiles start (input units), their size, blend width and kept size (output units)."""
  size: tuple[int, int]
  stride: tuple[int, int]
  blend: tuple[int, int]
  keep: tuple[int, int]

  def slices(self, height: int, width: int) -> list[list[tuple[slice, slice]]]:
    return [[(slice(i, i + self.size[0]), slice(j, j + self.size[1]))
             for j in range(0, width, self.stride[1])] for i in range(0, height, self.stride[0])]

  def applies(self, height: int, width: int) -> bool:
    return height > self.size[0] or width > self.size[1]


def _fade(prev: Array, tile: Array, width: int, axis: int) -> Array:
  """tile's first `width` rows along axis: a linear blend from prev's last rows into its own."""
  width = min(prev.shape[axis], tile.shape[axis], width)
  if width == 0:
    return tile
  w = (jnp.arange(width, dtype=jnp.float32) / width).reshape((-1,) + (1,) * (tile.ndim - 1 - axis))
  head = _window(prev, axis, prev.shape[axis] - width, None) * (1 - w) + \
      _window(tile, axis, 0, width) * w
  return jnp.concatenate([head.astype(tile.dtype), _window(tile, axis, width, None)], axis=axis)


def _window(x: Array, axis: int, start: int, stop: int | None) -> Array:
  """x[..., start:stop, ...] along axis."""
  index = [slice(None)] * x.ndim
  index[axis] = slice(start, stop)
  return x[tuple(index)]


def _blend(tiles: list[list[Array]], grid: _TileGrid) -> Array:
  """Tiles [B, t, h_ij, w_ij, C] -> [B, t, H, W, C], blended and cropped as diffusers does.

  diffusers blends in place, so a tile blends with neighbours (above, then
  left) that are themselves already blended.
  """
  rows = []
  for i, row in enumerate(tiles):
    for j in range(len(row)):
      if i:
        row[j] = _fade(tiles[i - 1][j], row[j], grid.blend[0], axis=2)
      if j:
        row[j] = _fade(row[j - 1], row[j], grid.blend[1], axis=3)
    rows.append(jnp.concatenate([t[:, :, :grid.keep[0], :grid.keep[1]] for t in row], axis=3))
  return jnp.concatenate(rows, axis=2)


Step = Callable[[Any, Array, Cache], tuple[Array, Cache]]


class ChunkedVAE:
  """Whole videos through a CogVideoXVAE the way diffusers runs them: frame chunks, optional tiles.

  `encode_step` / `decode_step`: `(state, x_chunk, caches | None) -> (y_chunk,
  caches)`, jitted, so each compiles once per input shape: for a video, the
  first chunk and the steady chunks (times the distinct edge-tile shapes when
  tiled).
  """

  def __init__(self, vae: CogVideoXVAE, tiling: Tiling | None = None):
    self.cfg = vae.cfg
    graph, self.state = nnx.split(vae)
    self.dtype = dtype = jax.tree.leaves(self.state)[0].dtype  # inputs run in the weights' dtype
    # The caches passed in are donated: their buffers become the new caches.
    self.encode_step: Step = jax.jit(
        lambda state, x, cache: nnx.merge(graph, state).encoder(x.astype(dtype), cache),
        donate_argnums=2)
    self.decode_step: Step = jax.jit(
        lambda state, z, cache: nnx.merge(graph, state).decoder(z.astype(dtype), cache),
        donate_argnums=2)
    self.tiling = tiling
    self._grids = {False: None, True: None} if tiling is None else self._tile_grids(tiling)

  def _tile_grids(self, tiling: Tiling) -> dict[bool, _TileGrid]:
    """{decode?: grid}: diffusers' tile arithmetic (int() truncations included), checked."""
    f = self.cfg.spatial_factor
    sample = (tiling.sample_height or self.cfg.sample_height // 2,
              tiling.sample_width or self.cfg.sample_width // 2)
    overlap = (tiling.overlap_height, tiling.overlap_width)
    latent = tuple(int(s / f) for s in sample)
    enc_stride = tuple(int(s * (1 - o)) for s, o in zip(sample, overlap))
    enc_blend = tuple(int(s * o) for s, o in zip(latent, overlap))
    dec_stride = tuple(int(s * (1 - o)) for s, o in zip(latent, overlap))
    dec_blend = tuple(int(s * o) for s, o in zip(sample, overlap))
    encode = _TileGrid(sample, enc_stride, enc_blend,
                       tuple(s - b for s, b in zip(latent, enc_blend)))
    decode = _TileGrid(latent, dec_stride, dec_blend,
                       tuple(s - b for s, b in zip(sample, dec_blend)))
    # Kept parts must abut exactly, else diffusers returns a mis-sized video.
    if (any(s % f or s // f != k for s, k in zip(encode.stride, encode.keep))
        or any(s * f != k for s, k in zip(decode.stride, decode.keep))
        or min(enc_stride + dec_stride) < 1):
      raise ValueError(
          f"{tiling}: tiles of {sample[0]}x{sample[1]} pixels with overlaps "
          f"{overlap[0]:.3g}, {overlap[1]:.3g} do not tile evenly (tile strides {enc_stride} "
          f"pixels / {dec_stride} latents must be what each tile keeps, {encode.keep} latents / "
          f"{decode.keep} pixels); diffusers' defaults (1/6, 1/5 of 240x360) do")
    return {False: encode, True: decode}

  def tiles(self, height: int, width: int, *, decode: bool) -> list[list[tuple[slice, slice]]]:
    """Rows of (H, W) slices of the tiles of an input this size; one whole tile if untiled."""
    grid = self._grids[decode]
    if grid is None or not grid.applies(height, width):
      return [[(slice(None), slice(None))]]
    return grid.slices(height, width)

  def _chunks(self, x: Array, decode: bool) -> Iterator[Array]:
    """Per frame chunk of x [B, T, H, W, C]: the step's output over all tiles, blended.

    Tiles are independent (each with its own caches), so running every tile
    per chunk equals diffusers' tile-by-tile order, with only one chunk of
    output alive at a time.
    """
    step, frames = (self.decode_step, DECODE_CHUNK) if decode else (self.encode_step, ENCODE_CHUNK)
    tiles = self.tiles(*x.shape[2:4], decode=decode)
    caches: dict[tuple[int, int], Cache] = {}
    for start, stop in frame_chunks(x.shape[1], frames):
      out = []
      for i, row in enumerate(tiles):
        out.append([])
        for j, (rs, cs) in enumerate(row):
          y, caches[i, j] = step(self.state, x[:, start:stop, rs, cs], caches.get((i, j)))
          out[-1].append(y)
      yield out[0][0] if len(caches) == 1 else _blend(out, self._grids[decode])

  def encode(self, video: Array) -> Array:
    """video [B, T, H, W, 3] -> moments [B, N, H/f, W/f, 2L]: posterior mean, then log-variance."""
    return jnp.concatenate(list(self._chunks(video, decode=False)), axis=1)

  def decode_chunks(self, z: Array) -> Iterator[Array]:
    """z [B, N, h, w, L] -> video chunks [B, t, f h, f w, 3], in order, as they are decoded."""
    return self._chunks(z, decode=True)

  def decode(self, z: Array) -> Array:
    """z [B, N, h, w, L] -> video [B, 1 + ratio (N - 1), f h, f w, 3] (N odd)."""
    return jnp.concatenate(list(self.decode_chunks(z)), axis=1)


# ----------------------------------------------------------------------------
# Loading diffusers weights.
# ----------------------------------------------------------------------------


def _conv3d_kernel(w: np.ndarray) -> np.ndarray:  # torch [out, in, kt, kh, kw] -> [kt, kh, kw, in, out]
  return np.transpose(w, (2, 3, 4, 1, 0))


def _conv2d_kernel(w: np.ndarray) -> np.ndarray:  # torch [out, in, kh, kw] -> [kh, kw, in, out]
  return np.transpose(w, (2, 3, 1, 0))


def vae_entries(vae: CogVideoXVAE) -> list[Entry]:
  """One Entry per parameter: our module path is diffusers' key (kernel, scale -> weight)."""
  entries = []
  for path, param in nnx.to_flat_state(nnx.state(vae, nnx.Param)):
    *modules, leaf = (str(p) for p in path)
    key = ".".join(modules + ["bias" if leaf == "bias" else "weight"])
    shape = tuple(param.shape)
    if len(shape) == 5:
      entries.append(Entry(path, key, (shape[4], shape[3], *shape[:3]), _conv3d_kernel))
    elif len(shape) == 4:
      entries.append(Entry(path, key, (shape[3], shape[2], *shape[:2]), _conv2d_kernel))
    else:
      entries.append(Entry(path, key, shape, same))
  return entries


def vae_folder(path: str | pathlib.Path) -> pathlib.Path:
  """The VAE folder of a diffusers pipeline root (its vae/) or the vae/ folder itself."""
  path = pathlib.Path(path)
  folder = path / "vae" if (path / "vae").is_dir() else path
  if not folder.is_dir():
    raise FileNotFoundError(f"{path}: no such folder (expected a diffusers pipeline root with "
                            f"vae/, or the vae/ folder)")
  if not (folder / "config.json").is_file():
    raise FileNotFoundError(f"{folder}: no config.json of a CogVideoX VAE")
  return folder


def load_cogvideox_vae(path: str | pathlib.Path, dtype: Any = jnp.float32) -> CogVideoXVAE:
  """A CogVideoXVAE with the weights of a diffusers VAE (streamed, one tensor at a time).

  path: a pipeline root holding vae/, or the vae/ folder (config.json +
  *.safetensors, sharded or not, any float dtype). Every missing, unmatched
  or mis-shaped key is named before any tensor is read.
  """
  folder = vae_folder(path)
  cfg = CogVideoXVAEConfig.from_json(folder / "config.json")
  vae = nnx.eval_shape(lambda: CogVideoXVAE(cfg, rngs=nnx.Rngs(0)))
  ckpt = SafetensorsCheckpoint(folder)
  entries = vae_entries(vae)
  ckpt.check(entries, 0, what="CogVideoX VAE")
  params = dict(nnx.to_flat_state(nnx.state(vae, nnx.Param)))
  for target, value in stream(ckpt, entries, 0, desc="loading CogVideoX VAE"):
    params[target].set_value(jnp.asarray(value, dtype))  # the abstract model gets real arrays
  return vae
