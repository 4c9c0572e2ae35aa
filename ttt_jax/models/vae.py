"""Latent video codecs: the frozen autoencoder the diffusion model lives in.

Every codec follows CogVideoX's causal 3D VAE layout. A video of T = 1 + 4n
RGB frames in [-1, 1] becomes 1 + n latent frames: the first frame is
compressed on its own (so a single image is a valid 1-frame video) and every
following group of 4 frames becomes one latent frame; space shrinks 8x per
axis into 16 channels,

    video   [B, 1 + 4n, H, W, 3]  <->  latents [B, 1 + n, H/8, W/8, 16].

`ToyCodec` is the training-free stand-in used by the CPU pipeline;
`CogVideoXCodec` is the real CogVideoX VAE (`ttt_jax.models.cogvideox_vae`,
loaded from diffusers weights), whose latents are the posterior mean times
the VAE's scaling_factor, as the CogVideoX pipeline feeds its transformer.
Both implement `LatentCodec` and are picked by name through `make_codec`.
"""

from __future__ import annotations

import abc
import math
import pathlib
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ttt_jax.models.cogvideox_vae import ChunkedVAE, Tiling, load_cogvideox_vae

Array = jax.Array


class LatentCodec(abc.ABC):
  """Frozen video <-> latent map with CogVideoX's causal 4x8x8 layout.

  Attributes:
    latent_channels: channels of a latent pixel.
    spatial_factor: pixels per latent pixel along H and W.
    temporal_factor: frames per latent frame after the lone first frame.
  """

  latent_channels: int = 16
  spatial_factor: int = 8
  temporal_factor: int = 4

  @abc.abstractmethod
  def encode(self, video: Array) -> Array:
    """video [B, T, H, W, 3] in [-1, 1] -> latents [B, 1 + (T-1)/4, H/8, W/8, C]."""

  @abc.abstractmethod
  def decode(self, latents: Array) -> Array:
    """latents [B, N, h, w, C] -> video [B, 1 + 4(N-1), 8h, 8w, 3], unclipped."""

  def decode_chunks(self, latents: Array) -> Iterator[np.ndarray]:
    """`decode` as host arrays [B, t, H, W, 3], in frame order; codecs whose memory grows
    with the video (the CogVideoX VAE) yield one decoder chunk at a time."""
    yield np.asarray(self.decode(latents))

  def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(latent frames, latent height, latent width, channels) of one video."""
    self._check_frames(num_frames, height, width)
    return (1 + (num_frames - 1) // self.temporal_factor, height // self.spatial_factor,
            width // self.spatial_factor, self.latent_channels)

  def num_frames(self, num_latent_frames: int) -> int:
    """RGB frames that `num_latent_frames` latent frames decode to."""
    if num_latent_frames < 1:
      raise ValueError(f"num_latent_frames must be >= 1, got {num_latent_frames}")
    return 1 + self.temporal_factor * (num_latent_frames - 1)

  def _check_frames(self, num_frames: int, height: int, width: int) -> None:
    """Raise a ValueError naming the first dimension the layout cannot take."""
    tf, sf = self.temporal_factor, self.spatial_factor
    if num_frames < 1 or (num_frames - 1) % tf:
      raise ValueError(
          f"num_frames T={num_frames} must be 1 + {tf}n (a lone first frame, then "
          f"groups of {tf}), e.g. {1 + tf * max(0, (num_frames - 1) // tf)}")
    for name, size in (("height H", height), ("width W", width)):
      if size < 1 or size % sf:
        raise ValueError(f"{name}={size} must be a positive multiple of {sf}")

  def _check_video(self, video: Array) -> None:
    if video.ndim != 5 or video.shape[-1] != 3:
      raise ValueError(f"video must be [B, T, H, W, 3], got shape {video.shape}")
    self._check_frames(*video.shape[1:4])

  def _check_latents(self, latents: Array) -> None:
    if latents.ndim != 5 or latents.shape[-1] != self.latent_channels:
      raise ValueError(
          f"latents must be [B, N, h, w, {self.latent_channels}], got shape {latents.shape}")
    if latents.shape[1] < 1:
      raise ValueError(f"latents need >= 1 latent frame, got shape {latents.shape}")


# ----------------------------------------------------------------------------
# The toy codec: a fixed orthonormal projection of 4x8x8x3 blocks.
# ----------------------------------------------------------------------------

# Opponent colour axes (orthonormal): luma, red-blue, green-magenta. Flat
# cartoon colours spread over all three, and luma carries most edge detail.
OPPONENT_COLOURS = np.array([
    [1.0, 1.0, 1.0],
    [1.0, 0.0, -1.0],
    [-1.0, 2.0, -1.0],
]) / np.array([[math.sqrt(3.0)], [math.sqrt(2.0)], [math.sqrt(6.0)]])  # [3, 3]

# Latent channel k = (temporal order, y DCT-II frequency, x DCT-II frequency,
# opponent colour) of a separable atom over a 4x8x8 block; temporal order 0
# is the mean over the 4 frames, 1 a linear slope. Every colour gets the
# block mean (DC), its temporal slope and the three lowest spatial
# frequencies (vertical, horizontal and diagonal gradient); the 16th channel
# is luma's second horizontal frequency (a bar).
# Chosen by the atoms' mean energy on moving flat-coloured discs: DC alone
# holds ~93%, these 16 reach ~96.5%, and any other choice of the last few
# atoms moved PSNR by < 0.3 dB.
TOY_ATOMS: tuple[tuple[int, int, int, int], ...] = tuple(
    (t, y, x, colour)
    for colour in range(3)
    for t, y, x in ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1))
) + ((0, 0, 2, 0),)

# Latent = (coefficient - TOY_MEAN) / TOY_STD per channel, so latents are
# roughly zero-mean, unit-variance for the diffusion model (the role of a
# VAE's scaling_factor / latents_mean / latents_std; the atoms' energies
# differ by ~100x). Measured on 32 toy cartoons of 9 s at 64x96 (the tiny
# preset; seed 7, frames 1..), rounded; the temporal-slope channels (1, 6,
# 11) have mean exactly 0 so the first latent frame's slopes stay 0.
TOY_MEAN = (3.18, 0.0, 0.73, -0.04, 0.0, 0.42, 0.0, 0.02, 0.0, 0.0, 0.92, 0.0, -0.10, 0.0,
            0.0, 0.02)
TOY_STD = (13.4, 0.44, 3.2, 2.0, 1.0, 5.7, 0.30, 1.7, 1.4, 0.77, 2.7, 0.13, 0.92, 0.56, 0.34,
           1.06)


def temporal_basis(n: int) -> np.ndarray:
  """Orthonormal mean and linear slope over n frames. [2, n]

  A straight ramp rather than DCT frequency 1, so a flat colour fading or
  brightening at a constant rate within a 4-frame group is coded exactly.
  """
  ramp = np.arange(n) - (n - 1) / 2.0
  return np.stack([np.full(n, 1.0 / math.sqrt(n)), ramp / np.linalg.norm(ramp)])


def dct_matrix(n: int) -> np.ndarray:
  """Orthonormal DCT-II: row k is frequency k sampled at n points. [n, n]"""
  k = np.arange(n)[:, None]
  i = np.arange(n)[None, :]
  m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
  m[0] /= math.sqrt(2.0)
  return m


class ToyCodec(LatentCodec):
  """Training-free codec: orthonormal projection of 4x8x8 RGB blocks onto 16 atoms.

  A latent pixel of frame i >= 1 covers frames 4i-3..4i and an 8x8 patch:
  768 values projected onto the 16 separable 3D-DCT x colour atoms of
  `TOY_ATOMS`. Latent frame 0 covers the lone first frame as if repeated 4x
  in time, so the same atoms apply; a repeated frame has no temporal slope,
  so the slope channels (t > 0) of latent frame 0 are always 0 from `encode`
  and ignored by `decode`. Decoding is the transpose projection, hence
  decode(encode(x)) is the orthogonal projection of x onto the atoms and
  encode(decode(z)) == z for every latent `encode` can produce.
  """

  def __init__(self, mean: tuple[float, ...] = TOY_MEAN, std: tuple[float, ...] = TOY_STD):
    """mean, std: per-channel normalisation, latent = (coefficient - mean) / std."""
    time, space = temporal_basis(self.temporal_factor), dct_matrix(self.spatial_factor)
    atoms = np.stack([
        np.einsum("t,y,x,c->tyxc", time[t], space[y], space[x], OPPONENT_COLOURS[c])
        for t, y, x, c in TOY_ATOMS
    ], axis=-1)  # [4, 8, 8, 3, 16]
    # Frame 0 repeated tf times meets each atom's mean row (1/sqrt(tf) per
    # frame) tf times and its slope row not at all (the ramp sums to 0):
    # encoding sums the atom over time, decoding averages it.
    root = math.sqrt(self.temporal_factor)
    still = np.array([t == 0 for t, _, _, _ in TOY_ATOMS], dtype=np.float64)  # [16]
    spatial = atoms[0] * root * still  # [8, 8, 3, 16], unit spatial atoms, 0 for slopes
    if len(mean) != self.latent_channels or len(std) != self.latent_channels:
      raise ValueError(f"mean and std need {self.latent_channels} entries each, got "
                       f"{len(mean)} and {len(std)}")
    self._atoms = jnp.asarray(atoms, jnp.float32)
    self._first_enc = jnp.asarray(spatial * root, jnp.float32)
    self._first_dec = jnp.asarray(spatial / root, jnp.float32)
    self.mean = jnp.asarray(mean, jnp.float32)  # [16]
    self.std = jnp.asarray(std, jnp.float32)  # [16]

  def encode(self, video: Array) -> Array:
    """video [B, 1 + 4n, H, W, 3] -> latents [B, 1 + n, H/8, W/8, 16]."""
    self._check_video(video)
    return (_project(video, self._first_enc, self._atoms) - self.mean) / self.std

  def decode(self, latents: Array) -> Array:
    """latents [B, 1 + n, h, w, 16] -> video [B, 1 + 4n, 8h, 8w, 3], unclipped."""
    self._check_latents(latents)
    return _reconstruct(latents * self.std + self.mean, self._first_dec, self._atoms)


def _einsum(spec: str, a: Array, b: Array) -> Array:
  """Full-fp32 einsum, so the projection stays exact on TPU/GPU matmul units too."""
  return jnp.einsum(spec, a, b, precision=lax.Precision.HIGHEST)


@jax.jit
def _project(video: Array, first_enc: Array, atoms: Array) -> Array:
  """Blocks of video [B, T, H, W, 3] -> atom coefficients [B, N, h, w, K]."""
  b, t, h, w, _ = video.shape
  tf, s = atoms.shape[:2]
  video = video.astype(jnp.float32)
  first = video[:, 0].reshape(b, h // s, s, w // s, s, 3)  # [B, h, 8, w, 8, 3]
  rest = video[:, 1:].reshape(b, (t - 1) // tf, tf, h // s, s, w // s, s, 3)
  z0 = _einsum("bipjqc,pqck->bijk", first, first_enc)  # [B, h, w, K]
  z = _einsum("bntipjqc,tpqck->bnijk", rest, atoms)  # [B, n, h, w, K]
  return jnp.concatenate([z0[:, None], z], axis=1)


@jax.jit
def _reconstruct(coef: Array, first_dec: Array, atoms: Array) -> Array:
  """Atom coefficients [B, N, h, w, K] -> video [B, 1 + tf (N - 1), H, W, 3]."""
  b, m, h, w, _ = coef.shape
  tf, s = atoms.shape[:2]
  coef = coef.astype(jnp.float32)
  first = _einsum("bijk,pqck->bipjqc", coef[:, 0], first_dec)  # [B, h, 8, w, 8, 3]
  rest = _einsum("bnijk,tpqck->bntipjqc", coef[:, 1:], atoms)  # [B, n, 4, h, 8, w, 8, 3]
  first = first.reshape(b, 1, h * s, w * s, 3)
  rest = rest.reshape(b, (m - 1) * tf, h * s, w * s, 3)
  return jnp.concatenate([first, rest], axis=1)


# ----------------------------------------------------------------------------
# The real CogVideoX VAE.
# ----------------------------------------------------------------------------


class CogVideoXCodec(LatentCodec):
  """CogVideoX's causal 3D VAE from a diffusers folder, chunked and (optionally) tiled like diffusers.

  `path`: a diffusers pipeline root holding vae/, or the vae/ folder.
  `tiling`: False (diffusers' default), True for diffusers' enable_tiling()
  defaults, or a `Tiling` with other tile sizes / overlaps. `dtype`: of the
  weights, which is also the compute dtype.
  """

  def __init__(self, path: str | pathlib.Path, tiling: bool | Tiling = False,
               dtype: Any = jnp.float32):
    tiling = Tiling() if tiling is True else tiling or None
    self.vae = ChunkedVAE(load_cogvideox_vae(path, dtype), tiling)
    cfg = self.vae.cfg
    self.latent_channels = cfg.latent_channels
    self.spatial_factor = cfg.spatial_factor
    self.temporal_factor = cfg.temporal_compression_ratio
    self.scaling_factor = cfg.scaling_factor

  def encode(self, video: Array, sample: bool = False, rng: Array | None = None) -> Array:
    """video [B, 1 + 4n, H, W, 3] -> latents [B, 1 + n, H/8, W/8, C]: the posterior mean
    (or, with sample=True, a draw from the posterior using rng) times scaling_factor."""
    self._check_video(video)
    mean, logvar = jnp.split(self.vae.encode(video), 2, axis=-1)
    if sample:
      if rng is None:
        raise ValueError("encode(sample=True) needs an rng")
      std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))  # diffusers' clamp
      mean = mean + std * jax.random.normal(rng, mean.shape, mean.dtype)
    return mean * self.scaling_factor

  def decode(self, latents: Array) -> Array:
    """latents [B, 1 + n, h, w, C] -> video [B, 1 + 4n, 8h, 8w, 3], unclipped.

    As in diffusers, an even latent count (chunks of 2 from the start) decodes
    to 4 (1 + n) frames instead; CogVideoX's own counts (1 + 12k) are odd.
    """
    self._check_latents(latents)
    return self.vae.decode(latents / self.scaling_factor)

  def decode_chunks(self, latents: Array) -> Iterator[np.ndarray]:
    """`decode` one frame chunk at a time, as host arrays [B, t, 8h, 8w, 3] (for an odd
    latent count 9 frames, then 8s), so a video of any length needs one chunk's memory."""
    self._check_latents(latents)
    return (np.asarray(chunk) for chunk in self.vae.decode_chunks(latents / self.scaling_factor))


CODECS: dict[str, Callable[..., LatentCodec]] = {"toy": ToyCodec, "cogvideox": CogVideoXCodec}


def make_codec(name: str, **kwargs: Any) -> LatentCodec:
  """Build the codec a config names, e.g. make_codec("toy")."""
  if name not in CODECS:
    raise ValueError(f"unknown codec {name!r}; known codecs: {', '.join(CODECS)}")
  return CODECS[name](**kwargs)
