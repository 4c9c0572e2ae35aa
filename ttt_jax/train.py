"""Train the TTT video DiT on one curriculum stage.

    python -m ttt_jax.train --config=configs/tom_jerry_3s.py:tiny --workdir=workdirs/3s
    python -m ttt_jax.train --config=configs/tom_jerry_9s.py:tiny --workdir=workdirs/9s \
        --config.init_from=workdirs/3s

Reads top-down: config -> data -> model -> loss -> optimizer -> checkpoint.
The workdir receives config.json, checkpoints/ (resumed automatically),
metrics.jsonl and loss.png. `python -m ttt_jax.curriculum` runs all stages.
"""

from __future__ import annotations

import functools
import json
import pathlib
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import tqdm
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from ttt_jax import checkpoint, convert, metrics, optim
from ttt_jax.data import pipeline
from ttt_jax.layout import VideoLayout
from ttt_jax.diffusion import NoiseSchedule, drop_text, sample_timesteps, v_prediction_loss
from ttt_jax.models import dit
from ttt_jax.models.text import make_text_encoder
from ttt_jax.models.vae import make_codec
from ttt_jax.parallel import mesh as mesh_lib

FLAGS = flags.FLAGS

def loss_fn(model: dit.VideoDiT, batch: dict[str, jax.Array], rng: jax.Array, *,
            layout: VideoLayout, schedule: NoiseSchedule, text_dropout: float) -> jax.Array:
  """v-prediction loss of one batch: random timestep, noise and caption dropout."""
  latents, text = batch["latents"], batch["text"]  # [B, T, h, w, C], [B, Lt, Dt]
  k_t, k_noise, k_drop = jax.random.split(rng, 3)
  t = sample_timesteps(k_t, latents.shape[0], schedule)
  noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
  text = drop_text(k_drop, text, text_dropout)
  v_pred = model(schedule.add_noise(latents, noise, t), text, t, layout)
  return v_prediction_loss(v_pred, latents, noise, t, schedule).mean()


def train_step(model: dit.VideoDiT, optimizer: nnx.Optimizer, batch: dict[str, jax.Array],
               rng: jax.Array, *, optim_cfg: Mapping[str, Any],
               **loss_kw: Any) -> dict[str, jax.Array]:
  loss, grads = nnx.value_and_grad(functools.partial(loss_fn, **loss_kw))(model, batch, rng)
  optimizer.update(model, grads)
  # The norm the clip acts on: frozen groups' gradients are dropped before it.
  return {"loss": loss, "grad_norm": optim.trainable_grad_norm(optim_cfg, grads)}


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, float]:
  """Runs (or resumes) one stage; returns the first and last logged losses."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  lead = jax.process_index() == 0  # one process writes config, metrics and plots
  if config.model.pretrained and config.init_from:
    raise ValueError(f"set one of model.pretrained ({config.model.pretrained}) and init_from "
                     f"({config.init_from}): both initialise the model")
  if config.model.pretrained:  # before any data work: a wrong path fails in seconds
    convert.pretrained_architecture(config.model.pretrained)
  if lead:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

  # ------------------------------------------------------------------ data
  codec = make_codec(config.data.codec)
  text_encoder = make_text_encoder(config.data.text_encoder, dim=config.data.text_dim)
  examples = pipeline.build_examples(config.data, config.seconds, codec, text_encoder,
                                     cache_dir=workdir / "cache")
  data_iter = pipeline.batches(examples, config.train.batch_size, seed=config.seed)

  # --------------------------------------------------------- model & optimizer
  model = dit.build(config.model, text_dim=config.data.text_dim, rngs=nnx.Rngs(config.seed))
  layout = pipeline.video_layout(config.data, config.seconds, codec, model.patch_size)
  if config.model.pretrained:
    convert.load_pretrained(config.model.pretrained, model)
    logging.warning("initialised CogVideoX weights from %s", config.model.pretrained)
  if config.init_from:
    step = checkpoint.load_params(config.init_from, model)
    logging.warning("initialised from %s (step %d)", config.init_from, step)
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config.optim), wrt=nnx.Param)

  # --------------------------------------------------------- shard & restore
  mesh = mesh_lib.make_mesh(config.mesh)
  state = nnx.state((model, optimizer))
  nnx.update((model, optimizer), jax.device_put(state, mesh_lib.param_shardings(mesh, state)))
  ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
  rng, start = jax.random.key(config.seed), 0
  if (restored := ckpt.restore(model, optimizer)) is not None:
    start, rng, data_state = restored
    data_iter.set_state(data_state)
    logging.warning("resumed from step %d", start)
  writer = metrics.MetricsWriter(workdir / "metrics.jsonl", resume_step=start) if lead else None

  # ------------------------------------------------------------------ loop
  schedule = NoiseSchedule.create(num_steps=config.diffusion.num_steps)
  step_fn = nnx.cached_partial(  # cached graph traversal: less Python per step
      nnx.jit(functools.partial(train_step, optim_cfg=config.optim.to_dict(), layout=layout,
                                schedule=schedule, text_dropout=config.diffusion.text_dropout)),
      model, optimizer)
  lr = {g: optim.learning_rate(config.optim, g) for g in optim.GROUPS}
  window, t0 = [], time.perf_counter()
  bar = tqdm.trange(start, config.train.steps, initial=start, total=config.train.steps,
                    desc=f"{config.seconds}s stage", disable=not lead)
  for step in bar:
    batch = mesh_lib.global_batch(next(data_iter), mesh)
    window.append(step_fn(batch, jax.random.fold_in(rng, step)))
    done = step + 1
    if done % config.train.log_every == 0 or done == config.train.steps:
      row = {k: float(jnp.mean(jnp.stack([o[k] for o in window]))) for k in window[0]}
      row.update({f"lr_{g}": float(s(step)) for g, s in lr.items()},
                 steps_per_s=(done - start) / (time.perf_counter() - t0))
      if writer:
        writer.write(done, **row)  # means over the steps since the last log line
      window = []
      bar.set_postfix(loss=f"{row['loss']:.4f}")
    if done % config.train.ckpt_every == 0 or done == config.train.steps:
      ckpt.save(done, model, optimizer, rng, data_iter.get_state())
  ckpt.close()

  rows = metrics.read_metrics(workdir / "metrics.jsonl")
  if lead:
    metrics.plot_loss([(f"{config.seconds}s", rows)], workdir / "loss.png")
  losses = [r["loss"] for r in rows]
  return {"first_loss": losses[0], "last_loss": losses[-1]} if losses else {}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS["verbosity"].present:  # Orbax logs every file it writes at INFO
    logging.set_verbosity(logging.WARNING)
  if FLAGS.distributed:
    jax.distributed.initialize()
  print(json.dumps(train(FLAGS.config, FLAGS.workdir)))


if __name__ == "__main__":  # flags live here so other entry points can import train()
  config_flags.DEFINE_config_file("config", None, "Stage config file[:preset].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots.")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host pods).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
