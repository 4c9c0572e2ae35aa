"""The video comparison: configs per variant, scores, the controls' reach, and a whole run."""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from ttt_jax import evaluate as ev
from ttt_jax.data import toy_cartoons, toy_probe
from ttt_jax.diffusion import TimestepDistribution
from ttt_jax.evaluation import report
from ttt_jax.evaluation import video
from ttt_jax.evaluation import video_scores as vs
from ttt_jax.models import dit


def _preset(name="ci", **changes):
  config = ev.load_preset("video", name)
  with config.unlocked():
    for key, value in changes.items():
      *parents, leaf = key.split(".")
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def test_presets_load_and_bad_input_is_named(tmp_path):
  ci, full = _preset("ci"), _preset("full")
  assert {"local", "full_attention", "oracle"} <= set(ci.variants)
  assert set(full.variants) == set(video.VARIANTS)
  assert ev.load_preset("video", "full", seeds=["3", "4"]).seeds == (3, 4)
  with pytest.raises(ValueError, match="unknown video evaluation preset 'huge'"):
    ev.load_preset("video", "huge")
  with pytest.raises(ValueError, match="unknown task 'audio'"):
    ev.load_preset("audio", "ci")
  with pytest.raises(ValueError, match=r"unknown variants \['rwkv'\]"):
    video.check(_preset(variants=("local", "rwkv")))
  with pytest.raises(ValueError, match=r"no steps for the \[9\] s stages"):
    video.check(_preset(**{"stage.steps": {18: 3}}))
  with pytest.raises(ValueError, match="unknown variant 'rwkv'"):
    video.stage_config(ci, "rwkv", 0, 9, tmp_path, first=True)


def test_stage_configs_differ_only_in_the_global_slot(tmp_path):
  preset = _preset("full")
  c = video.stage_config(preset, "ttt_linear", 2, 18, tmp_path, first=False)
  assert (c.model.sequence_layer, c.model.ttt.inner) == ("ttt", "linear")
  assert (c.seed, c.seconds, c.model.variant) == (2, 18, preset.model)
  assert (c.data.height, c.data.width, c.data.dir) == (32, 48, str(tmp_path))
  assert c.data.paints.split(",") == list(toy_cartoons.PAINTS) and not c.data.restate_paint
  assert c.train.steps == preset.stage.steps[18] and c.train.batch_size == preset.stage.batch
  assert dict(c.optim.lr) == dict(preset.stage.lr) and c.optim.lr.other == 0.0
  assert dict(c.diffusion.timesteps) == dict(preset.stage.timesteps)
  assert not c.init_new_layers
  # One segment of this frame size: 32 text tokens and 12 frames of 2x3 tokens.
  assert c.model.baselines.sliding_window.window == c.model.baselines.lact.chunk_size == 104
  assert video.stage_config(preset, "mamba2", 0, 9, tmp_path, first=True).init_new_layers
  oracle = video.stage_config(preset, "oracle", 0, 9, tmp_path, first=True)
  assert oracle.model.sequence_layer == "local" and oracle.data.restate_paint
  def without_slot(variant):
    d = video.stage_config(preset, variant, 0, 9, tmp_path, first=False).to_dict()
    d["model"].pop("sequence_layer"), d["model"]["ttt"].pop("inner")
    d["data"].pop("restate_paint")
    return d

  for variant in video.VARIANTS:
    assert without_slot(variant) == without_slot("local"), variant
  b = video.base_config(preset, tmp_path)
  assert (b.seconds, b.model.sequence_layer, b.train.steps) == (3, "local", preset.base.steps)
  assert set(b.optim.lr.values()) == {preset.base.lr}


def test_swapped_paints_are_a_deterministic_derangement():
  data = _preset().data
  videos = vs.heldout_videos(data, 9, 24)
  paints = data.paints.split(",")
  swapped = [vs.swapped_paint(v, i, paints) for i, v in enumerate(videos)]
  for video_, (wall, floor), i in zip(videos, swapped, range(24)):
    truth = toy_probe.caption_paint(video_)
    assert wall != truth[0] and floor != truth[1] and wall != floor
    assert vs.swapped_paint(video_, i, paints) == (wall, floor)
  assert len(set(swapped)) > 8
  for v, s in zip(videos, vs.swapped_videos(videos, paints)):
    assert s.frames is v.frames and s.captions[1:] == v.captions[1:]
    assert s.captions[0] != v.captions[0]


def test_beyond_reach():
  assert list(vs.beyond_reach(3, 2)) == [2]
  assert list(vs.beyond_reach(21, 4)) == list(range(4, 21))
  assert not len(vs.beyond_reach(3, 4))


