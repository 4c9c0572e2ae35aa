"""XLA scan vs fused Pallas kernels for the TTT inner loop: tokens/s and FLOP/s.

    python benchmarks/ttt_kernels.py [--seq_lens=1024,4096,16384] [--kinds=linear,mlp]
        [--impls=xla,pallas] [--B=1] [--H=1] [--d=64] [--K=64] [--remat_group=0]
        [--matmul_dtype=bfloat16] [--repeats=3] [--interpret] [--out=results.json]

Every implementation runs through `ttt_jax.ops.inner_loop` on the same
inputs (`bench_utils.make_inputs`). impl "pallas" is the default backend's
kernels (Mosaic on a TPU, Triton on a GPU); "pallas_tpu" / "pallas_gpu" name
one. A kernel runs natively only on its own platform; anywhere else pass
--interpret, which runs it in Pallas interpret mode: a correctness smoke
test, not a speed figure (the JSON records `interpret` so such rows are never
mistaken for measurements). Large-chunk mode is just a large --K (e.g. 1024).
`fwd.flops` is the analytic matmul count of the step
(`bench_utils.step_flops`); fwd_bwd reports time and tokens/s only.
One JSON document goes to stdout (and to --out); progress goes to stderr.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from absl import app, flags, logging
import jax
import jax.numpy as jnp

from bench_utils import emit, fwd_and_bwd, make_inputs, step_flops  # this directory
from ttt_jax.ops import inner_loop
from ttt_jax.ops.dispatch import IMPLS, KINDS, NATIVE_KERNELS, resolve_impl

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "4096", "16384"],
                              "Tokens per (batch, head) stream; multiples of --K.")
_KINDS = flags.DEFINE_list("kinds", list(KINDS), "Inner models to benchmark.")
_IMPLS = flags.DEFINE_list("impls", list(IMPLS), "Implementations to compare.")
_B = flags.DEFINE_integer("B", 1, "Batch size.")
_H = flags.DEFINE_integer("H", 1, "Number of heads.")
_D = flags.DEFINE_integer("d", 64, "Head dimension (TTT-MLP hidden width is 4d).")
_K = flags.DEFINE_integer("K", 64, "Mini-batch size.")
_REMAT = flags.DEFINE_integer("remat_group", 0, "Store weights every G mini-batches; 0: all.")
_MATMUL_DTYPE = flags.DEFINE_enum("matmul_dtype", "bfloat16", ["float32", "bfloat16"],
                                  "Matmul operand dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median).")
_INTERPRET = flags.DEFINE_bool("interpret", False,
                               "Run Pallas kernels in interpret mode (off their platform).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON document to this file.")

_OP_NAMES = {"linear": "ttt_linear", "mlp": "ttt_mlp"}
_KERNEL_PLATFORM = {impl: backend for backend, impl in NATIVE_KERNELS.items()}


def _kernel_impls(impls: Sequence[str], interpret: bool) -> dict[str, str]:
  """impl -> the kernel impl it runs; UsageError for kernels off their platform."""
  backend = jax.default_backend()
  out = {}
  for impl in impls:
    if impl == "xla":
      continue
    if impl == "pallas" and backend not in NATIVE_KERNELS:
      if not interpret:
        raise app.UsageError(f"impl 'pallas' means the default backend's kernels and this "
                             f"backend is {backend!r}: run on a TPU or GPU, or pass --interpret "
                             f"(which then interprets the TPU kernels)")
      out[impl] = "pallas_tpu"
      continue
    out[impl] = resolve_impl(impl)
    if _KERNEL_PLATFORM[out[impl]] != backend and not interpret:
      raise app.UsageError(f"impl {impl!r} runs {out[impl]}, which cannot run natively on "
                           f"this {backend!r} backend: run on a "
                           f"{_KERNEL_PLATFORM[out[impl]]} or pass --interpret")
  return out


def bench(kind: str, impl: str, runs: str, seq_len: int, *, B: int, H: int, d: int, K: int,
          remat_group: int | None, matmul_dtype: str, repeats: int,
          interpret: bool) -> dict[str, Any]:
  """One results row: impl as asked, runs the implementation it resolved to."""
  NC = seq_len // K
  args = make_inputs(_OP_NAMES[kind], B, H, NC, K, d)
  fwd = functools.partial(inner_loop, kind, runs, remat_group=remat_group,
                          matmul_dtype=jnp.dtype(matmul_dtype), interpret=interpret)
  timings = fwd_and_bwd(fwd, args, B=B, H=H, seq_len=seq_len,
                        minibatch_flops=step_flops(_OP_NAMES[kind], K, d, 4 * d),
                        repeats=repeats)
  return {"kind": kind, "impl": impl, "runs": runs, "interpret": interpret and runs != "xla",
          "seq_len": seq_len, "B": B, "H": H, "d": d, "K": K, "NC": NC,
          "matmul_dtype": matmul_dtype, "remat_group": remat_group, **timings}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  seq_lens, K = [int(s) for s in _SEQ_LENS.value], _K.value
  if bad := [s for s in seq_lens if s <= 0 or s % K]:
    raise app.UsageError(f"--seq_lens {bad} are not positive multiples of --K={K}")
  if unknown := (set(_KINDS.value) - set(KINDS)) | (set(_IMPLS.value) - set(IMPLS)):
    raise app.UsageError(f"unknown --kinds/--impls {sorted(unknown)}; kinds {KINDS}, "
                         f"impls {IMPLS}")
  runs = {"xla": "xla", **_kernel_impls(_IMPLS.value, _INTERPRET.value)}
  config = {"seq_lens": seq_lens, "kinds": _KINDS.value, "impls": _IMPLS.value, "B": _B.value,
            "H": _H.value, "d": _D.value, "K": K, "remat_group": _REMAT.value or None,
            "matmul_dtype": _MATMUL_DTYPE.value, "repeats": _REPEATS.value,
            "interpret": _INTERPRET.value}
  results = []
  for kind in _KINDS.value:
    for impl in _IMPLS.value:
      for seq_len in seq_lens:
        logging.info("%s/%s seq_len=%d ...", kind, impl, seq_len)
        results.append(bench(kind, impl, runs[impl], seq_len, B=_B.value, H=_H.value, d=_D.value, K=K,
                             remat_group=config["remat_group"],
                             matmul_dtype=_MATMUL_DTYPE.value, repeats=_REPEATS.value,
                             interpret=_INTERPRET.value))
  emit(config, results, _OUT.value)


if __name__ == "__main__":
  app.run(main)
