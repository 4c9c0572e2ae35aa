"""VideoDiT (sequence_layer="local") == diffusers' CogVideoXTransformer3DModel, through the converter.

The references are diffusers itself, built from tiny random configs in the
test (no network): its transformer, its attention block, and the RoPE tables
of the CogVideoX pipeline's own `_prepare_rotary_positional_embeddings`
(called on a stand-in pipeline object). Weights go diffusers -> safetensors
folder -> `ttt_jax.convert`; every parameter is randomised first (norm
affines and zero-initialised heads included), so a missed or mis-mapped
tensor shows. Tolerance: 1e-4 relative to the output's max in fp32; the
measured error is ~1e-6 (only summation order differs).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
from flax import nnx
from safetensors.numpy import load_file, save_file

from ttt_jax import convert
from ttt_jax.layers.attention import LocalSelfAttention
from ttt_jax.layers.rope import crop_region_grid
from ttt_jax.layout import VideoLayout

RTOL = 1e-4

# Two tiny CogVideoX configs: A runs at its native resolution, B away from it
# (fractional RoPE positions from the crop-region grid).
CONFIGS = {
    "native": dict(num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=8,
                   time_embed_dim=32, text_embed_dim=24, num_layers=2, sample_height=8,
                   sample_width=12, use_rotary_positional_embeddings=True),
    "non_native": dict(num_attention_heads=2, attention_head_dim=32, in_channels=16,
                       out_channels=16, time_embed_dim=48, text_embed_dim=40, num_layers=3,
                       sample_height=12, sample_width=16, use_rotary_positional_embeddings=True),
}
LATENT_HW = {"native": (8, 12), "non_native": (8, 12)}


def randomize(module: torch.nn.Module, seed: int = 0) -> None:
  """Every parameter ~ N(0, 0.2^2) (norm weights around 1), so all of them matter."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
      p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.2 * noise)


def make_transformer(name: str) -> CogVideoXTransformer3DModel:
  torch.manual_seed(0)
  model = CogVideoXTransformer3DModel(**CONFIGS[name]).eval()
  randomize(model)
  return model


def pipeline_rope(model, latent_h: int, latent_w: int, frames: int):
  """(cos, sin) exactly as CogVideoXPipeline builds them for this transformer."""
  stand_in = types.SimpleNamespace(vae_scale_factor_spatial=8, transformer=model)
  return CogVideoXPipeline._prepare_rotary_positional_embeddings(
      stand_in, height=8 * latent_h, width=8 * latent_w, num_frames=frames, device="cpu")


def diffusers_forward(model, latents, text, t):
  """Ours is [B, T, h, w, C]; diffusers' hidden_states are [B, T, C, h, w]."""
  B, T, h, w, C = latents.shape
  rope = pipeline_rope(model, h, w, T)
  with torch.no_grad():
    out = model(hidden_states=torch.from_numpy(latents).permute(0, 1, 4, 2, 3),
                encoder_hidden_states=torch.from_numpy(text), timestep=torch.from_numpy(t),
                image_rotary_emb=rope, return_dict=False)[0]
  return out.permute(0, 1, 3, 4, 2).numpy()


def inputs(name: str, B: int = 2, T: int = 13, text_len: int = 6, seed: int = 0):
  cfg, (h, w) = CONFIGS[name], LATENT_HW[name]
  rng = np.random.default_rng(seed)
  latents = rng.standard_normal((B, T, h, w, cfg["in_channels"])).astype(np.float32)
  text = rng.standard_normal((B, text_len, cfg["text_embed_dim"])).astype(np.float32)
  t = np.array([17.0, 803.0][:B], np.float32)
  return latents, text, t


def rel_err(a, b) -> float:
  return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
  """(config name, diffusers model, pipeline-root folder holding transformer/)."""
  name = request.param
  model = make_transformer(name)
  root = tmp_path_factory.mktemp(f"cogvideox_{name}")
  model.save_pretrained(root / "transformer", safe_serialization=True)
  return name, model, root


