"""The paper's comparison on one machine: sequence layers at equal compute, long-range consistency.

    python -m ttt_jax.evaluate --workdir=workdirs/eval_ci --preset=ci
    python -m ttt_jax.evaluate --workdir=workdirs/eval_full --preset=full

As in the paper, where every variant is CogVideoX plus a new layer, one shared
base is trained first: the DiT with local attention alone, at 3 s
(`Preset.base_steps`). Every variant (the DiT's global slot: `local` attention
only, `sliding_window`, `full_attention`, `mamba2`, `gated_deltanet`,
`ttt_linear`, `ttt_mlp`, `lact`) starts from it with its global layer added
fresh (`init_new_layers`) and trains the same curriculum on toy cartoons from
the same seeds: a 3 s stage, then each evaluated length in turn, with the same
steps, batch, widths and learning rates (the parameter count and matmul FLOPs
per step of each are reported). The base spends the budget of learning to
draw once instead of in every variant. The `full` preset's base is the small
DiT (`dit.VARIANTS["small"]`) trained 6000 steps: the tiny DiT, trained 3000,
drew no caption colour and no variant separated from it (benchmarks/RESULTS.md).
After each evaluated length the run is scored on held-out storyboards:

- `consistency`: the toy cartoons name each character's colour only in the
  first caption. Videos sampled from the held-out storyboards are read by the
  colour probe (`ttt_jax.data.toy_probe`), and the colours of every later
  segment are compared with the first caption's (F1, mean over segments and
  videos). `self_consistency` compares them with what the video itself drew in
  its first segment; `first_segment` scores the first segment against its caption.
- `loss_segment_<i>`: the held-out v-prediction loss of each segment's
  latent frames (fixed timesteps and noise), `loss_first_segment` and
  `loss_last_segment`: does quality decay along the video?
- `swap_gain_first`, `swap_gain_next`, `swap_gain_later`: how much the
  held-out loss rises when the first caption names other colours than the
  ones drawn (same frames and noise), in the first segment, the second, and
  on average from the third on. The first says whether the model reads the
  colours from its caption at all. The others are memory measured without
  sampling: later captions name no colour, so only what carries the first
  caption along the video makes their loss depend on it. Local attention
  alone reaches the second segment through the boundary frame the two share
  and the third only through a second such hop, so `swap_gain_later` is the
  long-range one. Paired and deterministic, these resolve effects far
  smaller than the probe, which reads three sampled videos.

No FVD-style frame distance: it needs a pretrained feature extractor (I3D on
Kinetics for FVD, Inception for FID, CLIP), and none of their weights can be
had offline; a randomly initialised extractor would measure nothing.

The probe is validated on the same held-out videos, through the latent codec
(variants `ground_truth` and `recoloured`: a character changes colour after
the first scene; `change_detected` is the fraction the probe flags).

Writes <workdir>/results.json (rows {"variant", "seconds", "metric", "mean",
"ci_low", "ci_high", "n_seeds"}, 95 % t-intervals over seeds), results.md and
consistency.png / loss_by_segment.png. Runs live in
<workdir>/runs/<variant>/seed<k>/<seconds>s/; a rerun skips what is done and
resumes a stage that was interrupted.

Toy setting (the preset's `height`, `width`, `colours`): characters are drawn
from five saturated colours (orange, blue, red, purple, yellow) that the
probe tells apart after the codec; grey, white, black and brown blend into
each other and into the backdrops at character edges (black + white reads
as grey), so with the full palette the probe saw false colours in 60 % of
ground-truth videos at 128 x 192. Both presets run at 64 x 96, where the
probe is exact on ground truth: at 96 x 144 (characters ~1.5 DiT tokens
instead of ~1) a step costs 2.25x more. The full preset took 1 h 49 min on
the 2-core box (a 20 min base, then 8 variants x 3 lengths x 3 seeds) and
peaks at ~12 GB of RAM: run it alone.

F1 rewards drawing many colours (every colour everywhere scores 0.63 against
a random caption, another storyboard's colours 0.46), so each score also
comes as a lift: minus its mean against 64 other storyboards' first
captions. Only carrying the caption's own colours lifts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
import scipy.stats
import tqdm
from absl import app, flags, logging
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ttt_jax import checkpoint, flops, optim, sample, stages, train  # noqa: E402
from ttt_jax.data import pipeline, toy_cartoons, toy_probe  # noqa: E402
from ttt_jax.diffusion import NoiseSchedule, v_prediction_loss  # noqa: E402
from ttt_jax.models import dit  # noqa: E402

# variant -> config overrides (dotted keys of configs/common.py's config)
VARIANTS: dict[str, dict[str, Any]] = {
    "local": {"model.sequence_layer": "local"},
    "sliding_window": {"model.sequence_layer": "sliding_window"},
    "full_attention": {"model.sequence_layer": "full_attention"},
    "mamba2": {"model.sequence_layer": "mamba2"},
    "gated_deltanet": {"model.sequence_layer": "gated_deltanet"},
    "ttt_linear": {"model.sequence_layer": "ttt", "model.ttt.inner": "linear"},
    "ttt_mlp": {"model.sequence_layer": "ttt", "model.ttt.inner": "mlp"},
    "lact": {"model.sequence_layer": "lact"},
}
EVAL_COLOURS = ("orange", "blue", "red", "purple", "yellow")
HELDOUT_SEED = 1_000_003  # toy-cartoon seed of the held-out storyboards (training uses seed 0)


@dataclasses.dataclass(frozen=True)
class Preset:
  """seconds: the evaluated lengths, each a curriculum stage after a 3 s one.
  base_steps, base_batch: the shared base, local attention alone at 3 s (seed 0), that every
  variant starts from, as the paper's variants all start from CogVideoX.
  steps: train steps of every variant's stage (3 s included); batch: clips per step.
  heldout: storyboards sampled and scored per length; sample_steps, sampler, guidance_scale:
  how they are sampled (ttt_jax.sample).
  loss_timesteps: diffusion timesteps the held-out loss averages over; swap_timesteps: those
  of the caption-swap gains (`swap_gains`).
  max_seconds: the longest evaluated length of a variant (default: all of `seconds`).
  Full attention is the cost reference at short lengths: quadratic, its 63 s stage alone
  would take longer on the 2-core box than every other variant's whole curriculum."""
  seconds: tuple[int, ...]
  seeds: tuple[int, ...]
  base_steps: int
  steps: Mapping[int, int]
  batch: int
  num_videos: int
  heldout: int
  sample_steps: int
  base_batch: int = 4
  # Without guidance: on the small base (6000 steps), 16 held-out storyboards, the first
  # segment's lift was 0.11-0.12 with the ODE sampler at 10 or 25 steps, 0.05 with guidance 2
  # and -0.01 with the config's SDE at guidance 6 (benchmarks/RESULTS.md). It also halves
  # the sampling cost.
  sampler: str = "dpmpp_2m"
  guidance_scale: float = 1.0
  height: int = 128
  width: int = 192
  model: str = "tiny"
  loss_timesteps: tuple[int, ...] = (100, 300, 500, 700, 900)
  # The caption's colours matter only at high noise: on the small base (3 s, 24 held-out
  # storyboards) swapping them raised the loss by 0.002-0.011 at t = 800-990 and by under
  # 0.0002 at t <= 700 (benchmarks/RESULTS.md).
  swap_timesteps: tuple[int, ...] = (850, 900, 950)
  variants: tuple[str, ...] = tuple(VARIANTS)
  max_seconds: Mapping[str, int] = dataclasses.field(
      default_factory=lambda: {"full_attention": 18})

  def lengths(self, variant: str) -> tuple[int, ...]:
    """The evaluated lengths of `variant`."""
    return tuple(s for s in self.seconds if s <= self.max_seconds.get(variant, s))


