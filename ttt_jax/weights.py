"""Pretrained weights in safetensors, streamed into a model's (stacked) parameter layout.

A mapping is a list of `Entry`s: one target parameter of ours, the source
tensor name (with `{i}` for per-layer tensors, stacked on a leading
[layers] axis in layer order), the source shape and a transform. The whole
mapping is checked against the checkpoint's headers before any tensor is
read, and tensors are read one at a time, so a multi-GB checkpoint never
needs more memory than what the caller keeps. Used by `ttt_jax.convert`
(CogVideoX), `ttt_jax.models.t5` (T5) and `ttt_jax.models.cogvideox_vae` (the VAE).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable, Iterable, Iterator

import numpy as np
import safetensors
import tqdm


@dataclasses.dataclass(frozen=True)
class Entry:
  """One parameter of ours and the source tensor(s) it comes from.

  `source` has a `{i}` for per-block tensors, which stack on a leading
  [depth] axis in block order; `source_shape` is one such tensor's shape.
  """
  target: tuple[str, ...]
  source: str
  source_shape: tuple[int, ...]
  transform: Callable[[np.ndarray], np.ndarray]

  @property
  def per_block(self) -> bool:
    return "{i}" in self.source


def transposed(w: np.ndarray) -> np.ndarray:  # torch Linear [out, in] -> kernel [in, out]
  return w.T


def same(w: np.ndarray) -> np.ndarray:
  return w


class SafetensorsCheckpoint:
  """Every tensor of a (sharded) safetensors checkpoint, read lazily by key."""

  def __init__(self, directory: pathlib.Path):
    index = sorted(directory.glob("*.safetensors.index.json"))
    if index:
      weight_map = json.loads(index[0].read_text())["weight_map"]
      files = sorted({directory / f for f in weight_map.values()})
      missing = [str(f) for f in files if not f.is_file()]
      if missing:
        raise FileNotFoundError(f"{index[0]} names shard files that do not exist: {missing}")
    else:
      files = sorted(directory.glob("*.safetensors"))
    if not files:
      raise FileNotFoundError(f"{directory}: no *.safetensors files")
    self.directory = directory
    self.files: dict[str, pathlib.Path] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
      with safetensors.safe_open(file, framework="numpy") as f:
        for key in f.keys():
          self.files[key] = file
          self.shapes[key] = tuple(f.get_slice(key).get_shape())

  def get(self, key: str) -> np.ndarray:
    # Opened per tensor: safe_open maps the whole file, and a mapping kept open
    # would keep every page read so far resident (the weights' size again).
    with safetensors.safe_open(self.files[key], framework="numpy") as f:
      return f.get_tensor(key)

  def check(self, entries: list[Entry], depth: int, *, what: str,
            ignore: Iterable[str] = ()) -> None:
    """One ValueError naming every unmatched, missing and wrong-shape key, or nothing.

    `ignore`: source keys that may be present and are not used (e.g. a tied copy).
    """
    expected = {e.source.format(i=i): e.source_shape
                for e in entries for i in (range(depth) if e.per_block else [None])}
    source = set(self.files) - set(ignore)
    problems = [f"unmatched (not a parameter of this {what} config): {k} {self.shapes[k]} "
                f"in {self.files[k].name}" for k in sorted(source - set(expected))]
    problems += [f"missing: {k} (expected shape {expected[k]})" for k in sorted(set(expected) - source)]
    problems += [f"wrong shape: {k} in {self.files[k].name} is {self.shapes[k]}, expected {expected[k]}"
                 for k in sorted(source & set(expected)) if self.shapes[k] != expected[k]]
    if problems:
      raise ValueError(f"{len(problems)} bad key(s) in the {what} checkpoint {self.directory} "
                       f"(config.json: depth {depth}):\n  " + "\n  ".join(problems))


def stream(ckpt: SafetensorsCheckpoint, entries: list[Entry], depth: int, *, desc: str,
           progress: bool = False) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """(target path, array in the source dtype) per entry; per-layer tensors stacked.

  Each layer's tensor is read into its slot of the stacked array, so beyond
  what the caller keeps at most one parameter's stack is in memory.
  """
  for e in tqdm.tqdm(entries, desc=desc, disable=not progress):
    if not e.per_block:
      yield e.target, np.ascontiguousarray(e.transform(ckpt.get(e.source)))
      continue
    out = None
    for i in range(depth):
      tensor = e.transform(ckpt.get(e.source.format(i=i)))
      if out is None:
        out = np.empty((depth, *tensor.shape), tensor.dtype)
      out[i] = tensor
    yield e.target, out
