"""python -m ttt_jax.evaluate: configs per variant, the statistics, and a whole small run."""

import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from ttt_jax import evaluate as ev


def test_interval_is_the_t_interval_over_seeds():
  """mean ± t(0.975, n-1) s / sqrt(n); t(0.975, 2) = 4.3027 from the printed t-table."""
  mean, lo, hi = ev.interval([1.0, 2.0, 3.0])
  assert mean == 2.0
  assert hi - mean == pytest.approx(4.3027 * 1.0 / math.sqrt(3), rel=1e-4)
  assert mean - lo == pytest.approx(hi - mean)
  assert ev.interval([0.5]) == (0.5, None, None)  # one seed: no interval claimed


def test_stage_config_sets_the_variant_and_the_evaluation_setting(tmp_path):
  preset = ev.PRESETS["full"]
  c = ev.stage_config(preset, "ttt_linear", 2, 18, "prev/9s", tmp_path)
  assert (c.model.sequence_layer, c.model.ttt.inner) == ("ttt", "linear")
  assert (c.seed, c.init_from, c.seconds) == (2, "prev/9s", 18)
  assert (c.data.height, c.data.width, c.data.dir) == (preset.height, preset.width,
                                                       str(tmp_path))
  assert c.data.colours.split(",") == list(ev.EVAL_COLOURS)
  assert c.train.steps == preset.steps[18] and c.train.batch_size == preset.batch
  assert c.model.variant == preset.model == "small"
  assert (c.sample.steps, c.sample.sampler, c.sample.guidance_scale) == (
      preset.sample_steps, "dpmpp_2m", 1.0)
  assert not c.init_new_layers
  first = ev.stage_config(preset, "mamba2", 0, 3, "runs/base/3s", tmp_path)
  assert first.model.sequence_layer == "mamba2"
  assert first.init_new_layers  # the 3 s stage adds the global layer to the base
  # Every variant at one length differs only in the global slot: same steps, batch, widths.
  base = ev.stage_config(preset, "local", 0, 9, "", tmp_path).to_dict()
  for variant in ev.VARIANTS:
    other = ev.stage_config(preset, variant, 0, 9, "", tmp_path).to_dict()
    other["model"].pop("sequence_layer"), other["model"]["ttt"].pop("inner")
    want = dict(base, model={k: v for k, v in base["model"].items() if k != "sequence_layer"})
    want["model"]["ttt"] = {k: v for k, v in base["model"]["ttt"].items() if k != "inner"}
    assert other == want, variant
  # Full attention stops at 18 s (the cost reference at short lengths); the rest go to 63 s.
  assert preset.lengths("full_attention") == (9, 18) and preset.lengths("ttt_mlp") == (9, 18, 63)
  with pytest.raises(ValueError, match="unknown variant 'rwkv'"):
    ev.stage_config(preset, "rwkv", 0, 9, "", tmp_path)
  with pytest.raises(ValueError, match="unknown preset 'huge'"):
    ev.run("huge", tmp_path)
  with pytest.raises(ValueError, match=r"unknown variants \['rwkv'\]"):
    ev.run("ci", tmp_path, ("local", "rwkv"))


def test_consistency_lift_is_over_other_storyboards_captions():
  """Lift = F1 vs the own first caption minus the mean F1 vs 64 other storyboards' captions:
  ground truth is lifted by 1 - chance; another storyboard's video is not lifted."""
  from ttt_jax.data import toy_cartoons, toy_probe
  chance = ev.chance_captions()
  assert len(chance) == ev.CHANCE_STORYBOARDS
  cfg = toy_cartoons.ToyCartoonConfig(seconds=6, height=64, width=96, seed=7, num_videos=6,
                                      colours=ev.EVAL_COLOURS)
  videos = [toy_cartoons.generate_video(cfg, i) for i in range(6)]
  own = ev.probe_video(videos[0].frames, videos[0], chance)
  want = toy_probe.caption_colours(videos[0])
  f1 = lambda a, b: 2 * len(a & b) / (len(a) + len(b))
  assert own["consistency"] == 1.0
  assert own["consistency_lift"] == pytest.approx(1.0 - sum(f1(want, c) for c in chance) / 64)
  assert own["consistency_lift"] > 0.4
  swapped = [ev.probe_video(videos[(i + 1) % 6].frames, videos[i], chance)["consistency_lift"]
             for i in range(6)]
  assert sum(swapped) / 6 < 0.15 < own["consistency_lift"]


