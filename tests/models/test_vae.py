"""The toy latent codec: layout, exact algebra of the projection, and quality.

fp32 tolerances: pixels and latents are O(1) but a round trip passes
through raw coefficients up to ~30 (latent * std 13.4) and sums of 768
products, so latent round trips are held to atol=3e-5 and pixel identities
(whose coefficients are O(1)) to 1e-5. Re-runs and fresh instances must be
bit-identical.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.data import toy_cartoons

from ttt_jax.models.vae import TOY_ATOMS, LatentCodec, ToyCodec, make_codec

SLOPE_CHANNELS = [k for k, (t, _, _, _) in enumerate(TOY_ATOMS) if t > 0]


@pytest.fixture(scope="module")
def codec():
  return ToyCodec()


def cartoon(seed, batch=2, frames=49, height=64, width=64, discs=4):
  """Moving flat-coloured discs on a flat background, in [-1, 1]. [B, T, H, W, 3]"""
  rng = np.random.default_rng(seed)
  t = np.arange(frames)[:, None, None]
  yy, xx = np.mgrid[0:height, 0:width] + 0.5
  videos = []
  for _ in range(batch):
    video = np.broadcast_to(rng.uniform(-1, 1, 3), (frames, height, width, 3)).copy()
    for _ in range(discs):
      colour, radius = rng.uniform(-1, 1, 3), rng.uniform(5, 16)
      (cy, cx), (vy, vx) = rng.uniform(0, [height, width]), rng.uniform(-1.5, 1.5, 2)
      inside = (yy - cy - vy * t) ** 2 + (xx - cx - vx * t) ** 2 < radius**2  # [T, H, W]
      video[inside] = colour
    videos.append(video)
  return jnp.asarray(np.stack(videos), jnp.float32)


def random_latents(codec, key, shape):
  """Latents as `encode` produces them: frame 0 has no temporal-slope channels."""
  z = jax.random.normal(key, shape, jnp.float32)
  return z.at[:, 0, ..., SLOPE_CHANNELS].set(0.0)


def psnr(x, y):
  """PSNR for signals in [-1, 1] (peak-to-peak 2)."""
  return float(10 * jnp.log10(4.0 / jnp.mean(jnp.square(x - y))))


def test_interface_and_factory(codec):
  assert isinstance(make_codec("toy"), ToyCodec)
  assert isinstance(codec, LatentCodec)
  assert (codec.latent_channels, codec.spatial_factor, codec.temporal_factor) == (16, 8, 4)
  with pytest.raises(ValueError, match="known codecs: toy"):
    make_codec("cogvideox-5b")


@pytest.mark.parametrize("latent_frames", [13, 37, 73, 121, 253])
def test_shapes(codec, latent_frames):
  frames = codec.num_frames(latent_frames)
  assert frames == 4 * latent_frames - 3  # 49, 145, 289, 481, 1009
  assert codec.latent_shape(frames, 480, 720) == (latent_frames, 60, 90, 16)
  video = jnp.zeros((1, frames, 8, 16, 3), jnp.float32)
  z = codec.encode(video)
  assert z.shape == (1, latent_frames, 1, 2, 16) and z.dtype == jnp.float32
  assert codec.decode(z).shape == video.shape


def test_single_image_is_one_latent_frame(codec):
  image = cartoon(0, batch=1, frames=1, height=16, width=24)
  assert codec.encode(image).shape == (1, 1, 2, 3, 16)
  assert codec.decode(codec.encode(image)).shape == image.shape


@pytest.mark.parametrize("shape, message", [
    ((1, 48, 16, 16, 3), "T=48"),
    ((1, 50, 16, 16, 3), "T=50"),
    ((1, 5, 60, 16, 3), "height H=60"),
    ((1, 5, 16, 100, 3), "width W=100"),
    ((1, 5, 16, 16, 4), r"\[B, T, H, W, 3\]"),
])
def test_bad_video_shapes(codec, shape, message):
  with pytest.raises(ValueError, match=message):
    codec.encode(jnp.zeros(shape))
  if len(shape) == 5 and shape[-1] == 3:
    with pytest.raises(ValueError, match=message):
      codec.latent_shape(*shape[1:4])


def test_bad_latent_shapes(codec):
  with pytest.raises(ValueError, match="16"):
    codec.decode(jnp.zeros((1, 2, 2, 2, 8)))
  with pytest.raises(ValueError, match="num_latent_frames"):
    codec.num_frames(0)


def test_atoms_are_orthonormal(codec):
  # One unit coefficient per channel decodes to that channel's atom.
  unit = (jnp.eye(16)[:, None, None, None, :] - codec.mean) / codec.std  # [16, 1, 1, 1, 16]
  z = jnp.broadcast_to(unit, (16, 2, 1, 1, 16))
  atoms = codec.decode(z)[:, 1:].reshape(16, -1)  # [16, 768]
  np.testing.assert_allclose(atoms @ atoms.T, np.eye(16), atol=1e-5)


def test_encode_decode_is_identity_on_latents(codec):
  z = random_latents(codec, jax.random.key(0), (2, 4, 3, 5, 16))
  np.testing.assert_allclose(codec.encode(codec.decode(z)), z, atol=3e-5)


def test_first_frame_ignores_temporal_slope(codec):
  # A lone frame has no slope: encode leaves those channels 0, decode ignores them.
  z = random_latents(codec, jax.random.key(1), (1, 2, 2, 2, 16))
  noisy = z.at[:, 0, ..., SLOPE_CHANNELS].set(5.0)
  np.testing.assert_array_equal(codec.decode(noisy), codec.decode(z))
  np.testing.assert_array_equal(codec.encode(cartoon(1, frames=5))[:, 0, ..., SLOPE_CHANNELS], 0.0)


def test_decode_encode_is_orthogonal_projection(codec):
  x = jax.random.uniform(jax.random.key(2), (2, 9, 16, 24, 3), minval=-1, maxval=1)
  px = codec.decode(codec.encode(x))
  np.testing.assert_allclose(codec.decode(codec.encode(px)), px, atol=1e-5)  # idempotent
  # The residual is orthogonal to everything the decoder can produce.
  y = codec.decode(random_latents(codec, jax.random.key(3), (2, 3, 2, 3, 16)))
  residual = x - px
  cosine = jnp.vdot(residual, y) / (jnp.linalg.norm(residual) * jnp.linalg.norm(y))
  assert abs(float(cosine)) < 1e-5
  assert float(jnp.linalg.norm(px)) < float(jnp.linalg.norm(x))


def test_flat_blocks_are_exact(codec):
  # Block-aligned flat colours, constant in frame 0 and changing linearly in
  # time inside each 4-frame group, lie in the span of the DC and slope atoms.
  rng = np.random.default_rng(4)
  colour = rng.uniform(-1, 1, (2, 4, 3, 5, 3))  # [B, 1 + n, h, w, 3]
  slope = rng.uniform(-0.2, 0.2, (2, 3, 3, 5, 3))
  ramp = np.arange(4)[:, None, None, None] - 1.5  # [4, 1, 1, 1]
  groups = colour[:, 1:, None] + slope[:, :, None] * ramp  # [B, n, 4, h, w, 3]
  frames = np.concatenate([colour[:, :1], groups.reshape(2, 12, 3, 5, 3)], axis=1)
  video = jnp.asarray(frames.repeat(8, axis=2).repeat(8, axis=3), jnp.float32)  # [2, 13, 24, 40, 3]
  np.testing.assert_allclose(codec.decode(codec.encode(video)), video, atol=1e-5)


def test_cartoon_psnr_and_latent_scale(codec):
  video = cartoon(5, batch=4)
  z = codec.encode(video)
  quality = psnr(codec.decode(z), video)
  dc = (jnp.arange(16) % 5 == 0) & (jnp.arange(16) < 15)
  dc_only = psnr(codec.decode(jnp.where(dc, z, -codec.mean / codec.std)), video)  # others 0
  print(f"toy codec PSNR on moving discs: {quality:.2f} dB (DC atoms only: {dc_only:.2f} dB)")
  assert quality > 25.0 and quality > dc_only + 2.0


def test_latents_are_normalised_on_toy_cartoons(codec):
  """Calibration holds on cartoons it was not measured on (seed 3, not 7)."""
  cfg = toy_cartoons.ToyCartoonConfig(seconds=9, height=64, width=96, seed=3, num_videos=8)
  videos = [toy_cartoons.frames_to_float(toy_cartoons.generate_video(cfg, i).frames)
            for i in range(8)]
  z = codec.encode(jnp.asarray(np.stack(videos)))[:, 1:].reshape(-1, 16)
  mean, std = jnp.mean(z, axis=0), jnp.std(z, axis=0)
  assert bool(jnp.all(jnp.abs(mean) < 0.35)), mean
  assert bool(jnp.all((std > 0.5) & (std < 2.0))), std


def test_jit_and_determinism(codec):
  video = cartoon(6, batch=1, frames=9, height=32, width=32)
  z = codec.encode(video)
  np.testing.assert_allclose(jax.jit(codec.encode)(video), z, atol=1e-6)
  np.testing.assert_allclose(jax.jit(codec.decode)(z), codec.decode(z), atol=1e-6)
  np.testing.assert_array_equal(ToyCodec().encode(video), z)
  np.testing.assert_array_equal(codec.encode(video), z)
