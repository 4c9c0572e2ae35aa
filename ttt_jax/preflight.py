"""Preflight: a config checked against this machine before any data work or compile.

`check(config, purpose)` runs in seconds: it validates the keys a run would
otherwise fail on hours later, and estimates memory per device from the
abstract model (`nnx.eval_shape`: nothing is allocated). Each problem is one
line naming the key and the fix; all of them are raised together as one
`PreflightError`. The trainer, the curriculum and the sampler call it first.

The memory estimate (bytes per device) is deliberately simple, an order of
magnitude to refuse the impossible, not a planner:
  parameters   model params, sharded over 'fsdp';
  gradients    one fp32 gradient per parameter, sharded like them (training);
  optimizer    AdamW's two fp32 moments of every trainable parameter;
  activations  per example on the device: the residual stream kept at every
               block boundary (remat) or every block's working set (no remat),
               plus one block's working set and its attention scores: fp32
               [Lw, Lw] per window and head where the attention implementation
               this host would run (`model.attention_impl`, "auto" resolved) is
               the dense XLA path, one tile or a logsumexp for the blocked ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from ttt_jax import convert, optim
from ttt_jax.data import dataset, pipeline
from ttt_jax.layers import attention, sequence
from ttt_jax.layout import SECONDS_PER_SEGMENT
from ttt_jax.models import dit, text, vae
from ttt_jax.parallel import mesh as mesh_lib

GIB = 2.0**30
SAMPLE_MESH = {"data": 1, "fsdp": 1, "context": -1, "tensor": 1}
PURPOSES = ("train", "sample")
# Live [L, D]-sized tensors of one block at once (q/k/v, attention and TTT in and out,
# the 4x MLP hidden and its GELU, adaLN outputs), counted in units of [L, D].
BLOCK_WORKING_SET = 24
PAPER_HINT = ("`paper` (the default preset) is the pod job: CogVideoX-5B + TTT-MLP at 480x720, "
              "batch 64; on this machine use `:tiny` (e.g. --config=configs/tom_jerry_3s.py:tiny) "
              "or the README main job `python -m ttt_jax.curriculum --workdir=workdirs/tiny`; "
              "pods: launch/")


class PreflightError(ValueError):
  """One line per problem, each naming the config key and the fix."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device of one run, and what the device has."""
  params: float
  gradients: float
  optimizer: float
  activations: float
  device_bytes: float
  devices: int
  platform: str

  @property
  def total(self) -> float:
    return self.params + self.gradients + self.optimizer + self.activations

  def summary(self) -> str:
    size = lambda b: f"{b / GIB:.1f} GiB" if b >= 0.1 * GIB else f"{b / 2**20:.1f} MiB"
    parts = ", ".join(f"{k} {size(getattr(self, k))}"
                      for k in ("params", "gradients", "optimizer", "activations"))
    return (f"~{size(self.total)} per device needed ({parts}); this host has {self.devices} "
            f"{self.platform} device(s) with {size(self.device_bytes)} each")