def test_memory_signal_is_the_share_over_each_timestep_law():
  """A stand-in model whose loss is 1 everywhere and whose swap gain is 1 for t >= 900, 0
  below: the share is P(t >= 900), by hand 0.1 for uniform t and 1 - 0.9 / (3 - 2 * 0.9) =
  0.25 for shift 3."""
  swapped = [object()]
  loss_fn = lambda videos, ts: np.array([1.0 + float(videos is swapped and ts[0] >= 900)])
  out = vs.memory_signal(loss_fn, [object()], swapped,
                         {"uniform": TimestepDistribution(),
                          "shift3": TimestepDistribution("shifted", shift=3.0)}, 1000)
  assert out["memory_share_uniform"] == pytest.approx(0.1, abs=1e-12)
  assert out["memory_share_shift3"] == pytest.approx(0.25, abs=1e-12)


def test_probe_scores_and_their_lift_over_other_storyboards():
  """Ground truth shows its own paint everywhere: consistency 1, lifted by 1 minus the
  chance agreement; another storyboard's frames are not lifted on average."""
  data = _preset().data
  videos = vs.heldout_videos(data, 9, 8)
  chance = vs.chance_paints(data)
  assert len(chance) == vs.CHANCE_STORYBOARDS
  own = vs.probe_video(videos[0].frames, videos[0], 2, data)
  truth = toy_probe.caption_paint(videos[0])
  agree = np.mean([(a == truth[0]) / 2 + (b == truth[1]) / 2 for a, b in chance])
  assert own["consistency"] == own["first_segment"] == 1.0
  assert own["consistency_lift"] == pytest.approx(1.0 - agree)
  others = [vs.probe_video(videos[(i + 1) % 8].frames, videos[i], 2, data)["consistency_lift"]
            for i in range(8)]
  assert abs(np.mean(others)) < 0.2 < own["consistency_lift"]
  assert set(vs.probe_video(videos[0].frames, videos[0], 4, data)) == {
      "first_segment", "first_segment_lift"}  # nothing beyond a 4-block DiT's reach at 9 s


def _random_model(config):
  """The config's DiT with every parameter drawn at random (zero-initialised gates and output
  layers included, so the text reaches the prediction from the first step)."""
  model = dit.build(config.model, text_dim=config.data.text_dim, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [
      0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))
  return model


def test_swap_gains_reach_as_far_as_the_layer_does(tmp_path):
  """Swap gains of a random tiny DiT (2 blocks) at 9 s: local attention alone carries the
  first caption into the second segment through their boundary frame and never beyond, so
  its gain there is exactly 0 (the negative control); full attention, and local attention
  reading storyboards that restate the paint (the oracle), reach every segment."""
  preset = _preset()
  gains = {}
  for variant in ("local", "full_attention", "oracle"):
    config = video.stage_config(preset, variant, 0, 9, tmp_path, first=True)
    videos = vs.heldout_videos(config.data, 9, 2)
    loss_fn = vs.segment_loss_fn(config, _random_model(config))
    loss, gains[variant] = vs.swap_gains(loss_fn, videos,
                                         vs.swapped_videos(videos, config.data.paints.split(",")),
                                         (900,))  # [3]
    # Deterministic: the same loss twice.
    np.testing.assert_array_equal(loss_fn(videos, (900,)), loss)
  assert gains["local"][0] != 0.0 and gains["local"][1] != 0.0
  assert gains["local"][2] == 0.0
  assert np.all(gains["full_attention"] != 0.0) and np.all(gains["oracle"] != 0.0)


def _eval(root, variant, seed, seconds, **scores):
  run = root / "runs" / variant / f"seed{seed}" / f"{seconds}s"
  run.mkdir(parents=True, exist_ok=True)
  (run / "eval.json").write_text(json.dumps(scores))