PRESETS = {
    # Every variant, one length, two seeds: the whole pipeline in CI time on 2 cores.
    "ci": Preset(seconds=(9,), seeds=(0, 1), base_steps=200, steps={3: 20, 9: 10}, batch=2,
                 num_videos=8, heldout=2, sample_steps=4, height=64, width=96),
    # The comparison: 9 / 18 / 63 s, three seeds, on the small DiT; 1 h 49 min on the 2-core
    # box. First-segment lift on 48 held-out storyboards: tiny after 3000 steps 0.03 ± 0.04,
    # small after 6000 0.13 ± 0.03 (benchmarks/RESULTS.md). Seeds after the first load their
    # compiled programs from the persistent cache.
    "full": Preset(seconds=(9, 18, 63), seeds=(0, 1, 2), base_steps=6000,
                   steps={3: 60, 9: 40, 18: 16, 63: 6}, batch=2, num_videos=128, heldout=3,
                   sample_steps=10, height=64, width=96, model="small",
                   loss_timesteps=(200, 500, 800)),
}
METRICS_PER_VIDEO = ("consistency", "self_consistency", "first_segment", "consistency_lift",
                     "first_segment_lift")
CHANCE_STORYBOARDS = 64  # other storyboards whose first captions give the chance level


# ----------------------------------------------------------------------------- configs


