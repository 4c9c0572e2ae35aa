"""How one trained run of the video comparison is scored: held-out storyboards, probes,
held-out losses by segment, caption-swap gains, the memory signal, and cost.

The remembered attribute is the house's paint (`ToyCartoonConfig.paints`): the
walls' and the floor's colours, named in the first caption only and kept by
every scene. It covers the frame at known places, so at high noise, where the
noisy frames no longer show it, knowing it is worth a large share of the loss.

Local attention's reach: its windows share one boundary frame, so the first
caption reaches segment i after i + 1 blocks, and a D-block DiT's local
attention reaches segments 0..D-1. Segments from index D on are `beyond`
its reach: what their predictions know of the first caption, only the global
slot can have carried. Their caption-swap gain (`swap_gain_later`) is exactly 0
for local attention alone, by construction, and the sampled `consistency` is
scored on them only.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ttt_jax import checkpoint, flops, optim, train
from ttt_jax.data import pipeline, toy_cartoons, toy_probe
from ttt_jax.diffusion import NoiseSchedule, TimestepDistribution, v_prediction_loss
from ttt_jax.models import dit

HELDOUT_SEED = 1_000_003  # toy-cartoon seed of the held-out storyboards (training uses seed 0)
CHANCE_STORYBOARDS = 64  # other storyboards whose first captions give the chance level
# Quadrature of the memory signal over a timestep distribution: bin edges, finer at high
# noise, where the caption's worth changes fastest; each bin is scored at its middle.
SIGNAL_EDGES = (0, 200, 400, 600, 700, 800, 850, 900, 925, 950, 970, 985, 1000)

Videos = list[toy_cartoons.ToyVideo]
LossFn = Callable[[Videos, Iterable[int]], np.ndarray]


def beyond_reach(num_segments: int, depth: int) -> range:
  """The segments a `depth`-block DiT's local attention cannot reach from the first caption."""
  return range(min(depth, num_segments), num_segments)


# ----------------------------------------------------------------------------- storyboards


def toy_config(data: Mapping[str, Any], seconds: int, seed: int, num_videos: int
               ) -> toy_cartoons.ToyCartoonConfig:
  """The toy cartoons of the evaluation's data settings (`preset.data`) at `seconds`."""
  return toy_cartoons.ToyCartoonConfig(
      seconds=seconds, height=data["height"], width=data["width"], seed=seed,
      num_videos=num_videos, colours=tuple(data["colours"].split(",")),
      paints=tuple(data["paints"].split(",")), restate_paint=data["restate_paint"])


def heldout_videos(data: Mapping[str, Any], seconds: int, count: int) -> Videos:
  """`count` storyboards no run trains on (their own seed), with their ground-truth frames."""
  cfg = toy_config(data, seconds, HELDOUT_SEED, count)
  return [toy_cartoons.generate_video(cfg, i) for i in range(count)]


def swapped_paint(video: toy_cartoons.ToyVideo, index: int, paints: Sequence[str]
                  ) -> tuple[str, str]:
  """Another (wall, floor) paint for held-out storyboard `index`: neither band keeps its own,
  drawn from the index (every run is scored on the same counterfactuals)."""
  truth = toy_probe.caption_paint(video)
  rng = np.random.default_rng([HELDOUT_SEED, index])
  while True:  # with 6 paints, 21 of 30 ordered pairs qualify
    wall, floor = (str(p) for p in rng.choice(list(paints), size=2, replace=False))
    if wall != truth[0] and floor != truth[1]:
      return wall, floor


def swapped_videos(videos: Videos, paints: Sequence[str]) -> Videos:
  """`videos` (same frames) whose storyboards name `swapped_paint` wherever they name it."""
  return [toy_cartoons.with_named_colours(v, paint=swapped_paint(v, i, paints))
          for i, v in enumerate(videos)]


@functools.cache
def _chance_paints(paints: str) -> tuple[tuple[str, str], ...]:
  # 3 s and the smallest size are enough: the paint is drawn before anything is rasterised.
  cfg = toy_cartoons.ToyCartoonConfig(seconds=3, height=16, width=32, seed=HELDOUT_SEED + 1,
                                      num_videos=CHANCE_STORYBOARDS,
                                      paints=tuple(paints.split(",")))
  return tuple(toy_probe.caption_paint(toy_cartoons.generate_video(cfg, i))
               for i in range(CHANCE_STORYBOARDS))


