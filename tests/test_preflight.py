"""preflight.check: one line per problem, naming the key and the fix; memory from eval_shape."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from configs import common
from tests.conftest import small_config
from ttt_jax import curriculum, preflight, sample


def problems(cfg, purpose="train", **kw) -> list[str]:
  with pytest.raises(preflight.PreflightError) as e:
    preflight.check(cfg, purpose, **kw)
  return str(e.value).splitlines()


def test_tiny_config_passes_with_a_small_estimate():
  est = preflight.check(small_config())
  assert 0 < est.total < 2**30 and est.devices == jax.device_count()
  assert est.params > 0 and est.gradients > 0 and est.optimizer > 0 and est.activations > 0


@pytest.mark.parametrize("key,value,expect", [
    ("seconds", 10, "seconds=10: a video is whole 3-second segments"),
    ("data.name", "nope", "data.name='nope' does not exist; known datasets: toy_cartoons, "
                          "storyboard"),
    ("data.name", "storyboard", "data.dir='' holds no prepared 3 s clips; prepare it with "
                                "python -m ttt_jax.data.prepare"),
    ("data.codec", "sd", "data.codec='sd' is unknown; known: cogvideox, toy"),
    ("data.text_encoder", "t5", "data.text_encoder='t5' needs data.text_encoder_path"),
    ("data.codec_path", "/nowhere", "data.codec_path=/nowhere: no such folder"),
    ("model.attention_impl", "flash", "model.attention_impl='flash': attention impl 'flash' is "
                                      "unknown"),
    ("model.attention_impl", "splash", "model.attention_impl='splash': attention impl 'splash' "
                                       "runs on tpu only"),
    ("data.height", 40, "data.height=40 is not a multiple of 16 (codec 8x times patch 2)"),
    ("model.sequence_layer", "rwkv", "model.sequence_layer='rwkv' is unknown; choose from ttt, "
                                     "local, sliding_window"),
    ("data.width", 50, "data.width=50 is not a multiple of 16"),
    ("init_from", "/nowhere", "init_from=/nowhere: no checkpoint in /nowhere/checkpoints"),
    ("model.pretrained", "/nowhere", "model.pretrained=/nowhere: pretrained weights /nowhere do "
                                     "not exist"),
    ("mesh.data", 3, "mesh.data=3, mesh.fsdp=1, mesh.context=1, mesh.tensor=1 needs 3 devices, "
                     "have 1"),
])
def test_each_problem_is_one_line_naming_the_key(key, value, expect):
  cfg = small_config()
  with cfg.unlocked():
    node, leaf = (cfg, key) if "." not in key else (cfg[key.split(".")[0]], key.split(".")[1])
    node[leaf] = value
  lines = problems(cfg)
  assert any(line.startswith(expect) for line in lines), lines
  assert all("\n" not in line for line in lines)


def test_frozen_base_without_init_is_refused_and_init_fixes_it(tmp_path):
  cfg = small_config(9)  # later stage: optim.lr.other = 0 in the tiny preset ...
  cfg.optim.lr.other = 0.0
  [line] = problems(cfg)
  assert line.startswith("optim.lr.other=0 freezes the base weights")
  assert "--config.init_from=" in line and "ttt_jax.curriculum" in line
  cfg.init_from = str(tmp_path)  # ... a later stage names its init: only its checkpoint is missing
  [line] = problems(cfg)
  assert line.startswith(f"init_from={tmp_path}: no checkpoint")
  assert preflight.check(cfg, init_exists=False) is not None  # the curriculum's up-front check
  assert preflight.check(cfg, "sample") is not None  # sampling trains nothing


def test_paper_preset_names_its_missing_weights_and_data(tmp_path):
  cfg = common.get_config(3, "paper")
  lines = problems(cfg)
  for start in ("data.codec_path=weights/CogVideoX-5b: no such folder",
                "data.text_encoder_path=weights/CogVideoX-5b: no such folder",
                "data.dir='data/tom_jerry' holds no prepared 3 s clips "
                "(data/tom_jerry/storyboard/3s is missing); prepare it with",
                "model.pretrained=weights/cogvideox-5b-jax: "):
    assert sum(line.startswith(start) for line in lines) == 1, (start, lines)


def test_paper_preset_refused_on_this_host_with_numbers_and_the_way_out(tmp_path):
  cfg = common.get_config(3, "paper")
  cfg.model.pretrained = ""
  cfg.data.codec_path = cfg.data.text_encoder_path = str(tmp_path)
  cfg.data.dir = str(tmp_path)
  (tmp_path / "storyboard" / "3s" / "1.0.0").mkdir(parents=True)
  (tmp_path / "storyboard" / "3s" / "1.0.0" / "dataset_info.json").write_text("{}")
  lines = problems(cfg)  # only the pod-sized mesh and the memory are in the way now
  assert lines[0].startswith("mesh.data=-1, mesh.fsdp=16, mesh.context=16, mesh.tensor=1: the "
                             "fixed sizes multiply to 256, which does not divide the 1 devices")
  # The memory of what this host could run (one device), with its numbers.
  assert lines[1].startswith("paper preset, 3 s, train: ~") and "GiB per device needed" in lines[1]
  assert "params 26.9 GiB" in lines[1]  # 7.23e9 fp32 parameters
  assert f"this host has {jax.device_count()} cpu device(s)" in lines[1]
  assert "pass --force to run anyway" in lines[1]
  assert lines[-1] == preflight.PAPER_HINT
  cfg.mesh.update(dict(data=-1, fsdp=1, context=1, tensor=1))  # a mesh this host can make
  est = preflight.check(cfg, force=True)
  assert est.total > est.device_bytes


def test_memory_estimate_scales_with_the_mesh():
  """fsdp, context and tensor shard parameters, gradients and optimizer state; data and fsdp
  split the batch, context the sequence."""
  cfg = small_config()
  cfg.train.batch_size = 4
  mesh = lambda **kw: {"data": 1, "fsdp": 1, "context": 1, "tensor": 1, **kw}
  one = preflight.estimate_memory(cfg, "train", mesh())
  for axis in ("fsdp", "context", "tensor"):
    split = preflight.estimate_memory(cfg, "train", mesh(**{axis: 2}))
    np.testing.assert_allclose([split.params, split.gradients, split.optimizer],
                               [one.params / 2, one.gradients / 2, one.optimizer / 2])
  data = preflight.estimate_memory(cfg, "train", mesh(data=2))
  assert data.params == one.params and data.activations == pytest.approx(one.activations / 2)
  context = preflight.estimate_memory(cfg, "train", mesh(context=2))
  assert context.activations < 0.6 * one.activations  # half the tokens (82 -> 41) per device
  # Frozen groups have no optimizer moments.
  cfg.optim.lr.other = 0.0
  assert preflight.estimate_memory(cfg, "train", mesh()).optimizer < one.optimizer


def test_batch_and_heads_must_divide_over_the_mesh(monkeypatch):
  monkeypatch.setattr(preflight.jax, "device_count", lambda: 8)
  cfg = small_config()  # batch 2 on mesh data=-1 -> 8 devices
  [line, *_] = problems(cfg)
  assert line == ("train.batch_size=2 is not divisible by the 8 batch shards of mesh data=8 x "
                  "fsdp=1; use a multiple of 8")
  cfg.mesh.update(dict(data=1, fsdp=1, context=8, tensor=1))  # 4 tiny heads over 8
  [line, *_] = problems(cfg)
  assert line.startswith("mesh.context=8 x mesh.tensor=1 = 8 does not divide the 4 heads of "
                         "model.variant='tiny'")
  cfg.mesh.update(dict(data=2, context=4))
  assert preflight.check(cfg) is not None  # batch 2 over data=2, 4 heads over context=4
  # The sampler's own mesh: by default every device in one context group.
  with pytest.raises(preflight.PreflightError, match=r"sample.mesh.context=8 x sample.mesh"
                                                     r".tensor=1 = 8 does not divide the 4 heads"):
    preflight.check(cfg, "sample")


def test_curriculum_checks_every_stage_before_training(tmp_path):
  """A bad 9 s stage is refused before the 3 s stage spends any time."""
  configs = tmp_path / "configs"
  configs.mkdir()
  for seconds, edit in ((3, ""), (9, "  c.data.height = 40\n")):
    (configs / f"tom_jerry_{seconds}s.py").write_text(
        "from configs import common\n\n\ndef get_config(arg=None):\n"
        f"  c = common.get_config({seconds}, arg)\n{edit}  return c\n")
  with pytest.raises(preflight.PreflightError, match="data.height=40 is not a multiple of 16"):
    curriculum.run("tiny", tmp_path / "run", [3, 9], config_dir=configs)
  assert not (tmp_path / "run").exists()


def test_sampler_runs_preflight_first(tmp_path):
  cfg = small_config()
  cfg.data.width = 50
  (tmp_path / "config.json").write_text(cfg.to_json())
  with pytest.raises(preflight.PreflightError, match="data.width=50"):
    sample.sample_video(tmp_path, ["a cat", "a dog"])  # no checkpoint needed to be refused


def test_unknown_variant_and_conflicting_inits_are_named(tmp_path):
  cfg = small_config()
  cfg.model.variant = "huge"
  assert any(l.startswith("model.variant='huge' is unknown") for l in problems(cfg))
  cfg = small_config()
  cfg.model.pretrained, cfg.init_from = "/a", "/b"
  assert any(l.startswith("set one of model.pretrained (/a) and init_from (/b)")
             for l in problems(cfg))
  cfg = small_config()
  cfg.train.nonfinite = "ignore"
  assert "train.nonfinite='ignore': choose 'stop' or 'skip'" in problems(cfg)