def stage_config(preset: Preset, variant: str, seed: int, seconds: int, init_from: str,
                 data_dir: pathlib.Path, config_dir: str | pathlib.Path = "configs"
                 ) -> ml_collections.ConfigDict:
  """The tiny preset's stage config with the evaluation's data, model and steps."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose from {tuple(VARIANTS)}")
  c = stages.load_stage_config(config_dir, seconds, "tiny")
  with c.unlocked():
    c.seed, c.init_from = seed, init_from
    c.init_new_layers = seconds == 3 and bool(init_from)  # the base lacks the global slot
    c.data.update(dict(dir=str(data_dir), height=preset.height, width=preset.width,
                       num_videos=preset.num_videos, colours=",".join(EVAL_COLOURS)))
    c.model.variant = preset.model
    c.train.update(dict(steps=preset.steps[seconds], batch_size=preset.batch,
                        log_every=max(1, min(10, preset.steps[seconds])),
                        ckpt_every=preset.steps[seconds]))
    c.sample.update(dict(steps=preset.sample_steps, sampler=preset.sampler,
                         guidance_scale=preset.guidance_scale))
    for key, value in VARIANTS[variant].items():
      *parents, leaf = key.split(".")
      node = c
      for p in parents:
        node = node[p]
      node[leaf] = value
  return c


def heldout_videos(preset: Preset, seconds: int) -> list[toy_cartoons.ToyVideo]:
  cfg = toy_cartoons.ToyCartoonConfig(seconds=seconds, height=preset.height, width=preset.width,
                                      seed=HELDOUT_SEED, num_videos=preset.heldout,
                                      colours=EVAL_COLOURS)
  return [toy_cartoons.generate_video(cfg, i) for i in range(preset.heldout)]


def to_uint8(video: np.ndarray) -> np.ndarray:
  return np.round((np.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


# ----------------------------------------------------------------------------- scoring


@functools.cache
def chance_captions() -> tuple[frozenset[str], ...]:
  """The first-caption colours of storyboards the held-out ones are not (their own seed).
  Colours are drawn before anything is rasterised, so the smallest size gives the same ones."""
  cfg = toy_cartoons.ToyCartoonConfig(height=32, width=48, seed=HELDOUT_SEED + 1,
                                      num_videos=CHANCE_STORYBOARDS, colours=EVAL_COLOURS)
  return tuple(toy_probe.caption_colours(toy_cartoons.generate_video(cfg, i))
               for i in range(CHANCE_STORYBOARDS))


def probe_video(frames: np.ndarray, video: toy_cartoons.ToyVideo,
                chance: Iterable[frozenset[str]]) -> dict[str, float]:
  """The probe's scores of one video, and their lift over chance: the same colours read from
  the frames scored against other storyboards' captions. A video that shows every colour
  everywhere scores F1 0.63 against any caption, and lift 0; carrying the caption's own
  colours is what lifts."""
  present = toy_probe.colours_per_segment(frames, len(video.captions),
                                          toy_probe.ProbeConfig(candidates=EVAL_COLOURS))
  scores = toy_probe.consistency(present, toy_probe.caption_colours(video))
  base = [toy_probe.consistency(present, c) for c in chance]
  for name in ("consistency", "first_segment"):
    scores[f"{name}_lift"] = scores[name] - float(np.mean([b[name] for b in base]))
  return scores


def validate_probe(preset: Preset, seconds: int, codec: Any) -> dict[str, dict[str, float]]:
  """The probe on held-out ground truth and on recoloured copies, both through the codec."""
  rng = np.random.default_rng(seconds)
  scores: dict[str, list[dict[str, float]]] = {"ground_truth": [], "recoloured": []}
  chance = chance_captions()
  for video in heldout_videos(preset, seconds):
    wanted = toy_probe.caption_colours(video)
    k = int(rng.integers(len(video.attributes["characters"])))
    new = str(rng.choice([c for c in EVAL_COLOURS if c not in wanted]))
    for name, frames in (("ground_truth", video.frames),
                         ("recoloured", toy_probe.recolour(video, k, new))):
      decoded = codec.decode(codec.encode(toy_cartoons.frames_to_float(frames)[None]))
      scores[name].append(probe_video(to_uint8(np.asarray(decoded)[0]), video, chance))
  out = {}
  for name, rows in scores.items():
    values = np.array([r["consistency"] for r in rows])
    out[name] = {"consistency": float(values.mean()),
                 "consistency_lift": float(np.mean([r["consistency_lift"] for r in rows])),
                 "change_detected": float((values < 1.0 - 1e-9).mean())}
  return out


def load_model(config: ml_collections.ConfigDict, run_dir: pathlib.Path) -> nnx.Module:
  """The DiT of `config` with the trained parameters of `run_dir`."""
  model = dit.build(config.model, text_dim=config.data.text_dim, rngs=nnx.Rngs(0))
  checkpoint.load_params(run_dir, model)
  return model


def segment_loss_fn(config: ml_collections.ConfigDict, model: nnx.Module
                    ) -> Callable[[list[toy_cartoons.ToyVideo], Iterable[int]], np.ndarray]:
  """f(videos, timesteps) -> [num_segments]: the held-out v-prediction loss of each segment's
  latent frames under `model`, the mean over videos and timesteps. The noise is fixed by
  (video, timestep) position, so two calls on the same frames see the same noise."""
  codec, text_encoder = pipeline.make_encoders(config.data)
  layout = pipeline.video_layout(config.data, config.seconds, codec, model.patch_size)
  schedule = NoiseSchedule.create(num_steps=config.diffusion.num_steps)
  bounds = np.cumsum((0, *layout.segment_frames))
  masks = jnp.asarray(np.stack([(np.arange(bounds[-1]) >= a) & (np.arange(bounds[-1]) < b)
                                for a, b in zip(bounds[:-1], bounds[1:])]), jnp.float32)

  @nnx.jit
  def losses(model, latents, text, noise, t):  # [1, T, h, w, C], ... -> [S]
    v = model(schedule.add_noise(latents, noise, t), text, t, layout)
    return jax.vmap(lambda m: v_prediction_loss(v, latents, noise, t, schedule,
                                                mask=m[None, :, None, None, None])[0])(masks)

  def mean_losses(videos: list[toy_cartoons.ToyVideo], timesteps: Iterable[int]) -> np.ndarray:
    total = np.zeros(len(layout.segment_frames))
    timesteps = tuple(timesteps)
    for i, video in enumerate(videos):
      latents = codec.encode(toy_cartoons.frames_to_float(video.frames)[None])
      text = jnp.asarray(pipeline.encode_captions(list(video.captions), text_encoder,
                                                  config.data.text_len))[None]
      for j, t in enumerate(timesteps):
        noise = jax.random.normal(jax.random.key(1000 * i + j), latents.shape)
        total += np.asarray(losses(model, latents, text, noise, jnp.full((1,), t, jnp.int32)))
    return total / (len(videos) * len(timesteps))

  return mean_losses


def swapped_colours(video: toy_cartoons.ToyVideo, index: int) -> list[str]:
  """Other colours for the first caption of held-out storyboard `index`: every character gets
  one of EVAL_COLOURS that is not its own, all distinct (drawn from the index, so every run
  is scored on the same counterfactuals)."""
  truth = [c["colour"] for c in video.attributes["characters"]]
  rng = np.random.default_rng([HELDOUT_SEED, index])
  while True:  # with 5 colours, 32 of 60 draws succeed for 3 characters, 13 of 20 for 2
    colours = [str(c) for c in rng.choice(EVAL_COLOURS, size=len(truth), replace=False)]
    if all(a != b for a, b in zip(colours, truth)):
      return colours


def swap_gains(loss_fn: Callable[..., np.ndarray], videos: list[toy_cartoons.ToyVideo],
               timesteps: Iterable[int]) -> np.ndarray:
  """[num_segments]: loss with the first caption's colours swapped (`swapped_colours`) minus
  the loss with the true ones, same frames and noise. Positive where the model's prediction of
  a segment uses the colours the first caption named: in the first segment, whether the model
  reads its caption at all; in later segments, whose captions name no colour, whether it
  carries the first caption along the video. Local attention alone reaches the second
  segment through the boundary frame the two share, and each further segment only through
  one more such hop (at 9 s, seed 0: 4.6e-4 in the second segment, 4.7e-6 in the third)."""
  return loss_fn(swapped_videos(videos), timesteps) - loss_fn(videos, timesteps)


def swapped_videos(videos: list[toy_cartoons.ToyVideo]) -> list[toy_cartoons.ToyVideo]:
  """The held-out `videos` with their first captions naming `swapped_colours`."""
  return [toy_cartoons.with_first_caption_colours(v, swapped_colours(v, i))
          for i, v in enumerate(videos)]


def cost(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Parameters and matmul FLOPs of one train step of this config (traced, not run)."""
  codec, _ = pipeline.make_encoders(config.data)
  model = dit.build(config.model, text_dim=config.data.text_dim, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config.optim), wrt=nnx.Param)
  layout = pipeline.video_layout(config.data, config.seconds, codec, model.patch_size)
  graph, state = nnx.split((model, optimizer))
  latent = codec.latent_shape(codec.num_frames(layout.num_frames), config.data.height,
                              config.data.width)
  B = config.train.batch_size
  batch = {"latents": jax.ShapeDtypeStruct((B, *latent), jnp.float32),
           "text": jax.ShapeDtypeStruct((B, layout.num_text, config.data.text_dim), jnp.float32)}
  null = jax.ShapeDtypeStruct((layout.num_text, config.data.text_dim), jnp.float32)

  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  step = train.pure_step(config, layout, graph)
  return {"params": float(params), "train_flops_per_step": flops.matmul_flops(
      step, state, batch, jax.random.key(0), null)}