# --------------------------------------------------------------- the DiT ----
def test_one_segment_matches_diffusers(saved):
  name, ref, root = saved
  ours = convert.load_cogvideox(root)
  latents, text, t = inputs(name)
  B, T, h, w, _ = latents.shape
  layout = VideoLayout(text_lens=(text.shape[1],), segment_frames=(T,), height=h // 2, width=w // 2)
  got = ours(jnp.asarray(latents), jnp.asarray(text), jnp.asarray(t), layout)
  want = diffusers_forward(ref, latents, text, t)
  assert got.shape == want.shape
  assert np.abs(want).max() > 0.1  # randomised heads: a non-trivial output
  print(f"{name}: relative error {rel_err(got, want):.2e}")
  assert rel_err(got, want) < RTOL


@pytest.mark.parametrize("grid,base", [((4, 6), (4, 6)), ((4, 6), (6, 8)), ((4, 6), (8, 8)),
                                       ((30, 45), (30, 45)), ((60, 40), (30, 45))])
def test_crop_region_grid_matches_the_pipelines(grid, base):
  """Our crop-region positions == diffusers' get_resize_crop_region_for_grid + linspace grid;
  the non-native cases are fractional or offset, so integer positions would be wrong."""
  (top, left), (bottom, right) = get_resize_crop_region_for_grid(grid, base[1], base[0])
  h, w = crop_region_grid(grid, base)
  np.testing.assert_array_equal(h, np.linspace(top, bottom * (grid[0] - 1) / grid[0], grid[0],
                                               dtype=np.float32))
  np.testing.assert_array_equal(w, np.linspace(left, right * (grid[1] - 1) / grid[1], grid[1],
                                               dtype=np.float32))
  native = grid == base
  assert native == (np.array_equal(h, np.arange(grid[0])) and np.array_equal(w, np.arange(grid[1])))


def test_sharded_checkpoint_loads_the_same(saved, tmp_path):
  name, ref, root = saved
  ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  assert len(list(tmp_path.glob("*.safetensors"))) > 2 and list(tmp_path.glob("*.index.json"))
  a = nnx.to_pure_dict(nnx.state(convert.load_cogvideox(root), nnx.Param))
  b = nnx.to_pure_dict(nnx.state(convert.load_cogvideox(tmp_path), nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ------------------------------------------------------ local attention ----
def copy_attention(block: CogVideoXBlock, ours: LocalSelfAttention) -> None:
  """The hand mapping of one attention block (independent of ttt_jax.convert)."""
  a = block.attn1
  for mine, theirs in (("to_q", a.to_q), ("to_k", a.to_k), ("to_v", a.to_v), ("to_out", a.to_out[0])):
    getattr(ours, mine).kernel[...] = jnp.asarray(theirs.weight.detach().numpy().T)
    getattr(ours, mine).bias[...] = jnp.asarray(theirs.bias.detach().numpy())
  for mine, theirs in (("norm_q", a.norm_q), ("norm_k", a.norm_k)):
    getattr(ours, mine).scale[...] = jnp.asarray(theirs.weight.detach().numpy())
    getattr(ours, mine).bias[...] = jnp.asarray(theirs.bias.detach().numpy())


@pytest.mark.parametrize("base", [(4, 6), (6, 8), (8, 8)], ids=["native", "fractional", "offset"])
def test_each_window_is_cogvideox_attention_on_its_tokens(base):
  """Several segments: window i = [text_i; last frame of segment i-1; frames of segment i]
  gets what CogVideoX's attention gives on those tokens alone (time from 0, h/w on the
  crop-region grid of the pre-training size); a boundary frame gets the mean of its two.
  "offset" starts the h grid at 2, so rotating the captions (position 0 elsewhere) would show."""
  heads, hd, gh, gw = 2, 16, 4, 6
  D = heads * hd
  torch.manual_seed(1)
  block = CogVideoXBlock(dim=D, num_attention_heads=heads, attention_head_dim=hd,
                         time_embed_dim=8, attention_bias=True).eval()
  randomize(block, seed=3)
  ours = LocalSelfAttention(D, heads, rope_base_grid=base, rngs=nnx.Rngs(0))
  copy_attention(block, ours)
  sample = types.SimpleNamespace(config=types.SimpleNamespace(
      patch_size=2, patch_size_t=None, sample_height=2 * base[0], sample_width=2 * base[1],
      attention_head_dim=hd))

  text_lens, seg_frames = (3, 2, 4), (3, 2, 2)
  layout = VideoLayout(text_lens, seg_frames, height=gh, width=gw)
  x = np.random.default_rng(0).standard_normal((1, layout.seq_len, D)).astype(np.float32)
  got = np.asarray(ours(jnp.asarray(x), layout))

  P, n_text = gh * gw, sum(text_lens)
  total = np.zeros_like(x)
  count = np.zeros(layout.seq_len)
  t0, f0 = 0, 0
  for i, (n_t, n_f) in enumerate(zip(text_lens, seg_frames)):
    text_ids = np.arange(t0, t0 + n_t)
    first = f0 - (1 if i else 0)  # the previous segment's last frame joins window i
    video_ids = n_text + np.arange(first * P, (f0 + n_f) * P)
    frames = len(video_ids) // P
    rope = pipeline_rope(sample, 2 * gh, 2 * gw, frames)  # latent size = 2 x token grid
    with torch.no_grad():
      v_out, t_out = block.attn1(hidden_states=torch.from_numpy(x[:, video_ids]),
                                 encoder_hidden_states=torch.from_numpy(x[:, text_ids]),
                                 image_rotary_emb=rope)
    total[:, text_ids] += t_out.numpy()
    total[:, video_ids] += v_out.numpy()
    count[text_ids] += 1
    count[video_ids] += 1
    t0, f0 = t0 + n_t, f0 + n_f
  assert count.max() == 2 and count.min() == 1
  want = total / count[None, :, None]
  assert rel_err(got, want) < RTOL


# ------------------------------------------------------------ converter ----
def test_convert_cli_writes_an_orbax_checkpoint_that_loads(saved, tmp_path):
  name, ref, root = saved
  out = tmp_path / "converted"
  proc = subprocess.run([sys.executable, "-m", "ttt_jax.convert", "cogvideox",
                         f"--src={root / 'transformer'}", f"--dst={out}"],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"converted": str(out)}
  meta = json.loads((out / convert.MODEL_JSON).read_text())
  assert meta["architecture"]["depth"] == CONFIGS[name]["num_layers"]
  assert not list(tmp_path.glob(".converted.tmp-*"))  # the temporary folder was renamed
  # Stored in the scanned layout.
  with ocp.StandardCheckpointer() as c:
    tree = c.metadata(out / convert.PARAMS_DIR).item_metadata.tree
  assert tree["blocks"]["attn"]["to_q"]["kernel"].shape[0] == CONFIGS[name]["num_layers"]
  a = nnx.to_pure_dict(nnx.state(convert.load_cogvideox(out), nnx.Param))
  b = nnx.to_pure_dict(nnx.state(convert.load_cogvideox(root), nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _tamper(root: pathlib.Path, dst: pathlib.Path, edit) -> pathlib.Path:
  files = list((root / "transformer").glob("*.safetensors"))
  tensors = {k: v for f in files for k, v in load_file(f).items()}
  edit(tensors)
  dst.mkdir()
  save_file(tensors, dst / "diffusion_pytorch_model.safetensors")
  (dst / "config.json").write_text((root / "transformer" / "config.json").read_text())
  return dst


def test_bad_keys_are_all_named(saved, tmp_path):
  name, _, root = saved

  def edit(t):
    t["transformer_blocks.0.attn1.to_q.weight"] = t["transformer_blocks.0.attn1.to_q.weight"][:, :-1]
    del t["norm_out.norm.weight"]
    del t["transformer_blocks.1.ff.net.2.bias"]
    t["extra.layer.weight"] = np.zeros(3, np.float32)

  bad = _tamper(root, tmp_path / "bad", edit)
  with pytest.raises(ValueError) as e:
    convert.load_cogvideox(bad)
  msg = str(e.value)
  assert "4 bad key(s)" in msg
  for key in ("wrong shape: transformer_blocks.0.attn1.to_q.weight", "missing: norm_out.norm.weight",
              "missing: transformer_blocks.1.ff.net.2.bias", "unmatched (not a parameter of this "
              "CogVideoX config): extra.layer.weight"):
    assert key in msg, msg


def test_unsupported_configs_and_folders_are_refused(saved, tmp_path):
  name, _, root = saved
  cfg = json.loads((root / "transformer" / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**cfg, "use_rotary_positional_embeddings": False,
                                                    "patch_size_t": 2}))
  with pytest.raises(ValueError, match=r"use_rotary_positional_embeddings=False.*patch_size_t=2"):
    convert.read_diffusers_config(tmp_path)
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json in it or in"):
    convert.load_cogvideox(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="nowhere do not exist"):
    convert.load_cogvideox(tmp_path / "nowhere")
  with pytest.raises(ValueError, match="cannot be overridden"):
    convert.load_cogvideox(root, width=8)
