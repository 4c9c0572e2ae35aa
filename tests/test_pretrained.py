"""Fine-tuning from CogVideoX weights: model.pretrained in the 3 s stage.

A tiny diffusers CogVideoX with the `tiny` variant's architecture is saved,
converted with `ttt_jax.convert`, and loaded by the trainer: the model starts
as those weights plus freshly initialised TTT layers, and trains.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from flax import nnx

from tests.conftest import build_model, flat, params_of, small_config
from ttt_jax import checkpoint, convert, preflight, train
from ttt_jax.models import dit

TINY = dit.VARIANTS["tiny"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """(diffusers folder, converted folder) of a random CogVideoX shaped like `tiny`."""
  torch.manual_seed(0)
  ref = CogVideoXTransformer3DModel(
      num_attention_heads=TINY["num_heads"], attention_head_dim=TINY["width"] // TINY["num_heads"],
      num_layers=TINY["depth"], text_embed_dim=TINY["text_dim"],
      time_embed_dim=TINY["time_embed_dim"], sample_height=TINY["sample_size"][0],
      sample_width=TINY["sample_size"][1], use_rotary_positional_embeddings=True)
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.05 * torch.randn_like(p))  # zero-initialised tensors become distinguishable
  root = tmp_path_factory.mktemp("cogvideox_tiny")
  ref.save_pretrained(root / "diffusers" / "transformer", safe_serialization=True)
  out = convert.convert_cogvideox(root / "diffusers", root / "converted", progress=False)
  return root / "diffusers", out


def is_ttt(name: str) -> bool:
  return "/ttt/" in f"/{name}/"


def test_pretrained_loads_cogvideox_and_keeps_ttt_init(weights):
  src, out = weights
  cfg = small_config()
  fresh = flat(params_of(build_model(cfg)))
  model = build_model(cfg)
  convert.load_pretrained(out, model)
  got = flat(params_of(model))
  want = flat(params_of(convert.load_cogvideox(src)))  # the CogVideoX part only
  assert set(want) == {k for k in got if not is_ttt(k)}
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  ttt = [k for k in got if is_ttt(k)]
  assert ttt and all(np.array_equal(got[k], fresh[k]) for k in ttt)
  np.testing.assert_allclose(np.tanh(got["blocks/ttt/alpha_fwd_video"]), 0.1, rtol=1e-6)
  assert 0.015 < float(np.std(got["blocks/ttt/ttt/W1"])) < 0.025  # N(0, 0.02^2) fast weights


@pytest.mark.parametrize("which", [0, 1], ids=["converted", "diffusers"])
def test_first_stage_trains_from_pretrained(weights, tmp_path, which):
  path = weights[which]
  cfg = small_config(steps=2, log_every=1, ckpt_every=2)
  cfg.model.pretrained = str(path)
  result = train.train(cfg, tmp_path)
  assert np.isfinite(result["first_loss"]) and np.isfinite(result["last_loss"])
  model = build_model(cfg, seed=5)
  assert checkpoint.load_params(tmp_path, model) == 2
  trained = flat(params_of(model))
  start = flat(params_of(convert.load_cogvideox(weights[0])))
  # Two AdamW steps (lr 0, then 6e-4) move each weight by at most ~lr from CogVideoX's,
  # while a random init would be ~0.05 away.
  moved = {k: float(np.abs(trained[k] - v).max()) for k, v in start.items()}
  assert max(moved.values()) < 2e-3 and max(moved.values()) > 0, moved


def test_mismatched_variant_and_bad_paths_are_refused(weights, tmp_path):
  _, out = weights
  cfg = small_config()
  other = dit.VideoDiT(**{**TINY, "depth": 3}, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"do not fit this model .*depth: model 3, weights 2"):
    convert.load_pretrained(out, other)
  convert.load_pretrained(out, build_model(cfg))  # the matching one loads
  cfg.model.pretrained = str(tmp_path / "missing")
  with pytest.raises(preflight.PreflightError, match="missing do not exist"):
    train.train(cfg, tmp_path / "run")
  assert not (tmp_path / "run" / "data").exists()  # refused before any data work
  cfg.model.pretrained, cfg.init_from = str(out), str(tmp_path)
  with pytest.raises(ValueError, match="set one of model.pretrained"):
    train.train(cfg, tmp_path / "run")