# ----------------------------------------------------------------------------- runs


def evaluate_run(preset: Preset, config: ml_collections.ConfigDict, run_dir: pathlib.Path,
                 train_s: float) -> dict[str, Any]:
  """Scores of one trained run at its length, in <run_dir>/eval.json. What that file already
  holds is kept: a rerun computes only the metrics it lacks (e.g. added by a later version)."""
  path = run_dir / "eval.json"
  result = json.loads(path.read_text()) if path.exists() else {}
  missing = [name for name in ("consistency", "loss_last_segment", "swap_gain_later")
             if name not in result]
  if not missing:
    return result
  videos = heldout_videos(preset, config.seconds)
  if "consistency" in missing:
    sampler = sample.Sampler(run_dir, len(videos[0].captions))
    chance = chance_captions()
    scores = []
    for i, video in enumerate(videos):
      frames = sampler(list(video.captions), seed=i, progress=False)  # [T, H, W, 3]
      scores.append(probe_video(frames, video, chance))
      if i == 0:  # what the numbers mean, to look at: one frame per segment
        strip = np.concatenate([frames[f0] for f0, _ in
                                toy_cartoons.segment_frame_ranges(len(video.captions))], axis=1)
        plt.imsave(run_dir / "sample_strip.png", strip)
    result.update({name: float(np.mean([s[name] for s in scores])) for name in METRICS_PER_VIDEO})
  loss_fn = segment_loss_fn(config, load_model(config, run_dir))
  if "loss_last_segment" in missing:
    losses = loss_fn(videos, preset.loss_timesteps)
    result.update({f"loss_segment_{i:02d}": float(v) for i, v in enumerate(losses)})
    result.update(loss_first_segment=float(losses[0]), loss_last_segment=float(losses[-1]),
                  train_s=train_s, **cost(config))
  if "swap_gain_later" in missing:
    gains = swap_gains(loss_fn, videos, preset.swap_timesteps)
    result.update(swap_gain_first=float(gains[0]), swap_gain_next=float(gains[1]),
                  swap_gain_later=float(np.mean(gains[2:])))
  path.write_text(json.dumps(result, indent=1))
  return result