def test_swapped_colours_are_a_deterministic_derangement():
  """Every character gets another evaluation colour than its own, all distinct, the same
  for the same held-out index (so every run is scored on the same counterfactuals)."""
  videos = ev.heldout_videos(dataclasses.replace(ev.PRESETS["ci"], heldout=16), 9)
  for i, video in enumerate(videos):
    truth = [c["colour"] for c in video.attributes["characters"]]
    colours = ev.swapped_colours(video, i)
    assert len(set(colours)) == len(truth) and set(colours) <= set(ev.EVAL_COLOURS)
    assert all(a != b for a, b in zip(colours, truth))
    assert ev.swapped_colours(video, i) == colours
  assert len({tuple(ev.swapped_colours(v, i)) for i, v in enumerate(videos)}) > 4


def _random_model(config):
  """The config's DiT with every parameter drawn at random (zero-initialised gates and output
  layers included, so the text reaches the prediction from the first step)."""
  from flax import nnx
  from ttt_jax.models import dit
  model = dit.build(config.model, text_dim=config.data.text_dim, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [
      0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))
  return model


def test_swap_gains_reach_as_far_as_the_layer_does(tmp_path):
  """Caption-swap gains of a random tiny DiT (2 blocks) at 9 s: with local attention alone the
  first caption reaches the second segment through their boundary frame (one block to get into
  it, one to get out), and never the third; full attention reaches every segment."""
  preset = ev.PRESETS["ci"]
  videos = ev.heldout_videos(dataclasses.replace(preset, heldout=2), 9)
  gains = {}
  for variant in ("local", "full_attention"):
    config = ev.stage_config(preset, variant, 0, 9, "", tmp_path)
    loss_fn = ev.segment_loss_fn(config, _random_model(config))
    gains[variant] = ev.swap_gains(loss_fn, videos, preset.swap_timesteps)  # [3]
    # Deterministic: the same loss twice; only the first caption differs between the two.
    np.testing.assert_array_equal(loss_fn(videos, (900,)), loss_fn(videos, (900,)))
  assert gains["local"][0] != 0.0 and gains["local"][1] != 0.0
  assert gains["local"][2] == 0.0
  assert np.all(gains["full_attention"] != 0.0)


def test_collect_aggregates_seeds_and_reports_the_probe_check(tmp_path):
  """results.json rows from finished runs' eval.json: one row per (variant, seconds, metric)
  with the seeds' mean and t-interval; missing runs are left out, not zero-filled."""
  preset = dataclasses.replace(ev.PRESETS["ci"], variants=("local", "ttt_mlp"), seeds=(0, 1, 2))
  (tmp_path / "probe_validation_9s.json").write_text(json.dumps(
      {"ground_truth": {"consistency": 1.0, "change_detected": 0.0},
       "recoloured": {"consistency": 0.6, "change_detected": 1.0}}))
  for seed, value in ((0, 0.2), (1, 0.4), (2, 0.6)):
    run = tmp_path / "runs" / "ttt_mlp" / f"seed{seed}" / "9s"
    run.mkdir(parents=True)
    (run / "eval.json").write_text(json.dumps({"consistency": value, "params": 5.0}))
  rows = {(r["variant"], r["metric"]): r for r in ev.collect(preset, tmp_path)}
  row = rows[("ttt_mlp", "consistency")]
  assert row["n_seeds"] == 3 and row["mean"] == pytest.approx(0.4)
  assert row["ci_high"] - 0.4 == pytest.approx(4.3027 * 0.2 / math.sqrt(3), rel=1e-4)
  assert rows[("ttt_mlp", "params")]["ci_low"] == pytest.approx(5.0)
  assert rows[("recoloured", "change_detected")]["mean"] == 1.0
  assert not any(v == "local" for v, _ in rows)  # no finished run, no row


