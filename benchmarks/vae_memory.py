"""Bounded-memory decoding with the CogVideoX VAE: compiled chunk memory at 5B size, and a streamed run.

    python benchmarks/vae_memory.py                               # ~5 min on 2 CPU cores
    python benchmarks/vae_memory.py --latent_frames=13,253        # the full 63 s (1009 frames)
    python benchmarks/vae_memory.py --nocompiled --latent_frames=1,3 --latent_size=8,12  # smoke

(a) compiled: XLA's memory_analysis() of the jitted decoder chunk step of
the real CogVideoX-5B VAE (block_out_channels 128, 256, 256, 512, 3 layers
per block, 32 groups, 16 latent channels), built abstractly (nnx.eval_shape:
no weights) at 60x90 latents (480x720 pixels), for the first chunk (3 latent
frames -> 9 frames, no caches in) and the steady chunk (2 -> 8, caches in and
out, donated), untiled and tiled (diffusers' enable_tiling() defaults:
30x45-latent tiles, overlaps 1/6 and 1/5; the full-size tile's step). Full
5B decoding of 1009 frames is ~PFLOPs: out of reach of a CPU, so this is
the figure for a device.
(b) streamed: a random VAE of the same topology but narrow widths decodes
each --latent_frames count at --latent_size through `decode_chunks`, every
chunk taken to the host (as uint8 RGB, appended to --out if given) and
dropped, while a thread samples the process's RSS; chunk shapes are compiled
beforehand, so the peaks compare like with like.

One JSON line:
  compiled: decoder_params_gb; latent_hw; untiled / tiled: {tiles (count),
    tile_latent_hw, caches_gb (all tiles' conv caches: what persists between
    chunks), first / steady: {frames, argument_gb, output_gb, alias_gb,
    temp_gb, peak_gb = argument + output - alias + temp, compile_s},
    footprint_gb (steady peak_gb + the other tiles' caches: the decode's
    device memory, bar one chunk of output)}
  streamed: widths, groups, latent_hw, baseline_rss_gb (after compiling),
    runs: [{latent_frames, frames, chunks, seconds, peak_rss_gb, video_gb (the
    whole decoded video in fp32, never held)}], growth_gb (last run's peak -
    first run's)
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import resource
import threading
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from ttt_jax.models.cogvideox_vae import ChunkedVAE, CogVideoXVAE, CogVideoXVAEConfig, Tiling

flags.DEFINE_bool("compiled", True, "Run (a): compiled memory of the 5B decoder's chunk steps.")
flags.DEFINE_list("latent_frames", ["13", "61"], "Latent frame counts of the streamed runs "
                  "(1 + 12k: 3 s segments; 253 = 63 s).")
flags.DEFINE_list("latent_size", ["60", "90"], "Latent height, width (8x: pixels).")
flags.DEFINE_list("widths", ["4", "8", "8", "8"], "block_out_channels of the streamed run's VAE.")
flags.DEFINE_integer("groups", 2, "norm_num_groups of the streamed run's VAE.")
flags.DEFINE_string("out", None, "Append the streamed frames (raw uint8 RGB) to this file.")
FLAGS = flags.FLAGS

GB = 1e9
CONFIG_5B = CogVideoXVAEConfig(scaling_factor=0.7)


def nbytes(tree: Any) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def step_memory(vae: ChunkedVAE, z: jax.ShapeDtypeStruct, caches: Any) -> dict[str, float]:
  frames = jax.eval_shape(vae.decode_step, vae.state, z, caches)[0].shape[1]
  t0 = time.perf_counter()
  m = vae.decode_step.lower(vae.state, z, caches).compile().memory_analysis()
  figures = dict(argument_gb=m.argument_size_in_bytes / GB, output_gb=m.output_size_in_bytes / GB,
                 alias_gb=m.alias_size_in_bytes / GB, temp_gb=m.temp_size_in_bytes / GB)
  figures["peak_gb"] = (figures["argument_gb"] + figures["output_gb"] - figures["alias_gb"]
                        + figures["temp_gb"])
  return dict(frames=frames, **figures, compile_s=time.perf_counter() - t0)


def compiled(height: int, width: int) -> dict[str, Any]:
  """(a): the 5B decoder's first and steady chunk steps, untiled and on a full tile."""
  abstract = nnx.eval_shape(lambda: CogVideoXVAE(CONFIG_5B, rngs=nnx.Rngs(0)))
  out: dict[str, Any] = dict(latent_hw=[height, width])
  for name, tiling in (("untiled", None), ("tiled", Tiling())):
    vae = ChunkedVAE(abstract, tiling)
    tiles = [t for row in vae.tiles(height, width, decode=True) for t in row]
    latent = lambda n, rows, cols: jax.ShapeDtypeStruct(
        (1, n, len(range(height)[rows]), len(range(width)[cols]), CONFIG_5B.latent_channels),
        jnp.float32)
    caches = [jax.eval_shape(vae.decode_step, vae.state, latent(3, *t), None)[1] for t in tiles]
    first = latent(3, *tiles[0])  # a full-size tile (or the whole frame)
    steady = step_memory(vae, latent(2, *tiles[0]), caches[0])
    out[name] = dict(tiles=len(tiles), tile_latent_hw=list(first.shape[2:4]),
                     caches_gb=nbytes(caches) / GB, first=step_memory(vae, first, None),
                     steady=steady,
                     footprint_gb=steady["peak_gb"] + nbytes(caches[1:]) / GB)
  out["decoder_params_gb"] = nbytes(abstract.decoder) / GB
  return out


