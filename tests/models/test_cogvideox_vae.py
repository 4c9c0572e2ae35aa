"""CogVideoXCodec == diffusers' AutoencoderKLCogVideoX, chunked (and tiled) as diffusers runs it.

The reference is a tiny random AutoencoderKLCogVideoX built in the test,
offline: 4 blocks (8x in space, 4x in time, as CogVideoX), norm affines
randomised so that they matter, saved as safetensors into a pipeline root's
vae/. Latents are the posterior mean x scaling_factor and decode divides
first, as the CogVideoX pipeline does. Tolerance: max |ours - diffusers| <
1e-4 x max |diffusers|, in fp32. Torch is NCTHW, ours NTHWC.
"""

from __future__ import annotations

import copy
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX
from flax import nnx
from safetensors.numpy import load_file, save_file

from ttt_jax.models import cogvideox_vae
from ttt_jax.models.vae import CogVideoXCodec, make_codec

SCALE = 0.7
LATENT = 4
TOL = 1e-4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(pipeline root, the diffusers model it holds in vae/)."""
  root = tmp_path_factory.mktemp("cogvideox_vae")
  torch.manual_seed(0)
  ref = AutoencoderKLCogVideoX(block_out_channels=(16, 32, 32, 32), latent_channels=LATENT,
                               layers_per_block=1, norm_num_groups=4, norm_eps=1e-3,
                               scaling_factor=SCALE).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if p.ndim == 1 and "norm" in name and "conv" not in name:  # GroupNorm weight / bias
        p.copy_(float(name.endswith("weight")) + 0.3 * torch.randn_like(p))
  ref.save_pretrained(root / "vae", safe_serialization=True)
  return root, ref


@pytest.fixture(scope="module")
def codec(reference):
  return make_codec("cogvideox", path=reference[0])


def to_torch(x: np.ndarray) -> torch.Tensor:  # [B, T, H, W, C] -> [B, C, T, H, W]
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def to_numpy(x: torch.Tensor) -> np.ndarray:  # [B, C, T, H, W] -> [B, T, H, W, C]
  return np.moveaxis(x.detach().numpy(), 1, -1)


def ref_encode(ref, video: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return to_numpy(ref.encode(to_torch(video)).latent_dist.mean * SCALE)


def ref_decode(ref, latents: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return to_numpy(ref.decode(to_torch(latents / SCALE)).sample)


def rel_err(got, want) -> float:
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def video(frames: int, height: int = 32, width: int = 48, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (1, frames, height, width, 3)).astype(np.float32)


def latents(frames: int, height: int = 4, width: int = 6, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((1, frames, height, width, LATENT),
                                                     np.float32)


@pytest.mark.parametrize("frames", [17, 25])  # chunks 9 + 8 and 9 + 8 + 8
def test_encode_matches_diffusers(reference, codec, frames):
  x = video(frames)
  want = ref_encode(reference[1], x)
  got = codec.encode(jnp.asarray(x))
  assert got.shape == want.shape == (1, 1 + (frames - 1) // 4, 4, 6, LATENT)
  assert rel_err(got, want) < TOL, rel_err(got, want)
  with pytest.raises(ValueError, match="needs an rng"):
    codec.encode(x, sample=True)
  drawn = codec.encode(x, sample=True, rng=jax.random.key(0))
  assert drawn.shape == got.shape and 0 < rel_err(drawn, np.asarray(got))


def test_decode_and_its_chunks_match_diffusers(reference, codec):
  z = latents(7)  # chunks of 3, 2, 2 latent frames
  want = ref_decode(reference[1], z)
  got = codec.decode(jnp.asarray(z))
  assert got.shape == want.shape == (1, 25, 32, 48, 3)
  assert rel_err(got, want) < TOL, rel_err(got, want)
  chunks = list(codec.decode_chunks(jnp.asarray(z)))
  assert [c.shape[1] for c in chunks] == [9, 8, 8]
  assert all(isinstance(c, np.ndarray) for c in chunks)
  np.testing.assert_array_equal(np.concatenate(chunks, axis=1), np.asarray(got))
  codec.decode(jnp.asarray(latents(5)))  # 3, 2: no new chunk shape
  assert codec.vae.decode_step._cache_size() == 2  # the first chunk and the steady one


def test_chunking_matters(reference, codec):
  """diffusers' frame chunking changes results (per-chunk GroupNorm statistics): the parity
  tests above would fail for a port that ran every frame at once."""
  ref = reference[1]
  x, z = video(17), latents(5)
  with torch.no_grad():
    moments = to_numpy(ref.encoder(to_torch(x))[0])
    at_once = moments[..., :LATENT] * SCALE, to_numpy(ref.decoder(to_torch(z / SCALE))[0])
  for whole, chunked in zip(at_once, (ref_encode(ref, x), ref_decode(ref, z))):
    assert rel_err(whole, chunked) > 100 * TOL, rel_err(whole, chunked)


@pytest.mark.slow  # ~45 s on 2 cores: 4 tile shapes x 2 chunk shapes compile per direction
def test_tiled_encode_and_decode_match_diffusers(reference):
  root, ref = reference
  tiled = copy.deepcopy(ref)
  tiled.enable_tiling(tile_sample_min_height=48, tile_sample_min_width=40)  # 6 x 5 latents
  codec = make_codec("cogvideox", path=root, tiling=cogvideox_vae.Tiling(48, 40))
  x, z = video(17, 64, 96), latents(5, 8, 12)  # 2 x 3 tiles both ways
  want_z, want_x = ref_encode(tiled, x), ref_decode(tiled, z)
  got_z, got_x = codec.encode(jnp.asarray(x)), codec.decode(jnp.asarray(z))
  assert got_z.shape == want_z.shape and got_x.shape == want_x.shape
  assert rel_err(got_z, want_z) < TOL, rel_err(got_z, want_z)
  assert rel_err(got_x, want_x) < TOL, rel_err(got_x, want_x)
  np.testing.assert_array_equal(
      np.concatenate(list(codec.decode_chunks(jnp.asarray(z))), axis=1), np.asarray(got_x))
  assert rel_err(ref_decode(ref, z), want_x) > 100 * TOL  # the tiles really differ from untiled


def test_uneven_tiles_are_refused(reference):
  with pytest.raises(ValueError, match="do not tile evenly"):
    make_codec("cogvideox", path=reference[0], tiling=cogvideox_vae.Tiling(32, 32))


def params(vae) -> dict:
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(vae, nnx.Param))}


def test_loads_from_root_or_vae_folder_and_sharded_bf16(reference, tmp_path):
  root, ref = reference
  a, b = params(cogvideox_vae.load_cogvideox_vae(root)), params(cogvideox_vae.load_cogvideox_vae(
      root / "vae"))
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  want = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  assert np.array_equal(a[("encoder", "conv_in", "conv", "kernel")],
                        want["encoder.conv_in.conv.weight"].transpose(2, 3, 4, 1, 0))
  assert np.array_equal(a[("decoder", "up_blocks", 0, "upsamplers", 0, "conv", "kernel")],
                        want["decoder.up_blocks.0.upsamplers.0.conv.weight"].transpose(2, 3, 1, 0))
  copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True,
                                                        max_shard_size="200KB")
  assert len(list(tmp_path.glob("*.safetensors"))) > 2
  bf16 = params(cogvideox_vae.load_cogvideox_vae(tmp_path))
  for k, v in a.items():
    rounded = torch.tensor(v).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bf16[k], rounded, err_msg=str(k))


def test_missing_folders_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such folder"):
    cogvideox_vae.load_cogvideox_vae(tmp_path / "nowhere")
  (tmp_path / "vae").mkdir()
  with pytest.raises(FileNotFoundError, match=r"vae: no config.json"):
    make_codec("cogvideox", path=tmp_path)


@pytest.mark.parametrize("edit, problem", [
    ("rename", "unmatched .*decoder.conv_out.conv.weightx.*\n.*missing: decoder.conv_out.conv.weight"),
    ("reshape", r"wrong shape: encoder.norm_out.weight .* is \(31,\), expected \(32,\)"),
])
def test_bad_checkpoint_names_the_key(reference, tmp_path, edit, problem):
  folder = tmp_path / "vae"
  shutil.copytree(reference[0] / "vae", folder)
  (file,) = folder.glob("*.safetensors")
  tensors = load_file(file)
  if edit == "rename":
    tensors["decoder.conv_out.conv.weightx"] = tensors.pop("decoder.conv_out.conv.weight")
  else:
    tensors["encoder.norm_out.weight"] = tensors["encoder.norm_out.weight"][:31]
  save_file(tensors, file)
  with pytest.raises(ValueError, match=problem):
    cogvideox_vae.load_cogvideox_vae(tmp_path)


@pytest.mark.parametrize("key, value", [
    ("use_quant_conv", True), ("act_fn", "relu"), ("latents_mean", [0.0] * LATENT),
    ("down_block_types", ["DownEncoderBlock2D"] * 4), ("norm_num_groups", 5),
    ("temporal_compression_ratio", 3),
])
def test_unsupported_config_names_the_key(reference, tmp_path, key, value):
  folder = tmp_path / "vae"
  shutil.copytree(reference[0] / "vae", folder)
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps({**config, key: value}))
  with pytest.raises(ValueError, match=f"config.json: {key}="):
    cogvideox_vae.load_cogvideox_vae(folder)


@pytest.mark.parametrize("shape, problem", [
    ((1, 16, 32, 48, 3), "num_frames T=16 must be 1 \\+ 4n"),
    ((1, 17, 30, 48, 3), "height H=30"),
    ((17, 32, 48, 3), "video must be \\[B, T, H, W, 3\\]"),
    ((1, 17, 32, 48, 4), "video must be"),
])
def test_bad_video_shapes_are_refused(codec, shape, problem):
  with pytest.raises(ValueError, match=problem):
    codec.encode(jnp.zeros(shape))


@pytest.mark.parametrize("shape", [(1, 5, 4, 6, 16), (5, 4, 6, LATENT), (1, 0, 4, 6, LATENT)])
def test_bad_latent_shapes_are_refused(codec, shape):
  for decode in (codec.decode, codec.decode_chunks):  # the generator checks before yielding
    with pytest.raises(ValueError, match="latents"):
      decode(jnp.zeros(shape))


def test_codec_layout(codec):
  assert isinstance(codec, CogVideoXCodec)
  assert (codec.latent_channels, codec.spatial_factor, codec.temporal_factor) == (LATENT, 8, 4)
  assert codec.scaling_factor == SCALE and codec.latent_shape(49, 32, 48) == (13, 4, 6, LATENT)
