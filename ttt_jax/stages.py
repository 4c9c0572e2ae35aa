"""Config files loaded as `--config=` would, and stages chained into a curriculum.

Shared by the entry points that run several stages (`ttt_jax.curriculum`,
`ttt_jax.evaluate`). The config files import `configs.common`: the folder
above config_dir is put on sys.path if it is not there (the repo root, when
run from elsewhere).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from typing import Sequence

import ml_collections


def load_config(path: str | pathlib.Path, arg: str | None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of the config file at `path`, as --config=path:arg would."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"no config file {path}")
  root = str(path.resolve().parent.parent)
  if root not in sys.path:
    sys.path.append(root)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def load_stage_config(config_dir: str | pathlib.Path, seconds: int, preset: str
                      ) -> ml_collections.ConfigDict:
  """`get_config(preset)` of <config_dir>/tom_jerry_<seconds>s.py, as --config= would."""
  path = pathlib.Path(config_dir) / f"tom_jerry_{seconds}s.py"
  if not path.exists():
    raise FileNotFoundError(f"no config for the {seconds} s stage: {path}")
  return load_config(path, preset)


def chain(configs: Sequence[ml_collections.ConfigDict], dirs: Sequence[str | pathlib.Path],
          init_from: str = "") -> list[ml_collections.ConfigDict]:
  """Copies of stage `configs` run in `dirs`, each initialised from the previous stage's
  dir, the first from `init_from` ('' = its own init): the curriculum's hand-over."""
  if len(configs) != len(dirs):
    raise ValueError(f"chain needs one dir per stage: {len(configs)} configs, {len(dirs)} dirs")
  out, previous = [], init_from
  for config, stage_dir in zip(configs, dirs):
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.init_from = previous
    config.lock()
    out.append(config)
    previous = str(stage_dir)
  return out