class PeakRSS:
  """Peak resident set size over a `with` block, sampled every 2 ms from /proc/self/status."""

  @staticmethod
  def now() -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmRSS:"):
        return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")

  def __enter__(self) -> PeakRSS:
    self.peak, self._done = self.now(), threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)
    self._thread.start()
    return self

  def _sample(self) -> None:
    while not self._done.wait(0.002):
      self.peak = max(self.peak, self.now())

  def __exit__(self, *exc) -> None:
    self._done.set()
    self._thread.join()
    self.peak = max(self.peak, self.now())


def consume(chunks: Iterator[jax.Array], out: pathlib.Path | None) -> int:
  """Takes every chunk to the host as uint8 frames, optionally appended to `out`; chunk count."""
  n = 0
  with open(out, "ab") if out else contextlib.nullcontext() as f:
    for chunk in chunks:
      frames = np.asarray(chunk)  # [B, t, H, W, 3], about [-1, 1]
      frames = np.clip((frames + 1) * 127.5 + 0.5, 0, 255).astype(np.uint8)
      if f:
        frames.tofile(f)
      n += 1
  return n


def streamed(lengths: list[int], height: int, width: int, widths: tuple[int, ...],
             groups: int, out: pathlib.Path | None) -> dict[str, Any]:
  """(b): peak RSS of decode_chunks over videos of each length, after compiling both chunk shapes."""
  cfg = CogVideoXVAEConfig(block_out_channels=widths, norm_num_groups=groups, scaling_factor=0.7)
  vae = ChunkedVAE(CogVideoXVAE(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  latents = lambda n: jnp.asarray(rng.standard_normal((1, n, height, width, cfg.latent_channels),
                                                      np.float32))
  consume(vae.decode_chunks(latents(5)), None)  # compiles the 3- and 2-frame chunk steps
  result: dict[str, Any] = dict(widths=list(widths), groups=groups, latent_hw=[height, width],
                                baseline_rss_gb=PeakRSS.now() / GB, runs=[])
  for n in lengths:
    z = latents(n)
    t0 = time.perf_counter()
    with PeakRSS() as rss:
      chunks = consume(vae.decode_chunks(z), out)
    frames = 1 + cfg.temporal_compression_ratio * (n - 1)
    result["runs"].append(dict(
        latent_frames=n, frames=frames, chunks=chunks, seconds=time.perf_counter() - t0,
        peak_rss_gb=rss.peak / GB,
        video_gb=frames * height * width * cfg.spatial_factor ** 2 * 3 * 4 / GB))
    del z
  result["growth_gb"] = result["runs"][-1]["peak_rss_gb"] - result["runs"][0]["peak_rss_gb"]
  return result


def main(argv):
  del argv
  height, width = map(int, FLAGS.latent_size)
  lengths = [int(n) for n in FLAGS.latent_frames]
  if any(n % 2 == 0 for n in lengths):  # an even count's first chunk would compile mid-run
    raise app.UsageError(f"--latent_frames must be odd (CogVideoX's 1 + 12k), got {lengths}")
  row: dict[str, Any] = dict(device=jax.devices()[0].device_kind)
  if FLAGS.compiled:
    row["compiled"] = compiled(60, 90)
  row["streamed"] = streamed(lengths, height, width,
                             tuple(int(w) for w in FLAGS.widths), FLAGS.groups,
                             pathlib.Path(FLAGS.out) if FLAGS.out else None)
  row["max_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
  print(json.dumps(row))


if __name__ == "__main__":
  app.run(main)
