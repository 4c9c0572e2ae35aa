"""Orbax checkpoints of a training run: params, optimizer, RNG, step, data position.

`workdir/checkpoints/<step>/` holds three items:
  params  the model parameters (also what the next curriculum stage and the
          sampler load),
  opt     the optimizer state (its structure depends on the stage's trainable
          groups, hence an item of its own),
  meta    JSON: step, the RNG key data and the data iterator's state.
Orbax writes each step to a temporary directory and renames it when complete,
so a crash never leaves a half-written checkpoint that would be resumed.
Saves are asynchronous (training goes on while a step is written); `wait`
and `close` block until every started save is on disk.

A checkpoint damaged after it was written (a truncated or corrupt file) is
found when it is restored: the run warns, naming the step, the error and
every file whose size differs from the `<step>.files.json` manifest written
when the save completed, moves it aside to `checkpoints/<step>.damaged`
(never deleted) and resumes from the newest step that restores.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

DAMAGED_SUFFIX = ".damaged"
MANIFEST_SUFFIX = ".files.json"  # {relative path: bytes} of a completed step


def _abstract(state: Any) -> Any:
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def _params_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / "checkpoints"


class Checkpointer:
  """Saves when asked (asynchronously, keeping the newest `keep`) and resumes from the latest
  good step."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int | None = None):
    self.directory = _params_dir(workdir)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("params", "opt", "meta"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _manifest(self, step: int | str) -> pathlib.Path:
    return self.directory / f"{step}{MANIFEST_SUFFIX}"

  def _write_manifests(self) -> None:
    """A manifest for every completed step that lacks one; none for steps no longer kept."""
    steps = set(self.manager.all_steps())
    for step in steps:
      if not self._manifest(step).exists():
        root = self.directory / str(step)
        sizes = {str(f.relative_to(root)): f.stat().st_size for f in root.rglob("*") if f.is_file()}
        self._manifest(step).write_text(json.dumps(sizes, indent=1))
    for manifest in self.directory.glob(f"*{MANIFEST_SUFFIX}"):
      name = manifest.name[:-len(MANIFEST_SUFFIX)]
      if name.isdigit() and int(name) not in steps:
        manifest.unlink()

  def _damaged_files(self, step: int) -> str:
    """The files of `step` whose size differs from its manifest, as one phrase."""
    if not self._manifest(step).exists():
      return "no manifest to compare its files with"
    root = self.directory / str(step)
    bad = []
    for name, size in json.loads(self._manifest(step).read_text()).items():
      f = root / name
      if not f.is_file():
        bad.append(f"{f} is missing")
      elif f.stat().st_size != size:
        bad.append(f"{f} has {f.stat().st_size:,} of its {size:,} bytes")
    return "; ".join(bad) if bad else "every file has the size it was written with"

  def save(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer, rng: jax.Array,
           data_state: dict[str, Any]) -> None:
    """Starts writing `step` and returns; the arrays are copied first, so training may go on."""
    self.wait()  # the previous save (long finished, normally) gets its manifest
    meta = {"step": step, "rng": np.asarray(jax.random.key_data(rng)).tolist(),
            "data": data_state}
    self.manager.save(step, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(model, nnx.Param))),
        opt=ocp.args.StandardSave(nnx.to_pure_dict(nnx.state(optimizer))),
        meta=ocp.args.JsonSave(meta)))

  def wait(self) -> None:
    """Blocks until every started save is complete on disk (and has its manifest)."""
    self.manager.wait_until_finished()
    self._write_manifests()

  def _restore_step(self, step: int, model: nnx.Module, optimizer: nnx.Optimizer
                    ) -> tuple[int, jax.Array, dict[str, Any]]:
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

  def restore(self, model: nnx.Module, optimizer: nnx.Optimizer
              ) -> tuple[int, jax.Array, dict[str, Any]] | None:
    """Loads the newest step that restores; returns (step, rng, data state), None if none.

    A step that fails to restore is moved aside with a warning, and the next
    older one is tried; if every step fails, the last error is raised.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    for n, step in enumerate(steps):
      try:
        return self._restore_step(step, model, optimizer)
      except Exception as e:  # noqa: BLE001 (any failure means this step is unusable)
        aside = self.directory / f"{step}{DAMAGED_SUFFIX}"
        older = steps[n + 1] if n + 1 < len(steps) else None
        logging.warning(
            "checkpoint step %d in %s does not restore (%s: %s); damaged: %s; moved aside to %s "
            "(not deleted); %s", step, self.directory / str(step), type(e).__name__,
            str(e).splitlines()[0][:200] if str(e) else "", self._damaged_files(step), aside,
            f"falling back to step {older}" if older is not None else "no older checkpoint")
        (self.directory / str(step)).rename(aside)
        if self._manifest(step).exists():
          self._manifest(step).rename(self._manifest(f"{step}{DAMAGED_SUFFIX}"))
        self.manager.reload()
        if older is None:
          raise RuntimeError(f"no checkpoint in {self.directory} restores; the damaged ones are "
                             f"kept as *{DAMAGED_SUFFIX}; remove them to start afresh") from e
    return None

  def close(self) -> None:
    """Waits for pending saves, then releases the manager."""
    self.wait()
    self.manager.close()


def _keys(path: Any) -> tuple[str, ...]:
  return tuple(jax.tree_util.keystr(path, simple=True, separator="/").split("/"))


def load_params(workdir: str | pathlib.Path, model: nnx.Module, *,
                fresh: Callable[[tuple[str, ...]], bool] | None = None) -> int:
  """Loads the latest params of another run (e.g. the previous stage) into `model`.

  fresh: parameter paths (e.g. ("blocks", "ttt", "gate")) that may be absent
  from the checkpoint; they keep the model's initialisation (a base trained
  without a layer, given the layer). Every other parameter must be in the
  checkpoint with its shape, and the checkpoint may hold no others.
  """
  directory = _params_dir(workdir)
  if not directory.is_dir():  # checked first: the manager would create it
    raise FileNotFoundError(f"no checkpoint to initialise from in {directory}")
  with ocp.CheckpointManager(directory, item_names=("params",),
                             item_handlers={"params": ocp.StandardCheckpointHandler()},
                             options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint to initialise from in {directory}")
    params = nnx.state(model, nnx.Param)
    target = _abstract(nnx.to_pure_dict(params))
    if fresh is not None:
      saved = {_keys(path): leaf.shape for path, leaf in
               jax.tree_util.tree_leaves_with_path(manager.item_metadata(step)["params"])}
      wanted = {_keys(path): leaf.shape for path, leaf in
                jax.tree_util.tree_leaves_with_path(target)}
      name = lambda keys: sorted("/".join(k) for k in keys)
      problems = [
          ("lacks parameters this model needs (and that may not start fresh)",
           name(k for k in wanted.keys() - saved.keys() if not fresh(k))),
          ("holds parameters this model does not have", name(saved.keys() - wanted.keys())),
          ("has other shapes than this model for",
           [f"{n}: {saved[k]} vs {wanted[k]}" for n, k in
            sorted(("/".join(k), k) for k in wanted.keys() & saved.keys())
            if tuple(saved[k]) != tuple(wanted[k])])]
      for what, culprits in problems:
        if culprits:
          raise ValueError(f"checkpoint {directory}/{step} {what}: {culprits}")
      target = _subtree(target, set(wanted) & set(saved))
    try:
      out = manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(target)))
    except ValueError as e:
      raise ValueError(f"checkpoint {directory}/{step} does not fit this model "
                       f"(different config.model?): {e}") from e
  loaded = nnx.to_pure_dict(params)
  for path, value in jax.tree_util.tree_leaves_with_path(out["params"]):
    _set(loaded, _keys(path), value)
  nnx.replace_by_pure_dict(params, loaded)
  nnx.update(model, params)
  return step


def _subtree(tree: dict[str, Any], keep: set[tuple[str, ...]], prefix: tuple[str, ...] = ()
             ) -> dict[str, Any]:
  """The leaves of a nested dict whose key paths are in `keep` (empty branches dropped)."""
  out = {}
  for k, v in tree.items():
    path = (*prefix, str(k))
    if isinstance(v, dict):
      if sub := _subtree(v, keep, path):
        out[k] = sub
    elif path in keep:
      out[k] = v
  return out


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  node = tree
  for k in path[:-1]:
    node = node[k] if k in node else node[int(k)]
  node[path[-1] if path[-1] in node else int(path[-1])] = value
