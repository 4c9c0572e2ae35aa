"""Orbax checkpoints of a training run: params, optimizer, RNG, step, data position.

`workdir/checkpoints/<step>/` holds three items:
  params  the model parameters (also what the next curriculum stage and the
          sampler load),
  opt     the optimizer state (its structure depends on the stage's trainable
          groups, hence an item of its own),
  meta    JSON: step, the RNG key data and the data iterator's state.
Orbax writes each step to a temporary directory and renames it when complete,
so a crash never leaves a half-written checkpoint that would be resumed.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


def _abstract(state: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _params_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / "checkpoints"


class Checkpointer:
  """Saves when asked (keeping the newest `keep`) and resumes from the latest."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int | None = None):
    self.manager = ocp.CheckpointManager(
        _params_dir(workdir), item_names=("params", "opt", "meta"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, rng: jax.Array,
           data_state: dict[str, Any]) -> None:
    meta = {"step": step, "rng": np.asarray(jax.random.key_data(rng)).tolist(),
            "data": data_state}
    self.manager.save(step, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
        opt=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer))),
        meta=ocp.args.JsonSave(meta)))

  def restore(self, model: nnx.Module, optimizer: nnx.Optimizer
              ) -> tuple[int, jax.Array, dict[str, Any]] | None:
    """Loads the latest step into model and optimizer; returns (step, rng, data state)."""
    step = self.manager.latest_step()
    if step is None:
      return None
    params, opt = nnx.state(model, nnx.Param), nnx.state(optimizer)
    out = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(params))),
        opt=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(opt))),
        meta=ocp.args.JsonRestore()))
    nnx.replace_by_pure_dict(params, out["params"])
    nnx.replace_by_pure_dict(opt, out["opt"])
    nnx.update(model, params)
    nnx.update(optimizer, opt)
    rng = jax.random.wrap_key_data(np.asarray(out["meta"]["rng"], np.uint32))
    return out["meta"]["step"], rng, out["meta"]["data"]

  def close(self) -> None:
    self.manager.close()


def load_params(workdir: str | pathlib.Path, model: nnx.Module) -> int:
  """Loads the latest params of another run (e.g. the previous stage) into `model`."""
  directory = _params_dir(workdir)
  if not directory.is_dir():  # checked first: the manager would create it
    raise FileNotFoundError(f"no checkpoint to initialise from in {directory}")
  with ocp.CheckpointManager(directory, item_names=("params",),
                             options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint to initialise from in {directory}")
    params = nnx.state(model, nnx.Param)
    try:
      out = manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(_abstract(nnx.to_pure_dict(params)))))
    except ValueError as e:
      raise ValueError(f"checkpoint {directory}/{step} does not fit this model "
                       f"(different config.model?): {e}") from e
  nnx.replace_by_pure_dict(params, out["params"])
  nnx.update(model, params)
  return step
