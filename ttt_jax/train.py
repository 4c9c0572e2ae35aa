"""Train the TTT video DiT on one curriculum stage.

    python -m ttt_jax.train --config=configs/tom_jerry_3s.py:tiny --workdir=workdirs/3s
    python -m ttt_jax.train --config=configs/tom_jerry_9s.py:tiny --workdir=workdirs/9s \
        --config.init_from=workdirs/3s

Reads top-down: config -> data -> model -> loss -> optimizer -> checkpoint.
The workdir receives config.json, checkpoints/ (resumed automatically),
metrics.jsonl, loss.png and, for the toy cartoons, data/ (encoded once).
`python -m ttt_jax.curriculum` runs all stages.
"""

from __future__ import annotations

import functools
import json
import pathlib
import signal
import sys
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import app, flags, logging
from flax import nnx, traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from ttt_jax import checkpoint, convert, metrics, optim, preflight
from ttt_jax.data import pipeline
from ttt_jax.layout import VideoLayout
from ttt_jax.diffusion import (NoiseSchedule, TimestepDistribution, drop_text, sample_timesteps,
                               v_prediction_loss)
from ttt_jax.models import dit
from ttt_jax.parallel import mesh as mesh_lib
from ttt_jax.parallel.sharding import constrain, init_sharded

FLAGS = flags.FLAGS
PREEMPTED_EXIT = 128 + signal.SIGTERM  # what a shell reports for a SIGTERM'd process


class NonFiniteError(RuntimeError):
  """The loss or gradient norm of a step was NaN or infinite (train.nonfinite='stop')."""


class Preempted(RuntimeError):
  """SIGTERM arrived; a checkpoint of the current step was saved first."""

def loss_fn(model: dit.VideoDiT, batch: dict[str, jax.Array], rng: jax.Array,
            null_text: jax.Array, *, layout: VideoLayout, schedule: NoiseSchedule,
            timesteps: TimestepDistribution, text_dropout: float) -> jax.Array:
  """v-prediction loss of one batch: timestep (drawn from `timesteps`), noise and caption
  dropout (to null_text [Lt, Dt], the encoding of "")."""
  latents, text = batch["latents"], batch["text"]  # [B, T, h, w, C], [B, Lt, Dt]
  k_t, k_noise, k_drop = jax.random.split(rng, 3)
  t = sample_timesteps(k_t, latents.shape[0], schedule, timesteps)
  noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
  text = drop_text(k_drop, text, text_dropout, null_text)
  v_pred = model(schedule.add_noise(latents, noise, t), text, t, layout)
  return v_prediction_loss(v_pred, latents, noise, t, schedule).mean()