def train_base(preset: Preset, root: pathlib.Path) -> dict[str, Any]:
  """The shared base (skipped once done): local attention alone, 3 s, seed 0; returns
  <root>/runs/base/3s/base.json ({"steps", "batch", "train_s"})."""
  run_dir = root / "runs" / "base" / "3s"
  done = run_dir / "base.json"
  if not done.exists():
    c = stage_config(preset, "local", 0, 3, "", root / "data")
    with c.unlocked():
      c.train.update(dict(steps=preset.base_steps, batch_size=preset.base_batch,
                          log_every=min(50, preset.base_steps), ckpt_every=preset.base_steps))
    t0 = time.perf_counter()
    train.train(c, run_dir)
    done.write_text(json.dumps(dict(steps=preset.base_steps, batch=preset.base_batch,
                                    train_s=time.perf_counter() - t0)))
  return json.loads(done.read_text())


def run_variant(preset: Preset, variant: str, seed: int, root: pathlib.Path) -> None:
  """The curriculum of one (variant, seed) from the base: 3 s (the global layer added fresh),
  then each evaluated length, scored."""
  previous, train_s = str(root / "runs" / "base" / "3s"), 0.0
  for seconds in (3, *preset.lengths(variant)):
    run_dir = root / "runs" / variant / f"seed{seed}" / f"{seconds}s"
    config = stage_config(preset, variant, seed, seconds, previous, root / "data")
    if not (run_dir / "eval.json").exists():
      t0 = time.perf_counter()
      train.train(config, run_dir)
      train_s += time.perf_counter() - t0
    if seconds in preset.seconds:
      evaluate_run(preset, config, run_dir, train_s)
    previous = str(run_dir)


