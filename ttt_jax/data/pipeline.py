"""Videos -> cached latents and caption embeddings -> shuffled, sharded batches.

The codec and the text encoder are frozen, so every example is encoded once
and cached (`.npz` in the workdir); training then reads small arrays. Batches
come from a `grain.MapDataset` (shuffle, repeat, batch) sharded by JAX
process, and its iterator state is a small JSON dict that the checkpoint
stores so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Mapping

import grain.python as grain
import jax
import numpy as np
import tqdm
from absl import logging

from ttt_jax.data import toy_cartoons
from ttt_jax.layout import VideoLayout
from ttt_jax.models.text import TextEncoder
from ttt_jax.models.vae import LatentCodec

DATASETS = ("toy_cartoons",)


def video_layout(data_cfg: Mapping[str, Any], seconds: int, codec: LatentCodec,
                 patch_size: int) -> VideoLayout:
  """The token layout of one training video of `seconds` under this data config."""
  step = codec.spatial_factor * patch_size
  if data_cfg["height"] % step or data_cfg["width"] % step:
    raise ValueError(f"data.height x data.width = {data_cfg['height']}x{data_cfg['width']} "
                     f"must be multiples of {step} (codec {codec.spatial_factor}x, patch {patch_size})")
  return VideoLayout.from_seconds(seconds, text_len=data_cfg["text_len"],
                                  height=data_cfg["height"] // step,
                                  width=data_cfg["width"] // step)


def encode_captions(captions: list[str], text_encoder: TextEncoder, text_len: int) -> np.ndarray:
  """Per-segment captions -> [S * text_len, dim] in the layout's canonical text order."""
  emb, _ = text_encoder.encode(captions, text_len)  # [S, text_len, dim]
  return np.asarray(emb).reshape(-1, emb.shape[-1])


def null_caption(text_encoder: TextEncoder, num_segments: int, text_len: int) -> np.ndarray:
  """The null caption of classifier-free guidance: the encoding of "" for every segment,
  [S * text_len, dim] like a video's captions (zeros for the toy encoder, T5("") for T5)."""
  return encode_captions([""] * num_segments, text_encoder, text_len)


def _source(data_cfg: Mapping[str, Any], seconds: int):
  if data_cfg["name"] not in DATASETS:
    raise ValueError(f"unknown data.name {data_cfg['name']!r}; known: {DATASETS}")
  return toy_cartoons.ToyCartoonSource(toy_cartoons.ToyCartoonConfig(
      seconds=seconds, height=data_cfg["height"], width=data_cfg["width"],
      seed=data_cfg["seed"], num_videos=data_cfg["num_videos"]))


def cache_limit(data_cfg: Mapping[str, Any], seconds: int, codec: LatentCodec, text_dim: int,
                num_videos: int) -> int:
  """How many videos the in-memory cache takes: all, or as many as data.max_cache_gb holds.

  The cache is encoded before step 1; at paper size the toy set would be
  hundreds of GB and days of encoding, so it is capped, with a message.
  """
  T, h, w, C = codec.latent_shape(toy_cartoons.num_frames(seconds), data_cfg["height"],
                                  data_cfg["width"])
  per_video = 4 * (T * h * w * C + (seconds // 3) * data_cfg["text_len"] * text_dim)
  limit = max(jax.process_count(), int(data_cfg["max_cache_gb"] * 1e9 // per_video))
  if limit < num_videos:
    logging.warning("data: %d toy videos of %d s at %dx%d are %.0f GB of latents; caching the "
                    "first %d (data.max_cache_gb=%g); raise it to use more", num_videos, seconds,
                    data_cfg["height"], data_cfg["width"], num_videos * per_video / 1e9, limit,
                    data_cfg["max_cache_gb"])
  return min(limit, num_videos)


def build_examples(data_cfg: Mapping[str, Any], seconds: int, codec: LatentCodec,
                   text_encoder: TextEncoder, cache_dir: str | pathlib.Path | None = None
                   ) -> dict[str, np.ndarray]:
  """This process's examples (videos proc, proc + P, ...): latents [N, T, h, w, C] and
  text [N, S*text_len, dim], float32. Each process encodes and caches only its share."""
  n_proc, proc = jax.process_count(), jax.process_index()
  key = json.dumps({**dict(data_cfg), "seconds": seconds, "text_dim": text_encoder.dim},
                   sort_keys=True)
  cache = None
  if cache_dir is not None:
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache = pathlib.Path(cache_dir) / f"{data_cfg['name']}_{seconds}s_{digest}_p{proc}of{n_proc}.npz"
    if cache.exists():
      with np.load(cache) as f:
        return {"latents": f["latents"], "text": f["text"]}

  source = _source(data_cfg, seconds)
  if len(source) < n_proc:
    raise ValueError(f"data.num_videos={len(source)} cannot be shared by {n_proc} processes")
  count = cache_limit(data_cfg, seconds, codec, text_encoder.dim, len(source))
  encode = jax.jit(codec.encode)
  latents, text = [], []
  for i in tqdm.tqdm(range(proc, count, n_proc), desc=f"encoding {seconds}s videos",
                     leave=False, disable=proc != 0):
    item = source[i]
    video = toy_cartoons.frames_to_float(item["frames"])[None]  # [1, T, H, W, 3]
    latents.append(np.asarray(encode(video))[0])
    text.append(encode_captions(list(item["captions"]), text_encoder, data_cfg["text_len"]))
  examples = {"latents": np.stack(latents), "text": np.stack(text)}
  if cache is not None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp.npz")
    np.savez(tmp, **examples)
    tmp.replace(cache)  # atomic: a crashed write never leaves a half cache
  return examples


class _Examples(grain.RandomAccessDataSource):
  def __init__(self, examples: Mapping[str, np.ndarray]):
    self._examples = examples

  def __len__(self) -> int:
    return len(self._examples["latents"])

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self._examples.items()}


def batches(examples: Mapping[str, np.ndarray], global_batch: int, seed: int
            ) -> grain.DatasetIterator:
  """Endless iterator of this process's rows of each global batch, from its examples.

  Returns a grain iterator: `get_state()` / `set_state()` checkpoint it.
  """
  n_proc = jax.process_count()
  if global_batch % n_proc:
    raise ValueError(f"train.batch_size {global_batch} is not divisible by the "
                     f"{n_proc} JAX processes")
  ds = grain.MapDataset.source(_Examples(examples)).shuffle(seed=seed).repeat()
  return iter(ds.batch(global_batch // n_proc, drop_remainder=True))
