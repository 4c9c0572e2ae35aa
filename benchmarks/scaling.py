"""Train-step time and memory vs video length for every sequence layer of the DiT.

    python benchmarks/scaling.py [--variants=local,sliding_window,...] [--seconds=3,9,18,30,63]
        [--width=tiny|medium] [--batch=1] [--repeats=3] [--max_tokens_full_attention=16384]
        [--max_memory_gib=8] [--max_step_s=SECONDS] [--run_timeout_s=1200]
        [--plot=scaling.png] [--out=results.json]

    python benchmarks/scaling.py --width=tiny --seconds=3,9,18,30,63 --repeats=3 \\
        --plot=benchmarks/out/scaling_tiny.png > scaling_tiny.json

Each row is one variant of the global slot (`model.sequence_layer`:
local, sliding_window, full_attention, mamba2, gated_deltanet, lact, and
"ttt" as ttt_linear / ttt_mlp by `model.ttt.inner`) at one length: the
`tiny` preset's model (`--width=tiny`, 64 wide, 4 heads) or the same with
4 heads of 64 (`--width=medium`, 256 wide), trained on random latents and
captions of the preset's 64x96 clips by the real step
(`ttt_jax.train.train_step`: fwd, bwd, clip, AdamW; the 3 s stage's recipe,
every group trained, at every length, so the lengths differ in nothing else).
OpenBLAS runs single-threaded (OPENBLAS_NUM_THREADS, unless set): see below.

Each run is a fresh process (see `measure_isolated`). The state is not
donated, so the same arguments can be re-run: `step_s` is the median wall
time of --repeats steps after one warm-up. Memory is XLA's compiled memory
analysis (the CPU reports no peak in use): `memory_mib` = temp + argument +
output (the state counted in and out). `flops` are the matmul FLOPs the step
executes (`ttt_jax.flops.matmul_flops`).

`slopes["<variant>/<width>"]` are the least-squares slopes of log(step_s),
log(memory_mib) and log(temp_mib) vs log(tokens) over the measured lengths
(null below two points): ~1 for a linear-cost layer, ~2 for full attention
once its L^2 dominates. Rows are skipped with the reason in the row
(`skipped`): full_attention over --max_tokens_full_attention; a step whose
compiled memory is over --max_memory_gib (compiled, its memory and FLOPs
recorded, never run); a run that raised, died or ran past --run_timeout_s;
and every longer length of a variant after one of these or after one of its
steps took over --max_step_s. One JSON document goes to stdout (and to
--out); progress goes to stderr.
"""

from __future__ import annotations

import os

# Before any OpenBLAS loads: gated_deltanet's triangular solve runs in scipy's OpenBLAS
# (jaxlib's LAPACK call), whose own threads fighting XLA's for 2 busy cores made that step
# erratically up to 15x slower (9 s clip: 0.3 s, or 2-4.4 s with the default threads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json  # noqa: E402
import multiprocessing  # noqa: E402
from multiprocessing.connection import Connection  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any, Sequence  # noqa: E402

from absl import app, flags, logging  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from bench_utils import MIB, median_seconds  # noqa: E402  (this directory)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ (not installed)
from configs import common  # noqa: E402
from ttt_jax import optim, train  # noqa: E402
from ttt_jax.data import pipeline  # noqa: E402
from ttt_jax.flops import matmul_flops  # noqa: E402
from ttt_jax.layout import VideoLayout  # noqa: E402
from ttt_jax.models import dit, vae  # noqa: E402

# name -> (model.sequence_layer, model.ttt.inner or None)
VARIANTS: dict[str, tuple[str, str | None]] = {
    "local": ("local", None), "sliding_window": ("sliding_window", None),
    "full_attention": ("full_attention", None), "mamba2": ("mamba2", None),
    "gated_deltanet": ("gated_deltanet", None), "ttt_linear": ("ttt", "linear"),
    "ttt_mlp": ("ttt", "mlp"), "lact": ("lact", None),
}
# dit.build takes sizes from dit.VARIANTS only: a wider copy of "tiny" is registered when this
# script is imported (in every run's process), so both widths go through training's config path.
dit.VARIANTS["tiny-medium"] = {**dit.VARIANTS["tiny"], "width": 256, "num_heads": 4}
WIDTHS = {"tiny": "tiny", "medium": "tiny-medium"}
SLOPE_OF = ("step_s", "memory_mib", "temp_mib")  # row fields fitted vs tokens

_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), "Variants to measure.")
_SECONDS = flags.DEFINE_list("seconds", ["3", "9", "18", "30", "63"],
                             "Video lengths: multiples of 3 s.")
_WIDTH = flags.DEFINE_enum("width", "tiny", list(WIDTHS),
                           "tiny: the preset's DiT; medium: 256 wide, 4 heads of 64.")
