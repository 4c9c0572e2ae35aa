"""Memory and speed of the attention implementations on one window (ttt_jax/layers/attention.py).

    python benchmarks/attention.py [--seq_lens=1024,4096,17776] [--impls=xla,chunked,...]
        [--B=1] [--H=4] [--d=64] [--dtype=float32|bfloat16] [--nomasked] [--repeats=3]
        [--max_run_gib=4] [--nopaper] [--out=results.json]

Each row is one implementation at one window length Lw: B windows of Lw
queries and keys, H heads of d, and (--masked) a key-padding mask hiding
the last Lw/16 keys, as in a ragged window. `memory_mib` is XLA's compiled
memory analysis (temp = the working set beyond inputs and outputs); a row
runs only if its fwd+bwd program fits in --max_run_gib (otherwise
`executed` is false and the timings null: the dense path at 17,776 tokens
needs H x 1.2 GiB of scores). fwd+bwd is jax.grad of sum(out * cotangent)
w.r.t. q, k and v. `fwd.flops` is 4 B H Lw^2 d (QK^T and PV, masked keys
counted). Timings are the median of --repeats runs after one warm-up.
--paper adds rows compiled only, never run: the paper's window (17,776
tokens, 48 heads of 64, bf16) for every implementation the backend runs.
Default --impls: those this backend runs (xla, chunked, + cudnn on GPU,
splash on TPU).

One JSON document goes to stdout (and to --out); progress goes to stderr.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from absl import app, flags, logging
import jax
import jax.numpy as jnp

from bench_utils import MIB, emit, median_seconds  # this directory
from ttt_jax.layers import attention

Array = jax.Array
PAPER = dict(seq_len=17776, B=1, H=48, d=64, dtype="bfloat16")  # one 3 s window, CogVideoX-5B

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "4096", "17776"], "Window lengths Lw.")
_IMPLS = flags.DEFINE_list("impls", None, "Implementations (default: those this backend runs).")
_B = flags.DEFINE_integer("B", 1, "Windows (batch).")
_H = flags.DEFINE_integer("H", 4, "Heads.")
_D = flags.DEFINE_integer("d", 64, "Head dimension.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "q, k, v dtype.")
_MASKED = flags.DEFINE_bool("masked", True, "Mask the last Lw/16 keys (a ragged window).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median reported).")
_MAX_RUN_GIB = flags.DEFINE_float(
    "max_run_gib", 4.0, "Run a row only if its compiled fwd+bwd needs at most this much memory.")
_PAPER = flags.DEFINE_bool("paper", True, "Add the compiled-only paper-size rows.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON document to this file.")


def native_impls() -> list[str]:
  """The implementations the default backend runs."""
  backend = jax.default_backend()
  return ["xla", "chunked"] + [impl for impl, on in attention.NATIVE.items() if on == backend]


def programs(impl: str, masked: bool) -> dict[str, Callable[..., Any]]:
  """fwd(q, k, v) and fwd_bwd(q, k, v, cotangent) of `impl`, mask built inside."""
  def fwd(q: Array, k: Array, v: Array) -> Array:
    mask = None
    if masked:
      L = k.shape[1]
      mask = jnp.broadcast_to(jnp.arange(L) < L - L // 16, (k.shape[0], 1, 1, L))
    return attention.attention(q, k, v, mask, impl=impl)

  loss = lambda q, k, v, ct: jnp.sum(fwd(q, k, v).astype(jnp.float32) * ct)
  return {"fwd": fwd, "fwd_bwd": jax.grad(loss, argnums=(0, 1, 2))}


def compile_all(impl: str, structs: Sequence[jax.ShapeDtypeStruct], masked: bool
                ) -> dict[str, tuple[Any, float, dict[str, float]]]:
  """phase -> (compiled program, compile seconds, memory in MiB), from shapes only."""
  out = {}
  for phase, fn in programs(impl, masked).items():
    args = structs if phase == "fwd" else (*structs, structs[0])
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    analysis = compiled.memory_analysis()
    memory = {name: getattr(analysis, f"{name}_size_in_bytes") / MIB
              for name in ("temp", "argument", "output")}
    out[phase] = (compiled, seconds, memory)
  return out


def bench(impl: str, seq_len: int, B: int, H: int, d: int, dtype: str, masked: bool,
          repeats: int, max_run_gib: float | None) -> dict[str, Any]:
  """One results row; max_run_gib None: compile only."""
  shape = (B, seq_len, H, d)
  structs = [jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))] * 3
  compiled = compile_all(impl, structs, masked)
  need_gib = sum(compiled["fwd_bwd"][2].values()) * MIB / 2**30
  executed = max_run_gib is not None and need_gib <= max_run_gib
  flops = 4 * B * H * seq_len * seq_len * d
  row = {"impl": impl, "seq_len": seq_len, "B": B, "H": H, "d": d, "dtype": dtype,
         "masked": masked, "executed": executed,
         "compile_s": {phase: c[1] for phase, c in compiled.items()},
         "memory_mib": {phase: c[2] for phase, c in compiled.items()},
         "fwd": {"seconds": None, "tokens_per_s": None, "flops": flops, "flops_per_s": None},
         "fwd_bwd": {"seconds": None, "tokens_per_s": None}}
  if executed:
    q, k, v, ct = (jax.random.normal(key, shape).astype(dtype)
                   for key in jax.random.split(jax.random.key(0), 4))
    fwd_s = median_seconds(compiled["fwd"][0], (q, k, v), repeats)
    bwd_s = median_seconds(compiled["fwd_bwd"][0], (q, k, v, ct), repeats)
    row["fwd"].update(seconds=fwd_s, tokens_per_s=B * seq_len / fwd_s, flops_per_s=flops / fwd_s)
    row["fwd_bwd"].update(seconds=bwd_s, tokens_per_s=B * seq_len / bwd_s)
  return row


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  seq_lens = [int(s) for s in _SEQ_LENS.value]
  if bad := [s for s in seq_lens if s <= 0]:
    raise app.UsageError(f"--seq_lens {bad} are not positive")
  impls = _IMPLS.value or native_impls()
  if unrunnable := sorted(set(impls) - set(native_impls())):
    raise app.UsageError(f"--impls {unrunnable} do not run on this {jax.default_backend()!r} "
                         f"backend; choose from {native_impls()}")
  config = {"seq_lens": seq_lens, "impls": impls, "B": _B.value, "H": _H.value, "d": _D.value,
            "dtype": _DTYPE.value, "masked": _MASKED.value, "repeats": _REPEATS.value,
            "max_run_gib": _MAX_RUN_GIB.value, "paper": PAPER if _PAPER.value else None}
  results = []
  for impl in impls:
    for seq_len in seq_lens:
      logging.info("%s Lw=%d ...", impl, seq_len)
      row = bench(impl, seq_len, _B.value, _H.value, _D.value, _DTYPE.value, _MASKED.value,
                  _REPEATS.value, _MAX_RUN_GIB.value)
      logging.info("%s Lw=%d: temp fwd %.1f MiB, fwd+bwd %.1f MiB; fwd %s s, fwd+bwd %s s",
                   impl, seq_len, row["memory_mib"]["fwd"]["temp"],
                   row["memory_mib"]["fwd_bwd"]["temp"], row["fwd"]["seconds"],
                   row["fwd_bwd"]["seconds"])
      results.append(row)
  if _PAPER.value:
    for impl in native_impls():
      logging.info("paper size, %s: compiling ...", impl)
      results.append(bench(impl, **PAPER, masked=True, repeats=0, max_run_gib=None))
  emit(config, results, _OUT.value)


if __name__ == "__main__":
  app.run(main)
