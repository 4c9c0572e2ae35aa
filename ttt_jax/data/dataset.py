"""Prepared training clips as a tensorflow-datasets dataset in array_record, read by random access.

One example is one training clip of `seconds`:

    latents   float32 [T, h, w, C]          the codec's encoding of the clip's frames
    text      float32 [S * text_len, dim]   its S segment captions, encoded, concatenated
    captions  str [S]                       the caption strings
    segments  int32 [S]                     each segment's index in its source video
    scenes    int32 [S]                     each segment's scene id in its source video
    source    str                           the source video (file or toy index)

Every feature is a `Tensor` or `Text`, so tfds builds and reads the dataset
without TensorFlow (its `Image` / `Video` features would need it). Both data
paths write through this one builder: `ttt_jax.data.prepare` (a storyboard
of real videos) and the toy cartoons (`pipeline.open_dataset`). A dataset
lives in `<data_dir>/storyboard/<config>/1.0.0/`, with `<config>` one clip
length (e.g. `9s`); its metadata records what produced it, and reading
checks that against what the training config expects, naming any mismatch.

Writing goes to a hidden temporary folder under data_dir that is renamed
into place at the end, so an interrupted build leaves nothing half-written
where a reader would look.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import shutil
import sys
import uuid
from typing import Any, Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from ttt_jax.layout import SECONDS_PER_SEGMENT

NAME = "storyboard"
VERSION = "1.0.0"


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """What a training config needs of a dataset: clip length, frame size and the encoders."""
  seconds: int
  height: int
  width: int
  latent_shape: tuple[int, int, int, int]  # [T, h, w, C]
  text_len: int
  text_dim: int
  codec: str
  text_encoder: str

  @property
  def num_segments(self) -> int:
    return self.seconds // SECONDS_PER_SEGMENT

  def features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "latents": tfds.features.Tensor(shape=self.latent_shape, dtype=np.float32),
        "text": tfds.features.Tensor(shape=(self.num_segments * self.text_len, self.text_dim),
                                     dtype=np.float32),
        "captions": tfds.features.Sequence(tfds.features.Text()),
        "segments": tfds.features.Tensor(shape=(self.num_segments,), dtype=np.int32),
        "scenes": tfds.features.Tensor(shape=(self.num_segments,), dtype=np.int32),
        "source": tfds.features.Text(),
    })

  def metadata(self) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class _ClipBuilder(tfds.core.GeneratorBasedBuilder):
  """tfds builder over examples produced by the caller (prepare or the toy cartoons)."""

  name = NAME
  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, spec: ClipSpec, examples: Iterable[tuple[str, dict[str, Any]]],
               description: str, **kwargs: Any):
    self._spec, self._examples, self._description = spec, examples, description
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self._description,
                                 features=self._spec.features(),
                                 metadata=tfds.core.MetadataDict(self._spec.metadata()))

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
    return {"train": self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
    yield from self._examples


def location(data_dir: str | pathlib.Path, config: str) -> pathlib.Path:
  """The folder of one prepared clip length: <data_dir>/storyboard/<config>."""
  return pathlib.Path(data_dir) / NAME / config


def write(examples: Iterable[tuple[str, dict[str, Any]]], data_dir: str | pathlib.Path,
          config: str, spec: ClipSpec, *, description: str = "", overwrite: bool = False
          ) -> tuple[pathlib.Path, int]:
  """Writes (key, example) pairs as <data_dir>/storyboard/<config>; returns (folder, count).

  Raises FileExistsError if the folder exists and not overwrite, ValueError
  if no example was produced. An existing dataset is replaced only after the
  new one is complete.
  """
  final = location(data_dir, config)
  if final.exists() and not overwrite:
    raise FileExistsError(f"{final} already exists; pass --overwrite to replace it")
  tmp = pathlib.Path(data_dir) / f".incomplete-{NAME}-{config}-{uuid.uuid4().hex[:8]}"
  try:
    builder = _ClipBuilder(spec=spec, examples=examples, description=description,
                           config=tfds.core.BuilderConfig(name=config), data_dir=tmp,
                           file_format="array_record")
    tfds.display_progress_bar(False)  # the caller shows its own bar, per video
    with contextlib.redirect_stdout(sys.stderr):  # tfds prints progress; stdout is the caller's
      builder.download_and_prepare()
    count = builder.info.splits["train"].num_examples
    if count == 0:
      raise ValueError(f"no clip was produced for {final}: nothing to write")
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
      old = final.with_name(f".replaced-{config}-{uuid.uuid4().hex[:8]}")
      final.rename(old)
      (tmp / NAME / config).rename(final)
      shutil.rmtree(old)
    else:
      (tmp / NAME / config).rename(final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final, count


def read(data_dir: str | pathlib.Path, config: str, spec: ClipSpec, *, hint: str = ""):
  """The train split of a prepared dataset as a random-access source, checked against spec.

  Raises FileNotFoundError (with `hint`, e.g. the prepare command) if it is
  missing, ValueError naming the folder and every field that differs.
  """
  folder = location(data_dir, config) / VERSION
  if not (folder / "dataset_info.json").is_file():
    raise FileNotFoundError(f"no prepared dataset at {folder}" + (f"; {hint}" if hint else ""))
  builder = tfds.builder_from_directory(folder)
  have, want = dict(builder.info.metadata or {}), spec.metadata()
  wrong = [f"{k}={have.get(k)!r} (the config needs {v!r})" for k, v in want.items()
           if have.get(k) != v]
  if wrong:
    raise ValueError(f"{folder} was prepared for another config: " + ", ".join(wrong)
                     + (f"; {hint}" if hint else ""))
  return builder.as_data_source(split="train")