# ----------------------------------------------------------------------------- results


def interval(values: list[float]) -> tuple[float, float | None, float | None]:
  """(mean, 95 % t-interval low, high) over seeds; no interval from one seed."""
  x = np.asarray(values, np.float64)
  mean = float(x.mean())
  if len(x) < 2:
    return mean, None, None
  half = float(scipy.stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
  return mean, mean - half, mean + half


def collect(preset: Preset, root: pathlib.Path) -> list[dict[str, Any]]:
  """results.json rows from every finished run, plus the probe's validation."""
  rows = []
  for seconds in preset.seconds:
    probe_path = root / f"probe_validation_{seconds}s.json"
    for name, scores in json.loads(probe_path.read_text()).items():
      for metric, value in scores.items():
        rows.append(dict(variant=name, seconds=seconds, metric=metric, mean=value,
                         ci_low=None, ci_high=None, n_seeds=0))
    for variant in preset.variants:
      evals = [json.loads(p.read_text()) for seed in preset.seeds
               if (p := root / "runs" / variant / f"seed{seed}" / f"{seconds}s" / "eval.json")
               .exists()]
      for metric in (evals[0] if evals else {}):
        mean, lo, hi = interval([e[metric] for e in evals])
        rows.append(dict(variant=variant, seconds=seconds, metric=metric, mean=mean,
                         ci_low=lo, ci_high=hi, n_seeds=len(evals)))
  return rows


def _fmt(row: dict[str, Any] | None) -> str:
  if row is None:
    return "-"
  mean = row["mean"]
  text = f"{mean:.3g}" if abs(mean) < 1e4 else f"{mean:.3e}"
  return text + (f" ± {(row['ci_high'] - row['ci_low']) / 2:.2g}" if row["ci_low"] is not None
                 else "")


def write_markdown(rows: list[dict[str, Any]], preset_name: str, out: pathlib.Path,
                   note: str = "") -> None:
  index = {(r["variant"], r["seconds"], r["metric"]): r for r in rows}
  variants = list(dict.fromkeys(r["variant"] for r in rows if r["n_seeds"]))
  columns = ("consistency", "consistency_lift", "self_consistency", "first_segment",
             "first_segment_lift", "swap_gain_first", "swap_gain_next", "swap_gain_later",
             "loss_first_segment",
             "loss_last_segment", "params", "train_flops_per_step", "train_s")
  lines = [f"# ttt_jax.evaluate, preset {preset_name}", "",
           "Mean ± 95 % t-interval half-width over seeds (n in the last column). " + note,
           ""]
  for seconds in sorted({r["seconds"] for r in rows}):
    lines += [f"## {seconds} s", "", "| variant | " + " | ".join(columns) + " | n |",
              "|---" * (len(columns) + 2) + "|"]
    for v in variants:
      n = index.get((v, seconds, "consistency"), {}).get("n_seeds", 0)
      lines.append(f"| {v} | " + " | ".join(_fmt(index.get((v, seconds, m))) for m in columns)
                   + f" | {n} |")
    cell = lambda name, metric: _fmt(index.get((name, seconds, metric)))
    probe = [f"{name}: consistency {cell(name, 'consistency')} (lift "
             f"{cell(name, 'consistency_lift')}), change detected {cell(name, 'change_detected')}"
             for name in ("ground_truth", "recoloured")]
    lines += ["", "Probe on held-out videos through the codec: " + "; ".join(probe) + ".", ""]
  out.write_text("\n".join(lines))


def plot(rows: list[dict[str, Any]], root: pathlib.Path) -> None:
  variants = list(dict.fromkeys(r["variant"] for r in rows if r["n_seeds"]))
  fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
  for ax, metric in zip(axes, ("consistency", "consistency_lift", "swap_gain_later")):
    for v in variants:
      pts = sorted((r["seconds"], r) for r in rows if r["variant"] == v and r["metric"] == metric)
      err = [[r["mean"] - (r["ci_low"] if r["ci_low"] is not None else r["mean"]) for _, r in pts],
             [(r["ci_high"] if r["ci_high"] is not None else r["mean"]) - r["mean"]
              for _, r in pts]]
      ax.errorbar([s for s, _ in pts], [r["mean"] for _, r in pts], yerr=err, marker="o",
                  capsize=3, label=v)
    ax.set_xlabel("video length (s)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("colour consistency (F1 vs first caption)")
  axes[0].set_ylim(0, 1.05)
  axes[1].set_ylabel("lift over other storyboards' captions")
  axes[2].set_ylabel("later segments' loss rise, first caption's colours swapped")
  for ax in axes[1:]:
    ax.axhline(0.0, color="k", lw=0.8)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(root / "consistency.png", dpi=120)
  plt.close(fig)

  longest = max(r["seconds"] for r in rows)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for v in variants:
    seg = sorted((int(r["metric"].rsplit("_", 1)[1]), r["mean"]) for r in rows
                 if r["variant"] == v and r["seconds"] == longest
                 and r["metric"].startswith("loss_segment_"))
    ax.plot([i for i, _ in seg], [m for _, m in seg], marker=".", label=v)
  ax.set_xlabel(f"segment index (3 s each, {longest} s videos)")
  ax.set_ylabel("held-out v-prediction loss")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(root / "loss_by_segment.png", dpi=120)
  plt.close(fig)


def run(preset: str | Preset, workdir: str | pathlib.Path,
        variants: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
  """Trains and scores every (variant, seed) of the preset (a PRESETS name or a Preset;
  resuming), then writes the results; returns the results.json rows."""
  preset_name = preset if isinstance(preset, str) else "custom"
  if isinstance(preset, str):
    if preset not in PRESETS:
      raise ValueError(f"unknown preset {preset!r}; choose from {tuple(PRESETS)}")
    preset = PRESETS[preset]
  if variants:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
      raise ValueError(f"unknown variants {unknown}; choose from {tuple(VARIANTS)}")
    preset = dataclasses.replace(preset, variants=tuple(variants))
  root = pathlib.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  codec, _ = pipeline.make_encoders(stage_config(preset, preset.variants[0], 0, 3, "",
                                                 root / "data").data)
  for seconds in preset.seconds:
    path = root / f"probe_validation_{seconds}s.json"
    if not path.exists():
      path.write_text(json.dumps(validate_probe(preset, seconds, codec), indent=1))
  base = train_base(preset, root)
  jobs = [(v, s) for s in preset.seeds for v in preset.variants]
  for variant, seed in tqdm.tqdm(jobs, desc=f"evaluate {preset_name}"):
    run_variant(preset, variant, seed, root)
  rows = collect(preset, root)
  (root / "results.json").write_text(json.dumps(rows, indent=1))
  write_markdown(rows, preset_name, root / "results.md",
                 f"Every variant starts from one shared base: local attention alone, trained "
                 f"{base['steps']} steps at 3 s (batch {base['batch']}, seed 0, "
                 f"{base['train_s']:.0f} s); its global layer is then added fresh.")
  plot(rows, root)
  return rows


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not jax.config.jax_compilation_cache_dir:
    # Seeds of a variant compile the same programs: the second and third load them.
    jax.config.update("jax_compilation_cache_dir",
                      str(pathlib.Path(FLAGS.workdir).absolute() / "jax_cache"))
  run(FLAGS.preset, FLAGS.workdir, tuple(FLAGS.variants) if FLAGS.variants else None)
  print((pathlib.Path(FLAGS.workdir) / "results.md").read_text())


FLAGS = flags.FLAGS

if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Where runs, results.json/.md and plots go.")
  flags.DEFINE_enum("preset", "ci", list(PRESETS), "ci: every variant, small; full: the "
                    "comparison (9 / 18 / 63 s, 3 seeds).")
  flags.DEFINE_list("variants", None, f"Subset of {tuple(VARIANTS)} (default: all).")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
