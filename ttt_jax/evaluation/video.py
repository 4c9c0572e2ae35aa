"""The paper's comparison on one machine: which sequence layer carries the first scene
along the video, between a positive and a negative control.

    python -m ttt_jax.evaluate --task=video --preset=ci|full --workdir=W [--seeds=3,4,5]

As in the paper, where every variant is CogVideoX plus a new layer, one shared
base is trained first: the DiT with local attention alone, at 3 s. Every
variant starts from it with its global slot (`model.sequence_layer`) added
fresh (`init_new_layers`) and trains the same stages (`preset.seconds`) from
the same seeds, with the same steps, batch, widths and learning rates; only
attention q/k/v/o and the slot train. The toy cartoons' house paint is named
in the first caption only (`ttt_jax.evaluation.video_scores`), and the
variants are:

- `local`: no global slot; the NEGATIVE control. Segments from index D on
  (D = the DiT's depth) are beyond local attention's reach, so its swap gain
  there is exactly 0.
- `full_attention`: causal attention over the whole video, which reads the
  first caption directly; the POSITIVE control: it must carry the paint.
- `oracle`: local attention on storyboards whose every caption names the paint;
  the achievable bound.
- `sliding_window`, `mamba2`, `gated_deltanet`, `ttt_linear`, `ttt_mlp`, `lact`:
  placed between the controls on the same runs.

Scores per run (`video_scores`): `swap_gain_later` (the held-out loss beyond
local attention's reach with the paint swapped in the storyboard, minus with
the true one; same frames and noise), `consistency` (the share of walls and
floors beyond reach that sampled videos paint as the first caption said) and
its `consistency_lift` over other storyboards' paints, held-out losses by
segment, parameters and FLOPs. The base reports `memory_share_*`: what knowing
the paint is worth, as a share of its loss, over uniform timesteps and over
those the stages draw. Rows go to results.json with 95 % t-intervals over
seeds (`ttt_jax.evaluation.report`); runs live in
W/runs/<variant>/seed<k>/<seconds>s/ and a rerun skips what is done.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Mapping

import matplotlib
import ml_collections
import numpy as np
import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ttt_jax import sample, stages, train  # noqa: E402
from ttt_jax.data import pipeline, toy_cartoons  # noqa: E402
from ttt_jax.diffusion import TimestepDistribution  # noqa: E402
from ttt_jax.evaluation import report  # noqa: E402
from ttt_jax.evaluation import video_scores as vs  # noqa: E402
from ttt_jax.layout import FRAMES_PER_SEGMENT  # noqa: E402
from ttt_jax.models import dit  # noqa: E402

TASK = "video"
# variant -> stage-config overrides (dotted keys of configs/common.py's config)
VARIANTS: dict[str, dict[str, Any]] = {
    "local": {"model.sequence_layer": "local"},
    "sliding_window": {"model.sequence_layer": "sliding_window"},
    "full_attention": {"model.sequence_layer": "full_attention"},
    "mamba2": {"model.sequence_layer": "mamba2"},
    "gated_deltanet": {"model.sequence_layer": "gated_deltanet"},
    "ttt_linear": {"model.sequence_layer": "ttt", "model.ttt.inner": "linear"},
    "ttt_mlp": {"model.sequence_layer": "ttt", "model.ttt.inner": "mlp"},
    "lact": {"model.sequence_layer": "lact"},
    "oracle": {"model.sequence_layer": "local", "data.restate_paint": True},
}
CONTROLS = {"negative": "local", "positive": "full_attention", "bound": "oracle"}
# Scored groups of an eval.json, each marked by one of its keys: a rerun fills in the
# groups a run lacks (e.g. added by a later version) and keeps what it holds.
GROUPS = ("swap_gain_first", "loss_last_segment", "first_segment")


def depth(preset: ml_collections.ConfigDict) -> int:
  return dit.VARIANTS[preset.model]["depth"]


def lengths(preset: ml_collections.ConfigDict, variant: str) -> tuple[int, ...]:
  """The evaluated lengths of `variant` (`preset.max_seconds` caps them)."""
  cap = preset.max_seconds.get(variant, max(preset.seconds))
  return tuple(s for s in preset.seconds if s <= cap)


def check(preset: ml_collections.ConfigDict) -> None:
  """One clear error for a preset that cannot run."""
  unknown = [v for v in preset.variants if v not in VARIANTS]
  if unknown:
    raise ValueError(f"unknown variants {unknown}; choose from {tuple(VARIANTS)}")
  missing = [s for s in preset.seconds if s not in preset.stage.steps]
  if missing:
    raise ValueError(f"stage.steps gives no steps for the {missing} s stages")
  if preset.model not in dit.VARIANTS:
    raise ValueError(f"model {preset.model!r} is unknown; choose from {tuple(dit.VARIANTS)}")


# ----------------------------------------------------------------------------- configs


def _override(c: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value


def stage_config(preset: ml_collections.ConfigDict, variant: str, seed: int, seconds: int,
                 data_dir: str | pathlib.Path, *, first: bool,
                 config_dir: str | pathlib.Path = "configs") -> ml_collections.ConfigDict:
  """The tiny preset's `seconds` stage config with the evaluation's data, model and recipe.
  first: the variant's first stage, initialised from the base (which lacks the slot)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose from {tuple(VARIANTS)}")
  c = stages.load_stage_config(config_dir, seconds, "tiny")
  steps = preset.stage.steps[seconds]
  with c.unlocked():
    c.seed, c.init_new_layers = seed, first
    c.data.update(dict(preset.data, dir=str(data_dir)))
    # The stage config sized these to one segment of ITS frame size: resize them to this
    # one's (text and 12 latent frames of 16x16-pixel tokens), so that they still see one
    # segment, as local attention does, here across boundaries.
    segment = c.data.text_len + FRAMES_PER_SEGMENT * (c.data.height // 16) * (c.data.width // 16)
    c.model.baselines.sliding_window.window = segment
    c.model.baselines.lact.chunk_size = segment
    c.model.variant = preset.model
    c.train.update(dict(steps=steps, batch_size=preset.stage.batch,
                        log_every=max(1, min(25, steps)), ckpt_every=steps))
    c.optim.lr.update(dict(preset.stage.lr))
    c.optim.warmup_steps = preset.stage.warmup_steps
    c.diffusion.timesteps.update(dict(preset.stage.timesteps))
    score = preset.score
    c.sample.update(dict(steps=score.sample_steps, sampler=score.sampler,
                         guidance_scale=score.guidance_scale))
    _override(c, VARIANTS[variant])
  return c


def base_config(preset: ml_collections.ConfigDict, data_dir: str | pathlib.Path,
                config_dir: str | pathlib.Path = "configs") -> ml_collections.ConfigDict:
  """The shared base: local attention alone at 3 s, seed 0, every parameter training."""
  c = stages.load_stage_config(config_dir, 3, "tiny")
  with c.unlocked():
    c.data.update(dict(preset.data, dir=str(data_dir)))
    c.model.variant = preset.model
    c.model.sequence_layer = "local"
    b = preset.base
    c.train.update(dict(steps=b.steps, batch_size=b.batch, log_every=min(50, b.steps),
                        ckpt_every=b.steps))
    c.optim.lr.update({g: b.lr for g in c.optim.lr})
    c.diffusion.timesteps.update(dict(b.timesteps))
  return c


# ----------------------------------------------------------------------------- runs


def _read(path: pathlib.Path) -> dict[str, Any]:
  return json.loads(path.read_text()) if path.exists() else {}


def signal_distributions(preset: ml_collections.ConfigDict
                         ) -> dict[str, TimestepDistribution]:
  """The timestep distributions the memory signal is reported over: uniform, the base's and
  the stages'."""
  return {"uniform": TimestepDistribution(), "base": TimestepDistribution(**preset.base.timesteps),
          "stage": TimestepDistribution(**preset.stage.timesteps)}


def train_base(preset: ml_collections.ConfigDict, root: pathlib.Path,
               config_dir: str | pathlib.Path) -> dict[str, Any]:
  """The shared base (skipped once done), scored: its first-segment swap gain and memory
  signal. Returns <root>/runs/base/3s/eval.json."""
  run_dir = root / "runs" / "base" / "3s"
  path = run_dir / "eval.json"
  result = _read(path)
  config = base_config(preset, root / "data", config_dir)
  if "train_s" not in result:
    t0 = time.perf_counter()
    train.train(config, run_dir)
    result = dict(steps=preset.base.steps, batch=preset.base.batch,
                  train_s=time.perf_counter() - t0)
    report.write_json(result, path)
  if "memory_share_stage" not in result:
    videos = vs.heldout_videos(config.data, 3, preset.score.heldout)
    swapped = vs.swapped_videos(videos, config.data.paints.split(","))
    loss_fn = vs.segment_loss_fn(config, vs.load_model(config, run_dir))
    result["swap_gain_first"] = float(vs.swap_gains(
        loss_fn, videos, swapped, preset.score.swap_timesteps)[1][0])
    result.update(vs.memory_signal(loss_fn, videos, swapped, signal_distributions(preset),
                                   config.diffusion.num_steps))
    report.write_json(result, path)
  return result


def score_run(preset: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
              run_dir: pathlib.Path, train_s: float) -> dict[str, Any]:
  """Scores of one trained run at its length, in <run_dir>/eval.json (groups it already
  holds are kept)."""
  path = run_dir / "eval.json"
  result = _read(path)
  missing = [g for g in GROUPS if g not in result]
  if not missing:
    return result
  score, D = preset.score, depth(preset)
  videos = vs.heldout_videos(config.data, config.seconds, score.heldout)
  beyond = vs.beyond_reach(len(videos[0].captions), D)
  if "first_segment" in missing:
    sampler = sample.Sampler(run_dir, len(videos[0].captions))
    scores = []
    for i, video in enumerate(videos[:score.sampled]):
      frames = sampler(list(video.captions), seed=i, progress=False)  # [T, H, W, 3]
      scores.append(vs.probe_video(frames, video, D, config.data))
      if i == 0:  # what the numbers mean, to look at: one frame per segment
        strip = np.concatenate([frames[(f0 + f1) // 2] for f0, f1 in
                                toy_cartoons.segment_frame_ranges(len(video.captions))], axis=1)
        plt.imsave(run_dir / "sample_strip.png", strip)
    result.update({k: float(np.mean([s[k] for s in scores])) for k in scores[0]})
  if {"loss_last_segment", "swap_gain_first"} & set(missing):  # the groups scored by loss
    loss_fn = vs.segment_loss_fn(config, vs.load_model(config, run_dir))
  if "loss_last_segment" in missing:
    losses = loss_fn(videos, score.loss_timesteps)
    result.update({f"loss_segment_{i:02d}": float(v) for i, v in enumerate(losses)})
    result.update(loss_first_segment=float(losses[0]), loss_last_segment=float(losses[-1]),
                  train_s=train_s, **vs.cost(config))
  if "swap_gain_first" in missing:
    swapped = vs.swapped_videos(videos, config.data.paints.split(","))
    high_noise, gains = vs.swap_gains(loss_fn, videos, swapped, score.swap_timesteps)
    result.update({f"swap_gain_segment_{i:02d}": float(g) for i, g in enumerate(gains)})
    result["swap_gain_first"] = float(gains[0])
    if D > 1:
      result["swap_gain_within_reach"] = float(np.mean(gains[1:min(D, len(gains))]))
    if len(beyond):
      result["swap_gain_later"] = float(np.mean(gains[list(beyond)]))
      result["loss_later"] = float(np.mean(high_noise[list(beyond)]))
  report.write_json(result, path)
  return result


def run_variant(preset: ml_collections.ConfigDict, variant: str, seed: int,
                root: pathlib.Path, config_dir: str | pathlib.Path) -> None:
  """The stages of one (variant, seed) from the base, each scored once trained."""
  seconds = lengths(preset, variant)
  dirs = [root / "runs" / variant / f"seed{seed}" / f"{s}s" for s in seconds]
  configs = stages.chain(
      [stage_config(preset, variant, seed, s, root / "data", first=i == 0,
                    config_dir=config_dir) for i, s in enumerate(seconds)],
      dirs, init_from=str(root / "runs" / "base" / "3s"))
  train_s = 0.0
  for config, run_dir in zip(configs, dirs):
    if not (run_dir / "eval.json").exists():
      t0 = time.perf_counter()
      train.train(config, run_dir)
      train_s += time.perf_counter() - t0
    else:
      train_s = _read(run_dir / "eval.json").get("train_s", train_s)
    score_run(preset, config, run_dir, train_s)


# ----------------------------------------------------------------------------- results


def collect(preset: ml_collections.ConfigDict, root: pathlib.Path) -> list[dict[str, Any]]:
  """results.json rows of every finished run, the base's and the probe's validation."""
  rows = [report.fixed_row(TASK, "base", k, v, seconds=3)
          for k, v in _read(root / "runs" / "base" / "3s" / "eval.json").items()]
  for seconds in preset.seconds:
    for name, scores in _read(root / f"probe_validation_{seconds}s.json").items():
      rows += [report.fixed_row(TASK, name, k, v, seconds=seconds) for k, v in scores.items()]
    for variant in preset.variants:
      evals = [e for seed in preset.seeds if (e := _read(
          root / "runs" / variant / f"seed{seed}" / f"{seconds}s" / "eval.json"))]
      for metric in sorted(set().union(*evals)) if evals else ():
        values = [e[metric] for e in evals if metric in e]
        rows.append(report.row(TASK, variant, metric, values, seconds=seconds))
  return rows


def _index(rows: list[dict[str, Any]]) -> dict[tuple[str, int, str], dict[str, Any]]:
  return {(r["variant"], r["seconds"], r["metric"]): r for r in rows}


def controls_verdict(rows: list[dict[str, Any]], seconds: int) -> list[str]:
  """Whether the controls separate at `seconds`, in words, from the rows."""
  index = _index(rows)
  get = lambda variant, metric="swap_gain_later": index.get((variant, seconds, metric))
  lines = []
  for role, variant in CONTROLS.items():
    r = get(variant)
    if r is not None:
      lines.append(f"- {role} control `{variant}`: swap_gain_later {report.fmt(r)} "
                   f"(95 % interval {report.separated(r)}, {r['n_seeds']} seeds)")
  pos, neg = get(CONTROLS["positive"]), get(CONTROLS["negative"])
  if pos is not None and neg is not None:
    ok = report.separated(pos) == "above 0" and report.separated(neg) == "holds 0"
    lines.append(f"- the controls {'SEPARATE' if ok else 'DO NOT separate'}: the positive "
                 f"control's interval must lie above 0 and the negative one's hold 0")
  return lines


def placement(rows: list[dict[str, Any]], seconds: int, metric: str) -> dict[str, float]:
  """(variant - local) / (full attention - local) of `metric`'s means: 0 is the negative
  control, 1 the positive one (only where the two differ)."""
  index = _index(rows)
  neg = index.get((CONTROLS["negative"], seconds, metric))
  pos = index.get((CONTROLS["positive"], seconds, metric))
  if neg is None or pos is None or pos["mean"] == neg["mean"]:
    return {}
  return {v: (r["mean"] - neg["mean"]) / (pos["mean"] - neg["mean"])
          for (v, s, m), r in index.items() if s == seconds and m == metric and r["n_seeds"]}


COLUMNS = ("swap_gain_later", "swap_gain_within_reach", "swap_gain_first", "consistency",
           "consistency_lift", "first_segment_lift", "loss_later", "loss_last_segment",
           "params", "train_flops_per_step", "train_s")


def write_markdown(rows: list[dict[str, Any]], preset: ml_collections.ConfigDict,
                   out: pathlib.Path, wall_s: float) -> None:
  index = _index(rows)
  base = {r["metric"]: r["mean"] for r in rows if r["variant"] == "base"}
  lines = [f"# ttt_jax.evaluate --task=video, preset {preset.preset}", "",
           f"Mean ± 95 % t-interval half-width over seeds {tuple(preset.seeds)}. Every variant "
           f"starts from one shared base: local attention alone, the {preset.model} DiT "
           f"({depth(preset)} blocks), {preset.base.steps} steps at 3 s. Beyond local "
           f"attention's reach: segments from index {depth(preset)} on. Wall time of this "
           f"call: {wall_s:.0f} s.", ""]
  if base:
    lines += [f"What the first caption's paint is worth to the base's 3 s loss "
              f"(`memory_share`): {base.get('memory_share_uniform', float('nan')):.1%} over "
              f"uniform timesteps, {base.get('memory_share_stage', float('nan')):.1%} over "
              f"those the stages draw; its first-segment swap gain "
              f"{base.get('swap_gain_first', float('nan')):.3g}.", ""]
  for seconds in preset.seconds:
    variants = [v for v in preset.variants if (v, seconds, "swap_gain_first") in index]
    lines += [f"## {seconds} s", ""]
    lines += report.markdown_table(
        ("variant", *COLUMNS, "n"),
        [(v, *(report.fmt(index.get((v, seconds, m))) for m in COLUMNS),
          str(index[(v, seconds, "swap_gain_first")]["n_seeds"])) for v in variants])
    lines += ["", "Controls:", *controls_verdict(rows, seconds), ""]
    for metric in ("swap_gain_later", "consistency_lift"):
      placed = placement(rows, seconds, metric)
      if placed:
        lines.append(f"Placement by {metric} (0 = local, 1 = full attention): " + ", ".join(
            f"{v} {p:.2f}" for v, p in sorted(placed.items(), key=lambda kv: -kv[1])) + ".")
    probe = [f"{name}: consistency {report.fmt(index.get((name, seconds, 'consistency')))}, "
             f"change detected {report.fmt(index.get((name, seconds, 'change_detected')))}"
             for name in ("ground_truth", "repainted") if (name, seconds, "consistency") in index]
    if probe:
      lines += ["", "Paint probe on held-out videos through the codec: " + "; ".join(probe)
                + "."]
    lines.append("")
  out.write_text("\n".join(lines))


def plot(rows: list[dict[str, Any]], preset: ml_collections.ConfigDict,
         root: pathlib.Path) -> None:
  index = _index(rows)
  fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
  panels = (("swap_gain_later", "loss rise beyond local reach, paint swapped"),
            ("consistency_lift", "paint consistency beyond reach, lift over chance"),
            ("loss_later", "held-out loss beyond reach (high noise)"))
  for ax, (metric, label) in zip(axes, panels):
    for v in preset.variants:
      pts = [(s, index[(v, s, metric)]) for s in preset.seconds if (v, s, metric) in index]
      if not pts:
        continue
      lo = [r["mean"] - (r["ci_low"] if r["ci_low"] is not None else r["mean"]) for _, r in pts]
      hi = [(r["ci_high"] if r["ci_high"] is not None else r["mean"]) - r["mean"]
            for _, r in pts]
      ax.errorbar([s for s, _ in pts], [r["mean"] for _, r in pts], yerr=[lo, hi], marker="o",
                  capsize=3, label=v, linestyle="--" if v in CONTROLS.values() else "-")
    ax.set_xlabel("video length (s)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  for ax in axes[:2]:
    ax.axhline(0.0, color="k", lw=0.8)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(root / "consistency.png", dpi=120)
  plt.close(fig)

  longest = max(preset.seconds)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for v in preset.variants:
    seg = sorted((int(m.rsplit("_", 1)[1]), r["mean"]) for (name, s, m), r in index.items()
                 if name == v and s == longest and m.startswith("swap_gain_segment_"))
    if seg:
      ax.plot([i for i, _ in seg], [g for _, g in seg], marker=".", label=v)
  ax.axvline(depth(preset) - 0.5, color="k", lw=0.8, ls=":")
  ax.set_xlabel(f"segment index (3 s each, {longest} s videos); local reach ends at the line")
  ax.set_ylabel("held-out loss rise, paint swapped")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(root / "swap_gain_by_segment.png", dpi=120)
  plt.close(fig)


def run(preset: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        config_dir: str | pathlib.Path = "configs") -> list[dict[str, Any]]:
  """Trains and scores the base and every (variant, seed) of the preset (resuming), then
  writes results.md and the plots; returns this task's results rows."""
  check(preset)
  t0 = time.perf_counter()
  root = pathlib.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  data = base_config(preset, root / "data", config_dir).data
  codec, _ = pipeline.make_encoders(data)
  for seconds in preset.seconds:
    path = root / f"probe_validation_{seconds}s.json"
    if not path.exists():
      report.write_json(
          vs.validate_probe(data, seconds, preset.score.heldout, depth(preset), codec), path)
  train_base(preset, root, config_dir)
  jobs = [(v, s) for s in preset.seeds for v in preset.variants]
  for variant, seed in tqdm.tqdm(jobs, desc=f"video {preset.preset}"):
    run_variant(preset, variant, seed, root, config_dir)
  rows = collect(preset, root)
  write_markdown(rows, preset, root / "results_video.md", time.perf_counter() - t0)
  plot(rows, preset, root)
  return rows
