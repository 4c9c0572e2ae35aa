"""Time one full training step of a configurable DiT: forward, backward and the AdamW update.

    python benchmarks/train_step.py [--width=1024] [--depth=8] [--heads=16] [--seconds=9]
        [--latent_h=60] [--latent_w=90] [--text_len=226] [--text_dim=4096] [--batch=1]
        [--dtype=bfloat16] [--ttt_impl=xla|pallas] [--attention_impl=auto] [--remat=full]
        [--preset=paper] [--repeats=3] [--out=result.json]

The step is `ttt_jax.train.train_step` (random timestep, noise and caption
dropout, v-prediction loss, gradient clip, AdamW on every parameter group),
jitted with the model and optimizer state donated as training does; the
model is `VideoDiT.from_config("cogvideox-5b", width=, depth=, num_heads=)`
with TTT-MLP in every block and the --preset's TTT settings and first-stage
optimizer recipe (configs/common.py: every group trained). The latents are
--latent_h x --latent_w (the token grid is half of that: 2x2 patches) over
the 3 s segments of --seconds; inputs are random.

The defaults are a mid-size model for one GPU (about 0.2 B parameters with
TTT) on a 9 s paper-resolution clip (480x720 pixels: 60x90 latents, ~51K
tokens). `memory_mib` is XLA's compiled memory analysis of the step plus the
device's peak bytes in use where the backend reports it (null on CPU).
One JSON line goes to stdout (and to --out); progress goes to stderr.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time
from typing import Any, Sequence

from absl import app, flags, logging
import jax
import jax.numpy as jnp
from flax import nnx

from bench_utils import MIB  # this directory

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ (not installed)
from configs import common  # noqa: E402
from ttt_jax import optim, train
from ttt_jax.layout import VideoLayout
from ttt_jax.models import dit

_WIDTH = flags.DEFINE_integer("width", 1024, "Model width.")
_DEPTH = flags.DEFINE_integer("depth", 8, "Blocks.")
_HEADS = flags.DEFINE_integer("heads", 16, "Attention (and TTT) heads.")
_SECONDS = flags.DEFINE_integer("seconds", 9, "Video length: a multiple of 3 s.")
_LATENT_H = flags.DEFINE_integer("latent_h", 60, "Latent height (even: 2x2 patches).")
_LATENT_W = flags.DEFINE_integer("latent_w", 90, "Latent width (even: 2x2 patches).")
_TEXT_LEN = flags.DEFINE_integer("text_len", 226, "Text tokens per 3 s segment.")
_TEXT_DIM = flags.DEFINE_integer("text_dim", 4096, "Text encoder width (T5-XXL: 4096).")
_BATCH = flags.DEFINE_integer("batch", 1, "Videos per step.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"],
                           "Compute dtype (parameters and optimizer state stay fp32).")
_TTT_IMPL = flags.DEFINE_enum("ttt_impl", "xla", ["xla", "pallas", "pallas_tpu", "pallas_gpu"],
                              "TTT inner loop: XLA scan or the fused Pallas kernels.")
_ATTENTION_IMPL = flags.DEFINE_enum("attention_impl", "auto",
                                    ["auto", "xla", "chunked", "cudnn", "splash"],
                                    "Local attention implementation.")
_REMAT = flags.DEFINE_enum("remat", "full", sorted(dit.REMAT_POLICIES), "Block remat policy.")
_PRESET = flags.DEFINE_enum("preset", "paper", list(common.PRESETS),
                            "Config preset giving the TTT settings and optimizer recipe.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps after one warm-up (median reported).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON line to this file.")


def build(config: dict[str, Any], rngs: nnx.Rngs) -> dit.VideoDiT:
  """The benchmark's DiT: CogVideoX-5B's structure at the given size."""
  stage = common.get_config(3, config["preset"])  # the first stage: TTT settings
  ttt = {**stage.model.ttt.to_dict(), "impl": config["ttt_impl"]}
  ttt["matmul_dtype"] = jnp.dtype(ttt["matmul_dtype"]) if ttt.get("matmul_dtype") else None
  return dit.VideoDiT.from_config(
      "cogvideox-5b", width=config["width"], depth=config["depth"],
      num_heads=config["heads"], text_dim=config["text_dim"], sequence_layer="ttt", ttt=ttt,
      scan_layers=True, remat_policy=config["remat"], attention_impl=config["attention_impl"],
      dtype=jnp.dtype(config["dtype"]), rngs=rngs)


def benchmark(config: dict[str, Any]) -> dict[str, Any]:
  """One results row: compile time, step time, throughput and memory of the step."""
  if config["latent_h"] % 2 or config["latent_w"] % 2:
    raise app.UsageError(f"--latent_h/--latent_w {config['latent_h']}x{config['latent_w']} "
                         "must be even (2x2 patches)")
  stage = common.get_config(3, config["preset"])  # the first stage trains every group
  model = build(config, nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optim.make_optimizer(stage.optim), wrt=nnx.Param)
  param_count = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  layout = VideoLayout.from_seconds(config["seconds"], text_len=config["text_len"],
                                    height=config["latent_h"] // model.patch_size,
                                    width=config["latent_w"] // model.patch_size)
  B = config["batch"]
  k_lat, k_text = jax.random.split(jax.random.key(0))
  batch = {
      "latents": jax.random.normal(k_lat, (B, layout.num_frames, config["latent_h"],
                                           config["latent_w"], model.latent_channels)),
      "text": jax.random.normal(k_text, (B, layout.num_text, config["text_dim"])),
  }
  null_text = jnp.zeros((layout.num_text, config["text_dim"]))
  rng = jax.random.key(1)

  graph, state = nnx.split((model, optimizer))
  step = train.pure_step(stage, layout, graph)

  state_mib = sum(x.nbytes for x in jax.tree.leaves(state)) / MIB
  logging.info("compiling: %d parameters, %d tokens per video ...", param_count, layout.seq_len)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch, rng, null_text).compile()
  compile_s = time.perf_counter() - t0
  analysis = compiled.memory_analysis()

  state, out = compiled(state, batch, jax.random.fold_in(rng, 0), null_text)  # warm-up
  jax.block_until_ready((state, out))
  times, losses = [], [float(out["loss"])]
  for i in range(1, config["repeats"] + 1):
    t0 = time.perf_counter()
    state, out = compiled(state, batch, jax.random.fold_in(rng, i), null_text)
    jax.block_until_ready((state, out))
    times.append(time.perf_counter() - t0)
    losses.append(float(out["loss"]))
  seconds = statistics.median(times)

  stats = jax.devices()[0].memory_stats()
  memory = {name: None if analysis is None else getattr(analysis, f"{name}_size_in_bytes") / MIB
            for name in ("temp", "argument", "output", "alias", "generated_code")}
  memory["state"] = state_mib
  memory["peak_in_use"] = (stats["peak_bytes_in_use"] / MIB
                           if stats and "peak_bytes_in_use" in stats else None)
  tokens = B * layout.seq_len
  return {"param_count": param_count, "seq_len": layout.seq_len, "tokens_per_step": tokens,
          "compile_s": compile_s, "step_s": seconds, "step_s_all": times,
          "tokens_per_s": tokens / seconds, "losses": losses, "memory_mib": memory}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _REPEATS.value < 1:
    raise app.UsageError("--repeats must be at least 1")
  config = {"width": _WIDTH.value, "depth": _DEPTH.value, "heads": _HEADS.value,
            "seconds": _SECONDS.value, "latent_h": _LATENT_H.value, "latent_w": _LATENT_W.value,
            "text_len": _TEXT_LEN.value, "text_dim": _TEXT_DIM.value, "batch": _BATCH.value,
            "dtype": _DTYPE.value, "ttt_impl": _TTT_IMPL.value,
            "attention_impl": _ATTENTION_IMPL.value, "remat": _REMAT.value,
            "preset": _PRESET.value, "repeats": _REPEATS.value}
  result = benchmark(config)
  device = jax.devices()[0]
  line = json.dumps({"device": str(device), "platform": device.platform,
                     "device_kind": device.device_kind, "jax_version": jax.__version__,
                     "config": config, **result})
  print(line)
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(line + "\n")


if __name__ == "__main__":
  app.run(main)
