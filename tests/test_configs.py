"""Stage configs as the CLI loads them: presets, stage recipe, strictness, paper model size."""

import pathlib

import jax
import numpy as np
import pytest
from absl import flags
from flax import nnx
from ml_collections import config_flags

from configs import common
from ttt_jax import optim
from ttt_jax.models import dit

REPO = pathlib.Path(__file__).resolve().parents[1]
STAGES = (3, 9, 18, 30, 63)
PRESETS = ("tiny", "paper")


def load(*args):
  """Parse `args` exactly as `python -m ttt_jax.train ...` does (a fresh flag registry)."""
  argv = ["train", *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Stage config file[:preset].",
                                  flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def _file(seconds):
  return REPO / "configs" / f"tom_jerry_{seconds}s.py"


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("seconds", STAGES)
def test_stage_configs_load_through_config_flags(seconds, preset):
  cfg = load(f"--config={_file(seconds)}:{preset}")
  assert cfg.is_locked
  assert (cfg.seconds, cfg.preset, cfg.init_from) == (seconds, preset, "")
  assert cfg.train.steps == common.STAGES[seconds][0 if preset == "paper" else 1]
  lr = cfg.optim.lr
  assert set(lr) == set(optim.GROUPS)
  assert lr.attn_qkvo > 0 and lr.ttt > 0
  if seconds == 3:  # the first stage fine-tunes everything
    assert lr.other > 0
  else:  # later stages: only attention q/k/v/o, TTT and gates
    assert lr.other == 0.0
  optim.make_optimizer(cfg.optim)  # a valid optimizer recipe
  assert cfg.model.variant == ("cogvideox-5b" if preset == "paper" else "tiny")
  assert cfg.data.height % 16 == 0 and cfg.data.width % 16 == 0


@pytest.mark.parametrize("preset", PRESETS)
def test_stages_share_data_and_model(preset):
  """init_from loads the previous stage's params: every stage must build the same model.
  Only the first stage starts from pretrained CogVideoX weights (the paper recipe)."""
  cfgs = [load(f"--config={_file(s)}:{preset}") for s in STAGES]
  model = lambda cfg: {k: v for k, v in cfg.model.to_dict().items() if k != "pretrained"}
  assert cfgs[0].model.pretrained == ("weights/cogvideox-5b-jax" if preset == "paper" else "")
  for cfg in cfgs[1:]:
    assert cfg.model.pretrained == ""
    assert model(cfg) == model(cfgs[0])
    assert cfg.data.to_dict() == cfgs[0].data.to_dict()
    assert cfg.optim.lr.to_dict() == cfgs[1].optim.lr.to_dict()


def test_paper_preset_reads_real_videos_through_the_real_encoders():
  data = load(f"--config={_file(9)}:paper").data
  assert (data.name, data.dir) == ("storyboard", "data/tom_jerry")
  assert (data.codec, data.text_encoder) == ("cogvideox", "t5")
  assert data.codec_path == data.text_encoder_path == "weights/CogVideoX-5b"
  tiny = load(f"--config={_file(9)}:tiny").data
  assert (tiny.name, tiny.codec, tiny.text_encoder, tiny.dir) == ("toy_cartoons", "toy", "toy", "")


def test_default_preset_is_paper():
  assert load(f"--config={_file(9)}").preset == "paper"


def test_overrides_from_the_command_line():
  cfg = load(f"--config={_file(9)}:tiny", "--config.train.steps=7",
             "--config.init_from=workdirs/3s", "--config.optim.lr.ttt=0.5")
  assert (cfg.train.steps, cfg.init_from, cfg.optim.lr.ttt) == (7, "workdirs/3s", 0.5)


def test_unknown_preset_raises():
  with pytest.raises(flags.IllegalFlagValueError, match="unknown config preset 'huge'"):
    load(f"--config={_file(9)}:huge")
  with pytest.raises(ValueError, match=r"choose from \('paper', 'tiny'\)"):
    common.get_config(3, "huge")


def test_unknown_keys_are_errors():
  cfg = load(f"--config={_file(3)}:tiny")
  with pytest.raises(AttributeError, match="not_a_key"):
    cfg.train.not_a_key = 1
  with pytest.raises(AttributeError, match="not_a_key"):
    cfg.not_a_key = 1
  with pytest.raises(TypeError):  # type-safe too: an int field stays an int
    cfg.train.steps = "many"
  with pytest.raises(AttributeError, match="not_a_key"):
    load(f"--config={_file(3)}:tiny", "--config.train.not_a_key=1")


def _param_counts(cfg):
  """Parameters per optimizer group of the config's model, from shapes only (no memory)."""
  model = nnx.eval_shape(lambda: dit.build(cfg.model, text_dim=cfg.data.text_dim,
                                           rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  leaves = jax.tree.leaves(params)
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  counts = dict.fromkeys(optim.GROUPS, 0)
  for x, group in zip(leaves, jax.tree.leaves(optim.param_labels(params))):
    counts[group] += int(np.prod(x.shape))
  return counts


def test_paper_model_is_cogvideox_5b_plus_ttt():
  cfg = load(f"--config={_file(63)}:paper")
  assert cfg.data.text_dim == 4096  # T5-XXL width
  counts = _param_counts(cfg)
  base = counts["other"] + counts["attn_qkvo"]
  # CogVideoX-5B's transformer: ~5.57e9 parameters (42 blocks of 132.2M plus embeddings).
  # The count is exact arithmetic; 3% leaves room only for bookkeeping differences
  # (e.g. QK-norm affine terms), not for a missing or extra layer (one block is 2.4%).
  assert abs(base - 5.57e9) < 0.03 * 5.57e9, counts
  assert counts["attn_qkvo"] == 42 * 4 * (3072 * 3072 + 3072)
  # TTT-MLP per block: q/k/v/o projections, 48 heads of a 64 -> 256 -> 64 MLP, its
  # LayerNorm, the inner learning-rate gate, the post-norm and four tanh gates.
  d, f, heads, width = 64, 256, 48, 3072
  per_block = (4 * (width * width + width) + heads * (d * f + f + f * d + d) + 2 * heads * d
               + heads * width + heads + 2 * width + 4 * width)
  assert counts["ttt"] == 42 * per_block
  print(f"paper model: {base:,} base + {counts['ttt']:,} TTT = {base + counts['ttt']:,}")


def test_tiny_model_size():
  counts = _param_counts(load(f"--config={_file(3)}:tiny"))
  assert 1e5 < sum(counts.values()) < 1e6  # minutes on a CPU


def test_chain_hands_each_stage_the_previous_one(tmp_path):
  """stages.chain: stage i starts from stage i-1's dir, the first from init_from; the inputs
  are not touched and the copies stay locked like --config= ones."""
  from ttt_jax import stages
  configs = [stages.load_stage_config(REPO / "configs", s, "tiny") for s in (3, 9, 18)]
  dirs = [tmp_path / f"{s}s" for s in (3, 9, 18)]
  chained = stages.chain(configs, dirs, init_from="base/3s")
  assert [c.init_from for c in chained] == ["base/3s", str(dirs[0]), str(dirs[1])]
  assert [c.seconds for c in chained] == [3, 9, 18] and all(c.is_locked for c in chained)
  assert all(c.init_from == "" for c in configs)
  assert stages.chain(configs[:1], dirs[:1])[0].init_from == ""
  with pytest.raises(ValueError, match="one dir per stage: 3 configs, 2 dirs"):
    stages.chain(configs, dirs[:2])
  with pytest.raises(FileNotFoundError, match="no config for the 12 s stage"):
    stages.load_stage_config(REPO / "configs", 12, "tiny")
