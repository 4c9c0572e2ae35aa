"""Sample a multi-scene video from a storyboard with a trained workdir.

    python -m ttt_jax.sample --workdir=workdirs/tiny/63s --storyboard=story.jsonl

A storyboard is one caption per 3-second segment: a text file with one
caption per line, JSON lines {"scene": s, "caption": "..."}, or a line of
`ttt_jax.data.prepare`'s format {"scenes": [{"captions": [...]}, ...]}. Needs only
the workdir (config.json + checkpoints/). Writes <out>.mp4 and <out>.gif.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import imageio.v3 as iio
import imageio_ffmpeg
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx

from ttt_jax import checkpoint, preflight
from ttt_jax.data import pipeline
from ttt_jax.layout import SECONDS_PER_SEGMENT, VideoLayout
from ttt_jax.diffusion import NoiseSchedule, ddim_sample, dpmpp_2m_sample
from ttt_jax.models import dit
from ttt_jax.parallel import mesh as mesh_lib
from ttt_jax.parallel import sharding

SAMPLERS = ("ddim", "dpmpp_2m", "dpmpp_2m_sde")

FLAGS = flags.FLAGS


def load_storyboard(path: str | pathlib.Path) -> list[str]:
  """One caption per segment from a .txt (a line each) or .jsonl file: lines
  {"caption": ...} per segment, or prepare's {"scenes": [{"captions": [...]}, ...]}."""
  path = pathlib.Path(path)
  captions = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    if path.suffix == ".jsonl":
      try:
        row = json.loads(line)
        captions += ([str(c) for scene in row["scenes"] for c in scene["captions"]]
                     if "scenes" in row else [str(row["caption"])])
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{n}: expected a JSON object with a \"caption\" or "
                         f"\"scenes\" ({e})") from e
    else:
      captions.append(line.strip())
  if not captions:
    raise ValueError(f"{path}: storyboard has no captions")
  return captions


def load_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  path = pathlib.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir} a training workdir?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


class Sampler:
  """A trained workdir loaded once: `sampler(captions)` -> uint8 frames [T, H, W, 3].

  Sampling many storyboards (e.g. `ttt_jax.evaluate`) reuses the weights and,
  for storyboards of the same length, the compiled denoiser.
  """

  def __init__(self, workdir: str | pathlib.Path, num_segments: int):
    """num_segments: the storyboard length the mesh and memory are checked for."""
    config = load_config(workdir)
    with config.unlocked():
      config.seconds = SECONDS_PER_SEGMENT * num_segments  # the video asked for
    preflight.check(config, "sample")
    self.config = config
    self.codec, self.text_encoder = pipeline.make_encoders(config.data)
    # One video on a mesh (default: every device in one context group): the weights are
    # created sharded and restored into those shardings, the sequence is split over context.
    self.mesh = mesh_lib.make_mesh(preflight.mesh_config(config, "sample")[1])
    model = sharding.init_sharded(
        lambda: dit.build(config.model, text_dim=config.data.text_dim, rngs=nnx.Rngs(0)),
        self.mesh)
    checkpoint.load_params(workdir, model)
    self.patch_size = model.patch_size
    self.graph, self.params = nnx.split(model)
    self._denoisers: dict[int, Any] = {}

  def _denoiser(self, layout: VideoLayout):
    # Params are an argument (no closure constants); the merge happens inside this jit's own
    # trace, where nnx's transforms (the block scan) expect their Variables to be created.
    key = len(layout.segment_frames)
    if key not in self._denoisers:
      graph = self.graph
      self._denoisers[key] = jax.jit(lambda p, x, t, c: nnx.merge(graph, p)(x, c, t, layout))
    return self._denoisers[key]

  def __call__(self, captions: list[str], *, steps: int | None = None,
               guidance_scale: float | None = None, sampler: str | None = None,
               seed: int | None = None, progress: bool = True) -> np.ndarray:
    """Captions (one per 3 s segment) -> uint8 frames [T, H, W, 3]."""
    config, s = self.config, self.config.sample
    steps = steps or s.steps
    guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
    sampler, seed = sampler or s.sampler, s.seed if seed is None else seed
    if sampler not in SAMPLERS:
      raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")
    codec, text_encoder = self.codec, self.text_encoder
    layout = pipeline.video_layout(config.data, SECONDS_PER_SEGMENT * len(captions), codec,
                                   self.patch_size)
    cond = jnp.asarray(pipeline.encode_captions(captions, text_encoder,
                                                config.data.text_len))[None]
    # The null caption, as text dropout used it in training: the encoding of "".
    uncond = jnp.asarray(pipeline.null_caption(text_encoder, len(captions),
                                               config.data.text_len))[None]
    shape = (1, *codec.latent_shape(codec.num_frames(layout.num_frames),
                                    config.data.height, config.data.width))
    k_noise, k_sde = jax.random.split(jax.random.key(seed))
    x_T = jax.random.normal(k_noise, shape)
    kw = dict(schedule=NoiseSchedule.create(num_steps=config.diffusion.num_steps),
              num_steps=steps, guidance_scale=guidance_scale, dynamic_cfg=s.dynamic_cfg,
              progress=progress)
    denoise = self._denoiser(layout)
    with jax.set_mesh(self.mesh):
      if sampler == "ddim":
        latents = ddim_sample(denoise, self.params, x_T, cond, uncond, **kw)
      else:
        latents = dpmpp_2m_sample(denoise, self.params, x_T, cond, uncond, rng=k_sde,
                                  sde=sampler == "dpmpp_2m_sde", **kw)
    # Chunk by chunk to uint8 on the host: the decoder's memory stays one chunk's.
    return np.concatenate([np.round((np.clip(chunk[0], -1.0, 1.0) + 1.0) * 127.5)
                           .astype(np.uint8) for chunk in codec.decode_chunks(latents)])


