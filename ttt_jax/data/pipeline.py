"""Prepared clips -> shuffled, sharded, prefetched batches; the encoders a data config names.

Training reads a `ttt_jax.data.dataset` folder by random access (nothing is
loaded whole): `data.name="storyboard"` is one written by
`python -m ttt_jax.data.prepare` into `data.dir`; `data.name="toy_cartoons"`
generates and encodes the embedded toy set through the same builder, once,
into `data.dir` (default `<workdir>/data`). Batches come from a
`grain.MapDataset` (this process's shard, shuffle, repeat, batch) with a
bounded prefetch, and its iterator state is a small JSON dict that the
checkpoint stores, so a resumed run sees exactly the batches it would have
seen.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Iterator, Mapping

import grain.python as grain
import jax
import numpy as np
import tqdm

from ttt_jax.data import dataset, toy_cartoons
from ttt_jax.layout import VideoLayout
from ttt_jax.models.text import TextEncoder, make_text_encoder
from ttt_jax.models.vae import LatentCodec, make_codec

DATASETS = ("toy_cartoons", "storyboard")


def make_encoders(data_cfg: Mapping[str, Any]) -> tuple[LatentCodec, TextEncoder]:
  """The frozen codec and text encoder a data config names (data.codec[_path], ...)."""
  codec_kw = {"path": data_cfg["codec_path"]} if data_cfg["codec_path"] else {}
  text_kw = {"path": data_cfg["text_encoder_path"]} if data_cfg["text_encoder_path"] else {}
  return (make_codec(data_cfg["codec"], **codec_kw),
          make_text_encoder(data_cfg["text_encoder"], dim=data_cfg["text_dim"], **text_kw))


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


def clip_spec(data_cfg: Mapping[str, Any], seconds: int, codec: LatentCodec,
              text_encoder: TextEncoder) -> dataset.ClipSpec:
  """What a dataset must hold for training `seconds`-long clips under this data config."""
  frames = toy_cartoons.num_frames(seconds)
  return dataset.ClipSpec(
      seconds=seconds, height=data_cfg["height"], width=data_cfg["width"],
      latent_shape=codec.latent_shape(frames, data_cfg["height"], data_cfg["width"]),
      text_len=data_cfg["text_len"], text_dim=text_encoder.dim, codec=data_cfg["codec"],
      text_encoder=data_cfg["text_encoder"])


def toy_config_name(data_cfg: Mapping[str, Any], seconds: int) -> str:
  """Dataset config of a toy set: its length plus a digest of everything that shapes it."""
  keys = ("seed", "num_videos", "height", "width", "text_len", "text_dim", "codec",
          "text_encoder")
  shape = {k: data_cfg[k] for k in keys}
  # Only when set: default sets keep their names.
  shape.update({k: data_cfg[k] for k in ("colours", "paints", "restate_paint") if data_cfg[k]})
  digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:12]
  return f"toy_{seconds}s_{digest}"


def toy_examples(data_cfg: Mapping[str, Any], seconds: int, codec: LatentCodec,
                 text_encoder: TextEncoder) -> Iterator[tuple[str, dict[str, Any]]]:
  """(key, example) of every toy cartoon, encoded one video at a time."""
  source = toy_cartoons.ToyCartoonSource(toy_cartoons.ToyCartoonConfig(
      seconds=seconds, height=data_cfg["height"], width=data_cfg["width"],
      seed=data_cfg["seed"], num_videos=data_cfg["num_videos"],
      **({"colours": tuple(data_cfg["colours"].split(","))} if data_cfg["colours"] else {}),
      paints=tuple(data_cfg["paints"].split(",")) if data_cfg["paints"] else (),
      restate_paint=data_cfg["restate_paint"]))
  for i in tqdm.tqdm(range(len(source)), desc=f"encoding {seconds} s toy videos", leave=False):
    item = source[i]
    video = toy_cartoons.frames_to_float(item["frames"])[None]  # [1, T, H, W, 3]
    captions = [str(c) for c in item["captions"]]
    yield f"toy{i:06d}", {
        "latents": np.asarray(codec.encode(video), np.float32)[0],
        "text": encode_captions(captions, text_encoder, data_cfg["text_len"]).astype(np.float32),
        "captions": captions,
        "segments": np.arange(len(captions), dtype=np.int32),
        "scenes": item["scenes"],
        "source": f"toy_cartoons[{i}]",
    }


def prepare_command(data_cfg: Mapping[str, Any], seconds: int) -> str:
  return (f"prepare it with python -m ttt_jax.data.prepare --storyboard=STORY.jsonl "
          f"--videos=DIR --out={data_cfg['dir'] or 'DATA_DIR'} --config=<the {seconds} s "
          f"stage config>")


def open_dataset(data_cfg: Mapping[str, Any], seconds: int, codec: LatentCodec,
                 text_encoder: TextEncoder, workdir: str | pathlib.Path):
  """The random-access source of `seconds`-long training clips this data config names.

  Toy cartoons are built on first use by process 0 (the others wait), so
  data.dir must be shared by all processes, like the checkpoint folder.
  """
  spec = clip_spec(data_cfg, seconds, codec, text_encoder)
  if data_cfg["name"] == "storyboard":
    if not data_cfg["dir"]:
      raise ValueError("data.name='storyboard' needs data.dir, the folder "
                       "python -m ttt_jax.data.prepare wrote")
    return dataset.read(data_cfg["dir"], f"{seconds}s", spec,
                        hint=prepare_command(data_cfg, seconds))
  if data_cfg["name"] != "toy_cartoons":
    raise ValueError(f"unknown data.name {data_cfg['name']!r}; known: {DATASETS}")
  data_dir = data_cfg["dir"] or pathlib.Path(workdir) / "data"
  config = toy_config_name(data_cfg, seconds)
  if jax.process_index() == 0 and not (dataset.location(data_dir, config) / dataset.VERSION).exists():
    dataset.write(toy_examples(data_cfg, seconds, codec, text_encoder), data_dir, config, spec,
                  description=f"toy cartoons, {seconds} s clips")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("toy cartoons written")
  return dataset.read(data_dir, config, spec)


def _training_arrays(example: Mapping[str, Any]) -> dict[str, np.ndarray]:
  return {"latents": example["latents"], "text": example["text"]}


def batches(source: Any, global_batch: int, seed: int, prefetch: int = 2,
            shard: tuple[int, int] = (0, 1)) -> grain.DatasetIterator:
  """Endless iterator of this process's rows of each global batch.

  `source`: random access (len, [i]) to examples with "latents" and "text".
  shard (index, count): this process's part of every batch
  (`mesh.process_batch_shard`); part i reads examples i, i + count, ...
  At most `prefetch` batches are read ahead. Returns a grain iterator:
  `get_state()` / `set_state()` checkpoint it.
  """
  index, count = shard
  if global_batch % count:
    raise ValueError(f"train.batch_size {global_batch} is not divisible by the "
                     f"{count} data shards of the mesh's processes")
  if len(source) < count:
    raise ValueError(f"the dataset has {len(source)} clips, fewer than the {count} data "
                     f"shards that share it")
  ds = grain.MapDataset.source(source)[index::count].shuffle(seed=seed).repeat()
  ds = ds.map(_training_arrays).batch(global_batch // count, drop_remainder=True)
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, prefetch),
                                                   prefetch_buffer_size=prefetch)))