_BATCH = flags.DEFINE_integer("batch", 1, "Videos per step.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed steps after one warm-up (median reported).")
_MAX_TOKENS_FULL = flags.DEFINE_integer(
    "max_tokens_full_attention", 16384, "Skip full_attention above this many tokens per video.")
_MAX_MEMORY_GIB = flags.DEFINE_float(
    "max_memory_gib", 8.0, "Run a step only if its compiled memory is at most this much "
    "(a shared box must not run out), and no longer length of its variant.")
_RUN_TIMEOUT_S = flags.DEFINE_float(
    "run_timeout_s", 1200, "Give up on a run (compile, steps, FLOP count) after this long.")
_MAX_STEP_S = flags.DEFINE_float(
    "max_step_s", None, "Skip a variant's longer lengths once one of its steps took longer.")
_PLOT = flags.DEFINE_string("plot", None, "Write a log-log PNG of step time vs tokens here.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON document to this file.")


def make_config(variant: str, width: str) -> ml_collections.ConfigDict:
  """The tiny preset's 3 s stage (every group trained) with `variant` in the global slot."""
  config = common.get_config(3, "tiny")
  layer, inner = VARIANTS[variant]
  with config.unlocked():
    config.model.variant = WIDTHS[width]
    config.model.sequence_layer = layer
    if inner:
      config.model.ttt.inner = inner
  return config


def video_layout(config: ml_collections.ConfigDict, seconds: int) -> VideoLayout:
  """The token layout of one `seconds` clip of the config's data."""
  codec = vae.CODECS[config.data.codec]  # the class: its factors, no weights
  patch = dit.VARIANTS[config.model.variant].get("patch_size", 2)
  return pipeline.video_layout(config.data, seconds, codec, patch)


def measure_step(config: ml_collections.ConfigDict, seconds: int, batch_size: int,
                 repeats: int, max_mib: float) -> dict[str, Any]:
  """Step time, compiled memory and matmul FLOPs of one train step at `seconds`; a step
  whose compiled memory is over `max_mib` is not run (no step_s, `skipped` says why)."""
  model = dit.build(config.model, text_dim=config.data.text_dim, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optim.make_optimizer(config.optim), wrt=nnx.Param)
  layout = video_layout(config, seconds)
  p, text_dim = model.patch_size, config.data.text_dim
  k_lat, k_text = jax.random.split(jax.random.key(0))
  batch = {  # latents [B, T, h, w, C], captions [B, Lt, Dt]
      "latents": jax.random.normal(k_lat, (batch_size, layout.num_frames, layout.height * p,
                                           layout.width * p, model.latent_channels)),
      "text": jax.random.normal(k_text, (batch_size, layout.num_text, text_dim)),
  }
  null_text = jnp.zeros((layout.num_text, text_dim))  # [Lt, Dt]
  graph, state = nnx.split((model, optimizer))
  step = train.pure_step(config, layout, graph)

  args = (state, batch, jax.random.key(1), null_text)
  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  mem = {f"{name}_mib": getattr(compiled.memory_analysis(), f"{name}_size_in_bytes") / MIB
         for name in ("temp", "argument", "output")}
  row = {"param_count": sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))),
         "compile_s": compile_s, **mem, "memory_mib": sum(mem.values()),
         "flops": matmul_flops(step, *args)}
  if row["memory_mib"] > max_mib:
    return {**row, "skipped": f"compiled memory {row['memory_mib'] / 1024:.1f} GiB > "
                              f"--max_memory_gib={max_mib / 1024:g}"}
  return {**row, "step_s": median_seconds(compiled, args, repeats)}


def _measure_in_child(conn: Connection, *args: Any) -> None:
  """Child process: one `measure_step`, its row (or its error) sent back through `conn`."""
  try:
    conn.send(measure_step(*args))
  except Exception as e:  # noqa: BLE001  the row's reason in the parent
    logging.exception("run failed")
    conn.send({"skipped": f"error: {type(e).__name__}: {e}"[:2000]})


def measure_isolated(timeout_s: float, *args: Any) -> dict[str, Any]:
  """`measure_step(*args)` in a fresh process, given up after `timeout_s`.

  Nothing of an earlier run (compiled programs, allocator, thread pools) carries
  over, and a run that hangs or is killed costs its row only: on the 2-core CPU,
  gated_deltanet at width 256 hung for good, both threads of XLA's pool waiting
  in jaxlib's LAPACK trsm (`ParallelBatchMap`) for work queued behind them.
  """
  ctx = multiprocessing.get_context("spawn")  # no fork of a process with live thread pools
  receive, send = ctx.Pipe(duplex=False)
  child = ctx.Process(target=_measure_in_child, args=(send, *args))
  child.start()
  send.close()  # the child's end only: its death reads as EOF
  try:
    if receive.poll(timeout_s):
      return receive.recv()
    return {"skipped": f"timed out after {timeout_s:g} s (--run_timeout_s)"}
  except EOFError:
    child.join()
    return {"skipped": f"its process died (exit code {child.exitcode})"}
  finally:
    child.kill()
    child.join()


