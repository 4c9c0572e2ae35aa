"""Stage configs by length: configs/tom_jerry_<seconds>s.py loaded as `--config=` would.

Shared by the entry points that run several stages (`ttt_jax.curriculum`,
`ttt_jax.evaluate`). The config files import `configs.common`: the folder
above config_dir is put on sys.path if it is not there (the repo root, when
run from elsewhere).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import ml_collections


def load_stage_config(config_dir: str | pathlib.Path, seconds: int, preset: str
                      ) -> ml_collections.ConfigDict:
  """`get_config(preset)` of <config_dir>/tom_jerry_<seconds>s.py, as --config= would."""
  path = pathlib.Path(config_dir) / f"tom_jerry_{seconds}s.py"
  if not path.exists():
    raise FileNotFoundError(f"no config for the {seconds} s stage: {path}")
  root = str(path.resolve().parent.parent)
  if root not in sys.path:
    sys.path.append(root)
  spec = importlib.util.spec_from_file_location(f"tom_jerry_{seconds}s", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)