def device_memory(device: jax.Device) -> float:
  """Usable bytes of one device: the allocator's limit, or the host's RAM split over CPU devices."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return float(stats["bytes_limit"])
  host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return host / max(1, len([d for d in jax.local_devices() if d.platform == device.platform]))


def mesh_problems(config: ml_collections.ConfigDict, purpose: str, devices: int
                  ) -> tuple[dict[str, int] | None, list[str]]:
  """(mesh sizes or None, problems) of the mesh `purpose` runs on (train: config.mesh;
  sample: config.sample.mesh) over `devices`: sizes, batch split, heads split."""
  key, mesh_cfg = mesh_config(config, purpose)
  try:
    sizes = mesh_lib.mesh_shape(mesh_cfg, devices, key)
  except ValueError as e:
    return None, [str(e)]
  problems = []
  batch = sizes["data"] * sizes["fsdp"]
  micro = config.train.get("microbatches", 1)
  if purpose == "train" and config.train.batch_size % batch:
    problems.append(f"train.batch_size={config.train.batch_size} is not divisible by the {batch} "
                    f"batch shards of {key} data={sizes['data']} x fsdp={sizes['fsdp']}; use a "
                    f"multiple of {batch}")
  elif purpose == "train" and (micro < 1 or config.train.batch_size // batch % micro):
    problems.append(f"train.microbatches={micro} does not divide the "
                    f"{config.train.batch_size // batch} examples of each batch shard "
                    f"(train.batch_size={config.train.batch_size} over {batch} shards); use a "
                    f"divisor of {config.train.batch_size // batch}")
  heads = dit.VARIANTS.get(config.model.variant, {}).get("num_heads")
  split = sizes["context"] * sizes["tensor"]
  if heads and heads % split:
    problems.append(f"{key}.context={sizes['context']} x {key}.tensor={sizes['tensor']} = {split} "
                    f"does not divide the {heads} heads of model.variant="
                    f"{config.model.variant!r}: TTT and attention run head-sharded; choose a "
                    f"product dividing {heads}")
  return sizes, problems


def mesh_config(config: ml_collections.ConfigDict, purpose: str) -> tuple[str, Any]:
  """(config key, mesh config) of `purpose`; configs from before sample.mesh sample on one
  context group of all devices."""
  if purpose == "sample":
    return "sample.mesh", config.sample.get("mesh", SAMPLE_MESH)
  return "mesh", config.mesh


def _config_problems(config: ml_collections.ConfigDict, purpose: str, init_exists: bool
                     ) -> list[str]:
  problems = []
  if config.seconds < SECONDS_PER_SEGMENT or config.seconds % SECONDS_PER_SEGMENT:
    problems.append(f"seconds={config.seconds}: a video is whole {SECONDS_PER_SEGMENT}-second "
                    f"segments; use a multiple of {SECONDS_PER_SEGMENT} (3, 9, 18, 30, 63)")
  problems += _data_problems(config, purpose)
  layer = config.model.get("sequence_layer", "ttt")
  if layer not in sequence.SEQUENCE_LAYERS:
    problems.append(f"model.sequence_layer={layer!r} is unknown; choose from "
                    f"{', '.join(sequence.SEQUENCE_LAYERS)}")
  if config.model.variant not in dit.VARIANTS:
    problems.append(f"model.variant={config.model.variant!r} is unknown; known: "
                    f"{', '.join(dit.VARIANTS)}")
  else:
    variant = dit.VARIANTS[config.model.variant]
    if config.data.codec in vae.CODECS:
      factor = vae.CODECS[config.data.codec].spatial_factor  # the class: no weights loaded
      patch = variant.get("patch_size", 2)
      step = factor * patch
      for key in ("height", "width"):
        if config.data[key] % step:
          problems.append(f"data.{key}={config.data[key]} is not a multiple of {step} (codec "
                          f"{factor}x times patch {patch}); use e.g. "
                          f"{max(step, config.data[key] // step * step)}")
    impl = _attention_impl(config)
    try:
      attention.check_impl(impl, config.model.dtype, variant["width"] // variant["num_heads"])
    except ValueError as e:
      problems.append(f"model.attention_impl={impl!r}: {e}")
  if purpose == "train":
    if config.train.nonfinite not in ("stop", "skip"):
      problems.append(f"train.nonfinite={config.train.nonfinite!r}: choose 'stop' or 'skip'")
    if config.model.pretrained and config.init_from:
      problems.append(f"set one of model.pretrained ({config.model.pretrained}) and init_from "
                      f"({config.init_from}): both initialise the model")
    frozen = config.optim.lr.other == 0
    if frozen and not config.init_from and not config.model.pretrained:
      problems.append(
          "optim.lr.other=0 freezes the base weights (a later stage trains only attention q/k/v/o "
          "and TTT), but neither init_from nor model.pretrained is set, so the zero-initialised "
          "output layer could never learn; pass --config.init_from=<the previous stage's "
          "workdir>, or run every stage with python -m ttt_jax.curriculum")
    if config.init_from and init_exists:
      ckpt = pathlib.Path(config.init_from) / "checkpoints"
      if not ckpt.is_dir() or not any(p.name.isdigit() for p in ckpt.iterdir()):
        problems.append(f"init_from={config.init_from}: no checkpoint in {ckpt}; train the "
                        f"previous stage there first, or fix the path")
    if config.model.pretrained:
      try:
        convert.pretrained_architecture(config.model.pretrained)
      except (FileNotFoundError, ValueError) as e:
        problems.append(f"model.pretrained={config.model.pretrained}: {e}; convert CogVideoX "
                        f"with python -m ttt_jax.convert cogvideox --src=DIR --dst=OUT")
  return problems


def _data_problems(config: ml_collections.ConfigDict, purpose: str) -> list[str]:
  """The dataset and the frozen encoders: names known, paths present."""
  data, problems = config.data, []
  for key, known in (("codec", vae.CODECS), ("text_encoder", text.TEXT_ENCODERS)):
    if data[key] not in known:
      problems.append(f"data.{key}={data[key]!r} is unknown; known: {', '.join(sorted(known))}")
    elif data[key] != "toy" and not data[f"{key}_path"]:
      problems.append(f"data.{key}={data[key]!r} needs data.{key}_path (the CogVideoX "
                      f"diffusers folder)")
    if data[f"{key}_path"] and not pathlib.Path(data[f"{key}_path"]).exists():
      problems.append(f"data.{key}_path={data[f'{key}_path']}: no such folder; download the "
                      f"CogVideoX diffusers folder (e.g. THUDM/CogVideoX-5b) there, or fix the path")
  if data.name not in pipeline.DATASETS:
    problems.append(f"data.name={data.name!r} does not exist; known datasets: "
                    f"{', '.join(pipeline.DATASETS)}")
  elif data.name == "storyboard" and purpose == "train":
    folder = dataset.location(data.dir, f"{config.seconds}s") if data.dir else None
    if folder is None or not (folder / dataset.VERSION / "dataset_info.json").is_file():
      problems.append(f"data.dir={data.dir!r} holds no prepared {config.seconds} s clips"
                      + (f" ({folder} is missing)" if folder else "") + "; "
                      + pipeline.prepare_command(data, config.seconds))
  return problems


def _attention_impl(config: ml_collections.ConfigDict) -> str:
  return config.model.get("attention_impl", "auto")  # workdir configs from before the key


def estimate_memory(config: ml_collections.ConfigDict, purpose: str, sizes: dict[str, int]
                    ) -> MemoryEstimate:
  """Bytes per device of `purpose` on a mesh of `sizes`; nothing is allocated.

  Parameters and their gradients and moments are split over fsdp x context x
  tensor (the rules shard the model width over fsdp and context, heads and
  MLP units over tensor); each device holds batch / (data x fsdp x
  train.microbatches) examples of L / context tokens at once.
  """
  model = nnx.eval_shape(lambda: dit.build(config.model, text_dim=config.data.text_dim,
                                           rngs=nnx.Rngs(0)))
  leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  groups = [optim.param_group(path) for path, _ in leaves]
  counts = [int(np.prod(x.shape)) for _, x in leaves]
  shards = sizes["fsdp"] * sizes["context"] * sizes["tensor"]
  params = sum(n * x.dtype.itemsize for n, (_, x) in zip(counts, leaves)) / shards
  training = purpose == "train"
  trainable = sum(n for n, g in zip(counts, groups) if config.optim.lr[g] > 0) if training else 0
  gradients = 4.0 * sum(counts) / shards if training else 0.0
  optimizer = 2 * 4.0 * trainable / shards

  codec = vae.CODECS[config.data.codec]  # the class: its factors, no weights loaded
  layout = pipeline.video_layout(config.data, config.seconds, codec, model.patch_size)
  batch_shards = sizes["data"] * sizes["fsdp"]
  micro = config.train.get("microbatches", 1)
  per_device = max(1, math.ceil(config.train.batch_size / batch_shards / micro)) if training else 2
  act = np.dtype(config.model.dtype).itemsize
  L, D, depth = -(-layout.seq_len // sizes["context"]), model.width, model.depth
  S, Lw = layout.attention_windows.index.shape
  heads = dit.VARIANTS[config.model.variant]["num_heads"]
  local_heads = max(1, heads // (sizes["context"] * sizes["tensor"]))
  impl = attention.resolve_impl(_attention_impl(config), config.model.dtype, D // heads, Lw)
  block = BLOCK_WORKING_SET * L * D * act + attention.score_bytes(impl, S, local_heads, Lw, Lw)
  if training:
    saved = depth * L * D * act if config.model.remat_policy != "none" else depth * block
    activations = per_device * (saved + block)
  else:  # sampling: one block live at a time, cond + uncond batched by CFG
    activations = per_device * block
  device = jax.devices()[0]
  return MemoryEstimate(params, gradients, optimizer, activations, device_memory(device),
                        jax.device_count(), device.platform)


def check(config: ml_collections.ConfigDict, purpose: str = "train", *,
          force: bool = False, init_exists: bool = True) -> MemoryEstimate | None:
  """Raises PreflightError listing every problem; returns the memory estimate if it ran.

  init_exists=False skips looking for init_from's checkpoint (the curriculum
  checks every stage before the earlier ones have written theirs).
  """
  if purpose not in PURPOSES:
    raise ValueError(f"preflight purpose must be one of {PURPOSES}, got {purpose!r}")
  problems = _config_problems(config, purpose, init_exists)
  sizes, mesh_lines = mesh_problems(config, purpose, jax.device_count())
  problems += mesh_lines
  estimate = None
  if config.model.variant in dit.VARIANTS and config.data.codec in vae.CODECS:
    if sizes is None:  # a mesh this host cannot make: what one device would need
      sizes = {a: 1 for a in mesh_lib.AXES}
    try:
      estimate = estimate_memory(config, purpose, sizes)
    except ValueError:  # a shape problem, already named above
      estimate = None
  if estimate is not None:
    if estimate.total > estimate.device_bytes and not force:
      problems.append(f"{config.preset} preset, {config.seconds} s, {purpose}: "
                      f"{estimate.summary()}; pass --force to run anyway")
  if problems:
    if config.preset == "paper":
      problems.append(PAPER_HINT)
    raise PreflightError("\n".join(problems))
  return estimate
