"""Speed, FLOP/s, compile time and memory of the TTT inner loop (ttt_linear, ttt_mlp).

    python benchmarks/ttt_layer.py [--seq_lens=1024,4096,16384,65536] [--B=1] [--H=1]
        [--d=64] [--K=64] [--remat_group=16] [--matmul_dtype=float32|bfloat16]
        [--ops=ttt_linear,ttt_mlp] [--repeats=3] [--out=results.json]

Accounting: a sequence length L is the number of tokens in each (batch, head)
stream, split into NC = L / K mini-batches. One call processes B * L tokens
(`tokens_per_s`) and B * H * L per-head tokens (`head_tokens_per_s`).
`fwd.flops` is the analytic matmul count (2 m n k per einsum) of the
step in ttt_jax/ttt_step.py times B * H * NC; elementwise work is not counted.
`fwd_bwd` times jax.grad of sum(out * cotangent) w.r.t. every input and the
initial fast weights. Each timing is the median of --repeats runs after one
warm-up; `compile_s` is lower + compile time. `memory_mib` holds XLA's
compiled memory analysis and, where the backend has memory_stats() (not on
CPU: null), the process-wide device high-water mark after that measurement.

One JSON document goes to stdout (and to --out); progress goes to stderr.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from absl import app, flags, logging
import jax
import jax.numpy as jnp

from bench_utils import emit, fwd_and_bwd, make_inputs, step_flops  # this directory
from ttt_jax.ops import ttt_linear, ttt_mlp

Array = jax.Array

OPS: dict[str, Callable[..., Array]] = {"ttt_linear": ttt_linear, "ttt_mlp": ttt_mlp}

_SEQ_LENS = flags.DEFINE_list(
    "seq_lens", ["1024", "4096", "16384", "65536"],
    "Tokens per (batch, head) stream; each must be a multiple of --K.")
_OPS = flags.DEFINE_list("ops", list(OPS), f"Ops to benchmark, from {list(OPS)}.")
_B = flags.DEFINE_integer("B", 1, "Batch size.")
_H = flags.DEFINE_integer("H", 1, "Number of heads.")
_D = flags.DEFINE_integer("d", 64, "Head dimension (TTT-MLP hidden width is 4d).")
_K = flags.DEFINE_integer("K", 64, "Mini-batch size (tokens per inner step).")
_REMAT = flags.DEFINE_integer(
    "remat_group", 16, "Checkpoint the scan in groups of this many mini-batches; 0: no remat.")
_MATMUL_DTYPE = flags.DEFINE_enum(
    "matmul_dtype", "float32", ["float32", "bfloat16"], "Matmul operand dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per measurement (median reported).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON document to this file.")


def bench(op: str, seq_len: int, B: int, H: int, d: int, K: int,
          remat_group: int | None, matmul_dtype: str, repeats: int) -> dict[str, Any]:
  """One results row: fwd and fwd+bwd of `op` on B x H streams of seq_len tokens."""
  NC = seq_len // K
  args = make_inputs(op, B, H, NC, K, d)
  fwd = lambda *a: OPS[op](*a, remat_group=remat_group, matmul_dtype=jnp.dtype(matmul_dtype))
  timings = fwd_and_bwd(fwd, args, B=B, H=H, seq_len=seq_len,
                        minibatch_flops=step_flops(op, K, d, 4 * d), repeats=repeats)
  return {"op": op, "seq_len": seq_len, "B": B, "H": H, "d": d, "K": K, "NC": NC,
          "matmul_dtype": matmul_dtype, "remat_group": remat_group, **timings}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  seq_lens = [int(s) for s in _SEQ_LENS.value]
  K = _K.value
  if bad := [s for s in seq_lens if s <= 0 or s % K]:
    raise app.UsageError(f"--seq_lens {bad} are not positive multiples of --K={K}")
  if unknown := set(_OPS.value) - set(OPS):
    raise app.UsageError(f"Unknown --ops {sorted(unknown)}; choose from {list(OPS)}")
  remat_group = _REMAT.value or None
  config = {"seq_lens": seq_lens, "ops": _OPS.value, "B": _B.value, "H": _H.value,
            "d": _D.value, "K": K, "remat_group": remat_group,
            "matmul_dtype": _MATMUL_DTYPE.value, "repeats": _REPEATS.value}
  results = []
  for op in _OPS.value:
    for seq_len in seq_lens:
      logging.info("%s seq_len=%d ...", op, seq_len)
      row = bench(op, seq_len, _B.value, _H.value, _D.value, K, remat_group,
                  _MATMUL_DTYPE.value, _REPEATS.value)
      logging.info("%s seq_len=%d: fwd %.4gs (%.4g tok/s), fwd+bwd %.4gs (%.4g tok/s)",
                   op, seq_len, row["fwd"]["seconds"], row["fwd"]["tokens_per_s"],
                   row["fwd_bwd"]["seconds"], row["fwd_bwd"]["tokens_per_s"])
      results.append(row)
  emit(config, results, _OUT.value)


if __name__ == "__main__":
  app.run(main)