def chance_paints(data: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
  """The (wall, floor) paints the first captions of 64 other storyboards name: what a video
  that ignores its own storyboard agrees with as often."""
  return _chance_paints(data["paints"])


# ----------------------------------------------------------------------------- probes


def probe_video(frames: np.ndarray, video: toy_cartoons.ToyVideo, depth: int,
                data: Mapping[str, Any]) -> dict[str, float]:
  """What a video (uint8 [T, H, W, 3]) shows of its storyboard's paint.

  consistency: the share of (wall, floor) in the segments beyond local attention's reach
  that show the first caption's paint; first_segment: the same in the first segment. Each
  also as a lift: minus its mean against 64 other storyboards' paints, so that only the
  storyboard's own paint lifts (a video that paints every room one fixed way does not)."""
  num_segments = len(video.captions)
  read = toy_probe.paints_per_segment(frames, num_segments)
  scores = {}
  groups = {"first_segment": range(1), "consistency": beyond_reach(num_segments, depth)}
  for name, segments in groups.items():
    if len(segments):
      scores[name] = toy_probe.paint_agreement(read, toy_probe.caption_paint(video), segments)
      scores[f"{name}_lift"] = scores[name] - float(np.mean(
          [toy_probe.paint_agreement(read, p, segments) for p in chance_paints(data)]))
  return scores


def to_uint8(video: np.ndarray) -> np.ndarray:
  """Decoded frames in [-1, 1] (unclipped) -> uint8."""
  return np.round((np.clip(video, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def validate_probe(data: Mapping[str, Any], seconds: int, count: int, depth: int,
                   codec: Any) -> dict[str, dict[str, float]]:
  """The paint probe on held-out ground truth through the codec (consistency must be 1) and
  on copies repainted from the first segment beyond reach on (`change_detected`: the
  fraction it flags; must be 1). Nothing to score where no segment is beyond reach."""
  videos = heldout_videos(data, seconds, count)
  segments = beyond_reach(len(videos[0].captions), depth)
  if not len(segments):
    return {}
  paints = tuple(data["paints"].split(","))
  scores: dict[str, list[float]] = {"ground_truth": [], "repainted": []}
  for i, video in enumerate(videos):
    for name, frames in (("ground_truth", video.frames),
                         ("repainted", toy_probe.repaint(
                             video, swapped_paint(video, i, paints), segments[0]))):
      decoded = to_uint8(np.asarray(codec.decode(codec.encode(
          toy_cartoons.frames_to_float(frames)[None])))[0])
      scores[name].append(probe_video(decoded, video, depth, data)["consistency"])
  return {name: {"consistency": float(np.mean(v)),
                 "change_detected": float(np.mean(np.asarray(v) < 1.0 - 1e-9))}
          for name, v in scores.items()}


# ----------------------------------------------------------------------------- losses


def load_model(config: ml_collections.ConfigDict, run_dir: pathlib.Path) -> dit.VideoDiT:
  """The DiT of `config` with the trained parameters of `run_dir`."""
  model = dit.build(config.model, text_dim=config.data.text_dim, rngs=nnx.Rngs(0))
  checkpoint.load_params(run_dir, model)
  return model


def segment_loss_fn(config: ml_collections.ConfigDict, model: dit.VideoDiT) -> LossFn:
  """f(videos, timesteps) -> [num_segments]: the held-out v-prediction loss of each segment's
  latent frames under `model`, the mean over videos and timesteps. The noise is fixed by
  (video, timestep) position, so two calls on the same frames see the same noise."""
  codec, text_encoder = pipeline.make_encoders(config.data)
  layout = pipeline.video_layout(config.data, config.seconds, codec, model.patch_size)
  schedule = NoiseSchedule.create(num_steps=config.diffusion.num_steps)
  bounds = np.cumsum((0, *layout.segment_frames))
  frame = np.arange(bounds[-1])
  masks = jnp.asarray(np.stack([(frame >= a) & (frame < b)
                                for a, b in zip(bounds[:-1], bounds[1:])]), jnp.float32)  # [S, T]

  @nnx.jit
  def losses(model, latents, text, noise, t):  # [1, T, h, w, C], ... -> [S]
    v = model(schedule.add_noise(latents, noise, t), text, t, layout)
    return jax.vmap(lambda m: v_prediction_loss(v, latents, noise, t, schedule,
                                                mask=m[None, :, None, None, None])[0])(masks)

  def mean_losses(videos: Videos, timesteps: Iterable[int]) -> np.ndarray:
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


def swap_gains(loss_fn: LossFn, videos: Videos, swapped: Videos, timesteps: Iterable[int]
               ) -> tuple[np.ndarray, np.ndarray]:
  """(loss, gain), each [num_segments]: the held-out loss under the true storyboards, and the
  loss under the `swapped` ones minus it (same frames and noise). The gain is positive where
  a segment's prediction uses the paint the captions named: in the first segment, whether
  the model reads its caption at all; beyond local attention's reach, whether its global
  slot carries the first caption that far."""
  timesteps = tuple(timesteps)
  loss = loss_fn(videos, timesteps)
  return loss, loss_fn(swapped, timesteps) - loss


def memory_signal(loss_fn: LossFn, videos: Videos, swapped: Videos,
                  distributions: Mapping[str, TimestepDistribution], num_steps: int
                  ) -> dict[str, float]:
  """What knowing the first caption's paint is worth to a one-segment clip's loss, as a share
  of that loss, over each timestep distribution: sum_bins P(bin) gain(mid) / sum_bins P(bin)
  loss(mid) on `SIGNAL_EDGES`. In a 3 s clip the caption is in context, so this is the
  most a perfect memory of scene 1 could lower a later segment's loss, averaged as training
  draws t (`memory_share_<name>`)."""
  mids = [(a + b) // 2 for a, b in zip(SIGNAL_EDGES[:-1], SIGNAL_EDGES[1:])]
  pairs = [swap_gains(loss_fn, videos, swapped, (t,)) for t in mids]  # a 3 s clip: 1 segment
  loss = np.array([l[0] for l, _ in pairs])  # [bins]
  gain = np.array([g[0] for _, g in pairs])  # [bins]
  out = {}
  for name, dist in distributions.items():
    cdf = np.cumsum(np.concatenate([[0.0], dist.probabilities(num_steps)]))
    mass = cdf[list(SIGNAL_EDGES[1:])] - cdf[list(SIGNAL_EDGES[:-1])]  # [bins]
    out[f"memory_share_{name}"] = float(mass @ gain / (mass @ loss))
  return out


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