def fit_slopes(rows: list[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
  """Per variant/width: least-squares slopes of log(y) vs log(tokens) over measured rows."""
  groups: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    groups.setdefault(f"{r['variant']}/{r['width']}", []).append(r)
  slopes = {}
  for key, group in groups.items():
    done = [r for r in group if r["skipped"] is None]
    fit = lambda y: (float(np.polyfit(np.log([r["tokens"] for r in done]),
                                      np.log([r[y] for r in done]), 1)[0])
                     if len(done) >= 2 else None)
    slopes[key] = {"points": len(done), **{y: fit(y) for y in SLOPE_OF}}
  return slopes


def plot(rows: list[dict[str, Any]], slopes: dict[str, dict[str, Any]], path: str) -> None:
  """Log-log step time vs tokens, one line per variant/width, its slope in the legend."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 5))
  for key, fit in slopes.items():
    done = [r for r in rows if f"{r['variant']}/{r['width']}" == key and r["skipped"] is None]
    if done:
      slope = "n/a" if fit["step_s"] is None else f"{fit['step_s']:.2f}"
      ax.loglog([r["tokens"] for r in done], [r["step_s"] for r in done], "o-",
                label=f"{key}: slope {slope}")
  ax.set(xlabel="tokens per video", ylabel="train step (s)",
         title=f"Train step vs length ({jax.devices()[0].device_kind})")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if unknown := set(_VARIANTS.value) - set(VARIANTS):
    raise app.UsageError(f"unknown --variants {sorted(unknown)}; choose from {list(VARIANTS)}")
  if _REPEATS.value < 1:
    raise app.UsageError("--repeats must be at least 1")
  seconds = sorted(int(s) for s in _SECONDS.value)  # ascending: --max_step_s skips the rest
  width, max_mib = _WIDTH.value, _MAX_MEMORY_GIB.value * 1024
  rows: list[dict[str, Any]] = []
  runs = [(v, s) for v in _VARIANTS.value for s in seconds]
  given_up: dict[str, str] = {}  # variant -> why its longer lengths are skipped
  for variant, secs in (bar := tqdm(runs, desc="scaling", unit="run", file=sys.stderr)):
    bar.set_postfix_str(f"{variant} {width} {secs} s")
    config = make_config(variant, width)
    tokens = video_layout(config, secs).seq_len
    row: dict[str, Any] = {"variant": variant, "width": width, "seconds": secs,
                           "tokens": tokens, "skipped": given_up.get(variant)}
    if variant == "full_attention" and tokens > _MAX_TOKENS_FULL.value:
      row["skipped"] = f"{tokens} tokens > --max_tokens_full_attention={_MAX_TOKENS_FULL.value}"
    if row["skipped"] is None:
      row.update(measure_isolated(_RUN_TIMEOUT_S.value, config, secs, _BATCH.value,
                                  _REPEATS.value, max_mib))
      if row["skipped"]:  # over memory, failed or hung: longer lengths would be no better
        given_up[variant] = f"the {secs} s run: {row['skipped']}"
      elif _MAX_STEP_S.value and row["step_s"] > _MAX_STEP_S.value:
        given_up[variant] = (f"the {secs} s step took {row['step_s']:.1f} s > "
                             f"--max_step_s={_MAX_STEP_S.value:g}")
    if row["skipped"]:
      logging.warning("%s %s s skipped: %s", variant, secs, row["skipped"])
    rows.append(row)
  slopes = fit_slopes(rows)
  if _PLOT.value:
    plot(rows, slopes, _PLOT.value)
  config = {"variants": _VARIANTS.value, "seconds": seconds, "width": width,
            "model": dit.VARIANTS[WIDTHS[width]], "batch": _BATCH.value,
            "repeats": _REPEATS.value, "max_tokens_full_attention": _MAX_TOKENS_FULL.value,
            "max_memory_gib": _MAX_MEMORY_GIB.value, "max_step_s": _MAX_STEP_S.value,
            "run_timeout_s": _RUN_TIMEOUT_S.value}
  # bench_utils.emit's document plus the slopes.
  device = jax.devices()[0]
  doc = json.dumps({"device": str(device), "platform": device.platform,
                    "device_kind": device.device_kind, "jax_version": jax.__version__,
                    "config": config, "results": rows, "slopes": slopes}, indent=1)
  print(doc)
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(doc + "\n")


if __name__ == "__main__":
  app.run(main)