def train_step(model: dit.VideoDiT, optimizer: nnx.Optimizer, batch: dict[str, jax.Array],
               rng: jax.Array, null_text: jax.Array, *, optim_cfg: Mapping[str, Any],
               skip_nonfinite: bool = False, microbatches: int = 1,
               **loss_kw: Any) -> dict[str, jax.Array]:
  """One update; with skip_nonfinite a step whose loss or grad norm is not finite changes
  nothing (parameters and optimizer state keep their values).

  microbatches: the batch's gradient is accumulated over this many equal parts, one
  at a time (same update as the whole batch: the mean of equal-sized means), so
  activations are held for batch / microbatches examples only. Each device keeps
  its own rows: part m takes every microbatches-th row.
  """
  loss, grads = accumulated_grads(model, batch, rng, null_text, microbatches,
                                  functools.partial(loss_fn, **loss_kw))
  diagnostics = slot_diagnostics(model, grads)  # of the parameters before this update
  # The norm the clip acts on: frozen groups' gradients are dropped before it.
  grad_norm = optim.trainable_grad_norm(optim_cfg, grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # nnx.state aliases the live Variables: tree.map takes a snapshot of their arrays.
  before = jax.tree.map(lambda x: x, nnx.state((model, optimizer))) if skip_nonfinite else None
  optimizer.update(model, grads)
  if skip_nonfinite:
    after = nnx.state((model, optimizer))
    nnx.update((model, optimizer),
               jax.tree.map(lambda new, old: jnp.where(finite, new, old), after, before))
  return {"loss": loss, "grad_norm": grad_norm, "finite": finite, **diagnostics}


def slot_diagnostics(model: dit.VideoDiT, grads: nnx.State) -> dict[str, jax.Array]:
  """Per block [depth], for a model with a global slot (else {}): the norm of the slot's
  parameter gradient (before clipping) and the mean |tanh| of its video gates forwards and
  backwards. A slot whose gradient stays ~0 learns nothing: a bug to find, not a result;
  gates that stay at their init say the slot never earned a say in the output."""
  slot = getattr(model.blocks, "ttt", None)
  if slot is None:
    return {}
  squares = [jnp.sum(jnp.square(g.astype(jnp.float32)), axis=tuple(range(1, g.ndim)))
             for g in jax.tree.leaves(grads["blocks"]["ttt"])]  # each [depth]
  gate = lambda alpha: jnp.mean(jnp.abs(jnp.tanh(alpha[...])), axis=-1)  # [depth, D] -> [depth]
  return {"slot_grad_norm": jnp.sqrt(sum(squares)),
          "gate_fwd_video": gate(slot.alpha_fwd_video),
          "gate_bwd_video": gate(slot.alpha_bwd_video)}


def accumulated_grads(model: dit.VideoDiT, batch: dict[str, jax.Array], rng: jax.Array,
                      null_text: jax.Array, microbatches: int, loss: Any
                      ) -> tuple[jax.Array, nnx.State]:
  """(mean loss, mean gradient of the parameters) of `batch`, over `microbatches` parts."""
  if microbatches == 1:
    return nnx.value_and_grad(loss)(model, batch, rng, null_text)
  rows = batch["latents"].shape[0]
  if rows % microbatches:
    raise ValueError(f"train.microbatches={microbatches} does not divide the batch of {rows}")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  value_and_grad = jax.value_and_grad(
      lambda p, mb, key: loss(nnx.merge(graphdef, p, rest), mb, key, null_text))
  # [B, ...] -> [M, B / M, ...] taking every M-th row: each device's rows split evenly.
  parts = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(rows // microbatches, microbatches,
                                                        *x.shape[1:]), 0, 1), batch)

  def body(carry, xs):
    total, grads = carry
    mb, m = xs
    mb = jax.tree.map(lambda x: constrain(x, "act_batch", *[None] * (x.ndim - 1)), mb)
    value, g = value_and_grad(params, mb, jax.random.fold_in(rng, m))
    return (total + value, jax.tree.map(jnp.add, grads, g)), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (total, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                   (parts, jnp.arange(microbatches)))
  return total / microbatches, jax.tree.map(
      lambda g, p: (g / microbatches).astype(p.dtype), grads, params)


def step_kwargs(config: ml_collections.ConfigDict, layout: VideoLayout) -> dict[str, Any]:
  """`train_step`'s keyword arguments for a stage config."""
  return dict(optim_cfg=config.optim.to_dict(), layout=layout,
              schedule=NoiseSchedule.create(num_steps=config.diffusion.num_steps),
              timesteps=TimestepDistribution(**config.diffusion.timesteps),
              text_dropout=config.diffusion.text_dropout,
              skip_nonfinite=config.train.nonfinite == "skip",
              microbatches=config.train.get("microbatches", 1))


def make_step_fn(config: ml_collections.ConfigDict, layout: VideoLayout,
                 model: dit.VideoDiT, optimizer: nnx.Optimizer):
  """step(batch, rng, null_text) -> outputs: the jitted `train_step` bound to this state.

  The state is donated: each step updates params and AdamW moments in place,
  so old and new state are never both alive (Orbax copies arrays to the host
  before `save` returns, so a pending async save is safe).
  """
  return nnx.cached_partial(  # cached graph traversal: less Python per step
      nnx.jit(functools.partial(train_step, **step_kwargs(config, layout)),
              donate_argnums=(0, 1)),
      model, optimizer)


def pure_step(config: ml_collections.ConfigDict, layout: VideoLayout, graph: nnx.GraphDef
              ) -> Callable[..., tuple[nnx.State, dict[str, jax.Array]]]:
  """`train_step` as a function of the state of `nnx.split((model, optimizer))`:
  step(state, batch, rng, null_text) -> (new state, outputs), for AOT compiles,
  FLOP counts and benchmarks (jit it; `graph` may come from an abstract model)."""
  kw = step_kwargs(config, layout)

  def step(state, batch, rng, null_text):
    # Merged inside the caller's trace, as nnx's transforms (the block scan) expect.
    model, optimizer = nnx.merge(graph, state)
    out = train_step(model, optimizer, batch, rng, null_text, **kw)
    return nnx.state((model, optimizer)), out

  return step