def sample_video(workdir: str | pathlib.Path, captions: list[str], **kw: Any) -> np.ndarray:
  """Captions (one per 3 s segment) -> uint8 frames [T, H, W, 3]; kw: `Sampler.__call__`'s."""
  return Sampler(workdir, len(captions))(captions, **kw)


def write_video(frames: np.ndarray, out: str | pathlib.Path, fps: int) -> list[pathlib.Path]:
  """uint8 [T, H, W, 3] -> out.mp4 (H.264, yuv420p: plays everywhere) and out.gif."""
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  mp4, gif = out.with_suffix(".mp4"), out.with_suffix(".gif")
  T, H, W, _ = frames.shape
  writer = imageio_ffmpeg.write_frames(str(mp4), (W, H), fps=fps, codec="libx264",
                                       pix_fmt_out="yuv420p", macro_block_size=1)
  writer.send(None)  # start the encoder
  for frame in frames:
    writer.send(np.ascontiguousarray(frame))
  writer.close()
  iio.imwrite(gif, frames, duration=1000 / fps, loop=0)
  return [mp4, gif]


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  captions = load_storyboard(FLAGS.storyboard)
  frames = sample_video(FLAGS.workdir, captions, steps=FLAGS.steps,
                        guidance_scale=FLAGS.guidance_scale, sampler=FLAGS.sampler, seed=FLAGS.seed)
  out = FLAGS.out or pathlib.Path(FLAGS.workdir) / "samples" / pathlib.Path(FLAGS.storyboard).stem
  fps = load_config(FLAGS.workdir).sample.fps
  for path in write_video(frames, out, fps):
    print(path)


if __name__ == "__main__":  # flags live here so other entry points can import sample_video()
  flags.DEFINE_string("workdir", None, "Trained workdir (config.json, checkpoints/).")
  flags.DEFINE_string("storyboard", None, "Captions: .txt lines or .jsonl.")
  flags.DEFINE_string("out", None, "Output path without extension "
                      "(default: <workdir>/samples/<storyboard name>).")
  flags.DEFINE_integer("steps", None, "Sampling steps (default: config.sample.steps).")
  flags.DEFINE_float("guidance_scale", None, "CFG scale (default: config).")
  flags.DEFINE_enum("sampler", None, SAMPLERS, "Sampler (default: config).")
  flags.DEFINE_integer("seed", None, "Noise seed (default: config.sample.seed).")
  flags.mark_flags_as_required(["workdir", "storyboard"])
  app.run(main)