def test_collect_controls_and_placement(tmp_path):
  """Rows from finished runs' eval.json (seeds' mean and t-interval; missing runs left
  out, not zero-filled), the verdict on the controls, and where a variant sits."""
  preset = _preset(variants=("local", "full_attention", "ttt_mlp", "oracle"))
  (tmp_path / "probe_validation_9s.json").write_text(json.dumps(
      {"ground_truth": {"consistency": 1.0, "change_detected": 0.0}}))
  for seed, g in zip((0, 1, 2), (0.4, 0.5, 0.6)):
    _eval(tmp_path, "full_attention", seed, 9, swap_gain_later=g, swap_gain_first=1.0)
    _eval(tmp_path, "local", seed, 9, swap_gain_later=0.0, swap_gain_first=1.0)
    _eval(tmp_path, "ttt_mlp", seed, 9, swap_gain_later=g / 4, swap_gain_first=1.0)
  rows = video.collect(preset, tmp_path)
  index = {(r["variant"], r["metric"]): r for r in rows}
  full = index[("full_attention", "swap_gain_later")]
  assert full["n_seeds"] == 3 and full["mean"] == pytest.approx(0.5)
  assert full["ci_high"] - 0.5 == pytest.approx(4.3027 * 0.1 / math.sqrt(3), rel=1e-4)
  assert index[("ground_truth", "consistency")]["n_seeds"] == 0
  assert not any(v == "oracle" for v, _ in index)
  verdict = "\n".join(video.controls_verdict(rows, 9))
  assert "controls SEPARATE" in verdict and "holds 0" in verdict and "above 0" in verdict
  placed = video.placement(rows, 9, "swap_gain_later")
  assert placed["local"] == 0.0 and placed["full_attention"] == 1.0
  assert placed["ttt_mlp"] == pytest.approx(0.25)
  _eval(tmp_path, "full_attention", 1, 9, swap_gain_later=-0.5, swap_gain_first=1.0)
  assert "DO NOT separate" in "\n".join(video.controls_verdict(video.collect(preset, tmp_path), 9))


@pytest.mark.slow  # ~3-4 min: a base and three variants trained, sampled and scored
def test_a_small_comparison_writes_results_and_resumes(tmp_path):
  preset = _preset(**{"base.steps": 4, "stage.steps": {9: 3}, "seeds": (0,),
                      "score.heldout": 2, "score.sampled": 1, "score.sample_steps": 2,
                      "variants": ("local", "ttt_mlp", "oracle")})
  rows = ev.run("video", preset, tmp_path)
  assert json.loads((tmp_path / "results.json").read_text()) == rows
  keys = ["task", "variant", "seconds", "metric", "mean", "ci_low", "ci_high", "n_seeds"]
  assert all(list(r) == keys and r["task"] == "video" for r in rows)
  got = {(r["variant"], r["metric"]): r for r in rows}
  for variant in preset.variants:
    for metric in ("consistency", "consistency_lift", "swap_gain_later", "swap_gain_first",
                   "loss_last_segment", "loss_segment_02", "params", "train_flops_per_step"):
      row = got[(variant, metric)]
      assert row["n_seeds"] == 1 and row["ci_low"] is None and math.isfinite(row["mean"]), row
    assert 0.0 <= got[(variant, "consistency")]["mean"] <= 1.0
  assert got[("local", "swap_gain_later")]["mean"] == 0.0  # beyond reach, by construction
  assert got[("ttt_mlp", "params")]["mean"] > got[("local", "params")]["mean"]
  assert got[("ground_truth", "consistency")]["mean"] == 1.0
  assert got[("repainted", "change_detected")]["mean"] == 1.0
  for metric in ("memory_share_uniform", "memory_share_stage", "train_s"):
    assert got[("base", metric)]["n_seeds"] == 0
  for variant in preset.variants:  # every variant starts from the shared base, slot fresh
    config = json.loads((tmp_path / "runs" / variant / "seed0/9s/config.json").read_text())
    assert config["init_from"] == str(tmp_path / "runs/base/3s") and config["init_new_layers"]
  md = (tmp_path / "results.md").read_text()
  assert "one shared base" in md and "| ttt_mlp |" in md and "Controls:" in md
  for png in ("consistency.png", "swap_gain_by_segment.png",
              "runs/ttt_mlp/seed0/9s/sample_strip.png"):
    assert (tmp_path / png).stat().st_size > 1000, png

  # A rerun finds every run finished: nothing is trained or scored again.
  evals = sorted(tmp_path.glob("runs/*/*/*/eval.json"))
  stamps = [p.stat().st_mtime_ns for p in evals]
  assert ev.run("video", preset, tmp_path) == rows
  assert [p.stat().st_mtime_ns for p in evals] == stamps

  # A run whose eval.json lacks a group of metrics gets just that group computed again, the
  # same as before; what it holds, sampled scores included, is kept.
  path = tmp_path / "runs/ttt_mlp/seed0/9s/eval.json"
  full = json.loads(path.read_text())
  partial = {k: v for k, v in full.items() if not k.startswith("swap_gain")}
  partial["consistency"] = -1.0  # a marker: kept, not sampled again
  path.write_text(json.dumps(partial))
  ev.run("video", preset, tmp_path)
  assert json.loads(path.read_text()) == {**full, "consistency": -1.0}
  # Other tasks' rows in results.json are kept.
  other = report.fixed_row("recall", "mamba2", "accuracy", 0.5, seq_len=64, pairs=4)
  report.write_json(rows + [other], tmp_path / "results.json")
  ev.run("video", preset, tmp_path)
  assert other in json.loads((tmp_path / "results.json").read_text())