def record_config(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """config.json = this run's config; every run appends to config_history.jsonl, and a
  resumed run whose config changed says which keys."""
  current = json.loads(config.to_json_best_effort())
  path = workdir / "config.json"
  if path.exists():
    old = traverse_util.flatten_dict(json.loads(path.read_text()), sep=".")
    new = traverse_util.flatten_dict(current, sep=".")
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
      logging.warning("config changed since the last run in %s: %s", workdir, ", ".join(
          f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed))
  with (workdir / "config_history.jsonl").open("a") as f:
    f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": current}) + "\n")
  path.write_text(json.dumps(current, indent=2) + "\n")


def log_parameter_counts(model: dit.VideoDiT, optim_cfg: Mapping[str, Any]) -> None:
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  counts = {g: 0 for g in optim.GROUPS}
  for path, x in jax.tree_util.tree_leaves_with_path(params):
    counts[optim.param_group(path)] += int(np.prod(x.shape))
  trainable = sum(n for g, n in counts.items() if optim_cfg["lr"][g] > 0)
  logging.warning("parameters: %s total, %s trainable (%s)", f"{sum(counts.values()):,}",
                  f"{trainable:,}", ", ".join(
                      f"{g} {n:,} at lr {optim_cfg['lr'][g]:g}" for g, n in counts.items()))


class _SigtermFlag:
  """Set by SIGTERM while training; the loop checks it after every step."""

  def __init__(self):
    self.raised = False

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)

  def any_process(self) -> bool:
    """True on every process once any process got the signal (one tiny all-gather)."""
    if jax.process_count() == 1:
      return self.raised
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.raised))))


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
          force: bool = False) -> dict[str, float]:
  """Runs (or resumes) one stage; returns the first and last logged losses.

  Raises preflight.PreflightError before any work if the config cannot run
  here (force: run despite the memory estimate), NonFiniteError on a NaN/inf
  step (train.nonfinite='stop'), Preempted after saving on SIGTERM.
  """
  workdir = pathlib.Path(workdir)
  preflight.check(config, "train", force=force)  # before any data work or compile
  workdir.mkdir(parents=True, exist_ok=True)
  lead = jax.process_index() == 0  # one process writes config, metrics and plots
  if lead:
    record_config(workdir, config)

  # ------------------------------------------------------------------ mesh
  mesh = mesh_lib.make_mesh(config.mesh)

  # ------------------------------------------------------------------ data
  codec, text_encoder = pipeline.make_encoders(config.data)
  source = pipeline.open_dataset(config.data, config.seconds, codec, text_encoder, workdir)
  data_iter = pipeline.batches(source, config.train.batch_size, seed=config.seed,
                               prefetch=config.data.prefetch,
                               shard=mesh_lib.process_batch_shard(mesh.devices))

  # --------------------------------------------------------- model & optimizer
  # Created sharded (a jit with the rules' out_shardings): no parameter or moment is
  # ever whole on one device. Weights are then restored into those shardings.
  def create() -> tuple[dit.VideoDiT, nnx.Optimizer]:
    model = dit.build(config.model, text_dim=config.data.text_dim, rngs=nnx.Rngs(config.seed))
    return model, nnx.Optimizer(model, optim.make_optimizer(config.optim), wrt=nnx.Param)

  model, optimizer = init_sharded(create, mesh)
  layout = pipeline.video_layout(config.data, config.seconds, codec, model.patch_size)
  null_text = jax.device_put(pipeline.null_caption(text_encoder, layout.num_segments,
                                                   config.data.text_len),
                             NamedSharding(mesh, P()))
  if config.model.pretrained:
    convert.load_pretrained(config.model.pretrained, model)
    logging.warning("initialised CogVideoX weights from %s", config.model.pretrained)
  if config.init_from:
    step = checkpoint.load_params(config.init_from, model, fresh=optim.is_global_slot
                                  if config.init_new_layers else None)
    logging.warning("initialised from %s (step %d)", config.init_from, step)
  log_parameter_counts(model, config.optim)

  # --------------------------------------------------------------- restore
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  rng, start = jax.random.key(config.seed), 0
  if (restored := ckpt.restore(model, optimizer)) is not None:
    start, rng, data_state = restored
    data_iter.set_state(data_state)
    logging.warning("resumed from step %d", start)
  writer = metrics.MetricsWriter(workdir / "metrics.jsonl", resume_step=start) if lead else None

  # ------------------------------------------------------------------ loop
  step_fn = make_step_fn(config, layout, model, optimizer)
  lr = {g: optim.learning_rate(config.optim, g) for g in optim.GROUPS}
  tokens_per_step = config.train.batch_size * layout.seq_len
  # Step outputs stay on the device until a log, checkpoint or signal point (no per-step
  # sync, so dispatch overlaps compute); they are then checked for NaN/inf in step order,
  # always before anything is saved.
  pending, window, skipped, saved = [], [], 0, start
  compile_s = t_window = None
  timed_steps = 0  # steps in the current timing window (after the compile step)

  def drain() -> None:
    nonlocal skipped
    for done_i, out in jax.device_get(pending):
      if out["finite"]:
        window.append(out)
        continue
      bad = ", ".join(f"{k}={float(out[k])}" for k in ("loss", "grad_norm"))
      if config.train.nonfinite == "stop":
        ckpt.close()  # pending saves finish: the last checkpoint before this step is intact
        raise NonFiniteError(
            f"step {done_i}: {bad} is not finite; stopped without saving it; "
            + (f"the last checkpoint (step {saved}) in {workdir / 'checkpoints'} is intact"
               if saved else "no checkpoint was saved yet")
            + "; lower optim.lr or optim.grad_clip, or set --config.train.nonfinite=skip to "
            "skip such steps")
      skipped += 1
      logging.warning("step %d: %s is not finite; update skipped (%d so far)", done_i, bad, skipped)
    pending.clear()

  bar = tqdm.trange(start, config.train.steps, initial=start, total=config.train.steps,
                    desc=f"{config.seconds}s stage", disable=not lead)
  with _SigtermFlag() as sigterm, jax.set_mesh(mesh):
    for step in bar:
      batch = mesh_lib.global_batch(next(data_iter), mesh)
      t0 = time.perf_counter()
      pending.append((step + 1, step_fn(batch, jax.random.fold_in(rng, step), null_text)))
      done = step + 1
      if compile_s is None:  # the first call of this process: compile + one step
        drain()
        compile_s = time.perf_counter() - t0
        t_window = time.perf_counter()
      else:
        timed_steps += 1
      log = done % config.train.log_every == 0 or done == config.train.steps
      save = done % config.train.ckpt_every == 0 or done == config.train.steps
      preempted = sigterm.any_process()
      if log or save or preempted:
        drain()
      if log:
        row = {k: float(np.mean([o[k] for o in window])) if window else float("nan")
               for k in ("loss", "grad_norm")}
        # Per-block slot diagnostics: lists, one value per block.
        row.update({k: np.mean([o[k] for o in window], axis=0).tolist()
                    for k in ("slot_grad_norm", "gate_fwd_video", "gate_bwd_video")
                    if window and k in window[0]})
        now = time.perf_counter()
        s_per_step = (now - t_window) / timed_steps if timed_steps else compile_s
        row.update({f"lr_{g}": float(s(step)) for g, s in lr.items()},
                   s_per_step=s_per_step, tokens_per_s=tokens_per_step / s_per_step,
                   compile_s=compile_s, skipped_steps=skipped)
        if writer:
          writer.write(done, **row)  # means over the steps since the last log line
        window, timed_steps, t_window = [], 0, now
        bar.set_postfix(loss=f"{row['loss']:.4f}")
      if preempted:
        ckpt.save(done, model, optimizer, rng, data_iter.get_state())
        ckpt.close()
        raise Preempted(f"SIGTERM at step {done}: saved a checkpoint of step {done} in "
                        f"{workdir / 'checkpoints'}; the same command resumes from it")
      if save:
        ckpt.save(done, model, optimizer, rng, data_iter.get_state())
        saved = done
  ckpt.close()

  rows = metrics.read_metrics(workdir / "metrics.jsonl")
  if lead:
    metrics.plot_loss([(f"{config.seconds}s", rows)], workdir / "loss.png")
  losses = [r["loss"] for r in rows]
  return {"first_loss": losses[0], "last_loss": losses[-1]} if losses else {}


def default_workdir(config_flag: str) -> pathlib.Path:
  """workdirs/<config file stem>[_<preset>] for --config=path/stem.py[:preset]."""
  path, _, preset = config_flag.partition(":")
  return pathlib.Path("workdirs") / (pathlib.Path(path).stem + (f"_{preset}" if preset else ""))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
    logging.set_verbosity(logging.WARNING)
  if FLAGS.distributed:
    jax.distributed.initialize()
  workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
  logging.warning("workdir: %s", pathlib.Path(workdir).absolute())
  try:
    print(json.dumps(train(FLAGS.config, workdir, force=FLAGS.force)))
  except preflight.PreflightError as e:
    sys.exit(f"preflight refused this run:\n{e}")
  except NonFiniteError as e:
    sys.exit(f"training stopped: {e}")
  except Preempted as e:
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(PREEMPTED_EXIT)


if __name__ == "__main__":  # flags live here so other entry points can import train()
  config_flags.DEFINE_config_file("config", None, "Stage config file[:preset].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots "
                      "(default: workdirs/<config file stem>[_<preset>]).")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host pods).")
  flags.DEFINE_bool("force", False, "Run even if preflight estimates it does not fit in memory.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