@pytest.mark.slow  # ~2-3 min: two variants trained, sampled and scored at 9 s
def test_a_small_comparison_writes_results_and_resumes(tmp_path):
  """The whole pipeline for one seed (several seeds: test_collect_aggregates_seeds...)."""
  preset = dataclasses.replace(ev.PRESETS["ci"], base_steps=3, steps={3: 2, 9: 2}, seeds=(0,),
                               heldout=1,
                               sample_steps=2, variants=("local", "ttt_mlp"))
  rows = ev.run(preset, tmp_path)
  assert json.loads((tmp_path / "results.json").read_text()) == rows
  keys = {"variant", "seconds", "metric", "mean", "ci_low", "ci_high", "n_seeds"}
  assert all(set(r) == keys for r in rows)
  got = {(r["variant"], r["metric"]): r for r in rows}
  for variant in preset.variants:
    for metric in ("consistency", "self_consistency", "loss_first_segment",
                   "loss_last_segment", "loss_segment_02", "params", "train_flops_per_step"):
      row = got[(variant, metric)]
      assert row["n_seeds"] == 1 and row["ci_low"] is None and row["ci_high"] is None, row
    assert 0.0 <= got[(variant, "consistency")]["mean"] <= 1.0
    assert got[(variant, "loss_last_segment")]["mean"] > 0
  # Same widths; the TTT layer adds parameters and FLOPs to local attention alone.
  assert got[("ttt_mlp", "params")]["mean"] > got[("local", "params")]["mean"]
  assert got[("ttt_mlp", "train_flops_per_step")]["mean"] > \
      got[("local", "train_flops_per_step")]["mean"]
  # The probe's own validation: perfect on ground truth, every recolouring caught.
  assert got[("ground_truth", "consistency")]["mean"] == 1.0
  assert got[("recoloured", "change_detected")]["mean"] == 1.0
  # Both variants started from the shared local-attention base.
  assert json.loads((tmp_path / "runs/base/3s/base.json").read_text())["steps"] == 3
  for variant in preset.variants:
    config = json.loads((tmp_path / "runs" / variant / "seed0/3s/config.json").read_text())
    assert config["init_from"] == str(tmp_path / "runs/base/3s") and config["init_new_layers"]
  md = (tmp_path / "results.md").read_text()
  assert "one shared base" in md
  assert "| ttt_mlp |" in md and "| local |" in md
  for png in ("consistency.png", "loss_by_segment.png",
              "runs/ttt_mlp/seed0/9s/sample_strip.png"):
    assert (tmp_path / png).stat().st_size > 1000, png

  for variant in preset.variants:  # values: test_swap_gains_reach_as_far_as_the_layer_does
    for metric in ("swap_gain_first", "swap_gain_next", "swap_gain_later"):
      assert math.isfinite(got[(variant, metric)]["mean"])

  # A rerun finds every run finished: nothing is trained or scored again.
  evals = sorted(tmp_path.glob("runs/*/seed*/9s/eval.json")) + \
      [tmp_path / "runs/base/3s/base.json"]
  stamps = [p.stat().st_mtime_ns for p in evals]
  assert ev.run(preset, tmp_path) == rows
  assert [p.stat().st_mtime_ns for p in evals] == stamps

  # A run whose eval.json lacks a metric (e.g. added by a later version) gets just that metric
  # computed again, the same as before; what it holds, sampled scores included, is kept.
  path = tmp_path / "runs/ttt_mlp/seed0/9s/eval.json"
  full = json.loads(path.read_text())
  partial = {k: v for k, v in full.items() if not k.startswith("swap_gain")}
  partial["consistency"] = -1.0  # a marker: kept, not sampled again
  path.write_text(json.dumps(partial))
  ev.run(preset, tmp_path)
  refilled = json.loads(path.read_text())
  assert refilled == {**full, "consistency": -1.0}
