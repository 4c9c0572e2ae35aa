"""ttt-jax's TTT-MLP op against the public release's PyTorch op, side by side on one machine.

    python benchmarks/release_op.py --release_dir=PATH/ttt-video-dit [--seq_len=4096] [--B=1]
        [--H=4] [--d=64] [--K=64] [--remat_group=16] [--repeats=7] [--out=results.json]

PATH is a checkout of github.com/test-time-training/ttt-video-dit (MIT); its
`ttt.models.ssm.ops.ttt_mlp` is imported from there as shipped, with its
`@torch.compile` mini-batch step. Both ops get the same fp32 inputs (the
release's eta is the per-token rate repeated over the query axis, as its layer
builds it for non-causal mini-batches; its output layout is [B, NC, K, H, d])
and must agree before anything is timed. Timed: forward, and forward+backward
w.r.t. every input and initial fast weight (sum(out * cotangent)), median of
--repeats runs after warm-ups; the release op compiled (`torch.compile`) and
eager (`torch.compiler.set_stance("force_eager")`). Both sides checkpoint the
scan in groups of --remat_group mini-batches (0: neither does).

The release's modules import wandb for logging at import time; the op never
calls it, so a stand-in module is registered when wandb is not installed.

One JSON document goes to stdout (and to --out); progress goes to stderr.
"""

from __future__ import annotations

import importlib
import pathlib
import statistics
import sys
import time
import types
from typing import Any, Callable, Sequence

from absl import app, flags, logging
import jax
import numpy as np

from bench_utils import emit, fwd_and_bwd, make_inputs, step_flops  # this directory
from ttt_jax.ops import ttt_mlp

_RELEASE_DIR = flags.DEFINE_string(
    "release_dir", None, "Checkout of test-time-training/ttt-video-dit.", required=True)
_SEQ_LEN = flags.DEFINE_integer("seq_len", 4096, "Tokens per (batch, head) stream.")
_B = flags.DEFINE_integer("B", 1, "Batch size.")
_H = flags.DEFINE_integer("H", 4, "Number of heads.")
_D = flags.DEFINE_integer("d", 64, "Head dimension (hidden width 4d).")
_K = flags.DEFINE_integer("K", 64, "Mini-batch size.")
_REMAT = flags.DEFINE_integer(
    "remat_group", 16, "Mini-batches per checkpointed group, on both sides; 0: no checkpointing.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed runs per measurement (median reported).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON document to this file.")

RELEASE_OP = pathlib.Path("ttt/models/ssm/ops/ttt_mlp.py")
# Both compute in fp32 with different summation orders over 4096 tokens.
AGREE_ATOL = 1e-4


def load_release_op(release_dir: str) -> Callable[..., Any]:
  """The release's ttt_mlp, imported from its checkout."""
  root = pathlib.Path(release_dir).resolve()
  if not (root / RELEASE_OP).is_file():
    raise app.UsageError(f"--release_dir={release_dir}: no {RELEASE_OP} there; pass a checkout "
                         "of github.com/test-time-training/ttt-video-dit")
  try:
    importlib.import_module("wandb")
  except ImportError:
    sys.modules["wandb"] = types.ModuleType("wandb")
  sys.path.insert(0, str(root))
  return importlib.import_module("ttt.models.ssm.ops.ttt_mlp").ttt_mlp


def release_inputs(args: Sequence[jax.Array], B: int):
  """ttt-jax's op arguments in the release's layout, as leaf tensors that require grad."""
  import torch
  q, k, v, eta, ln_w, ln_b, W1, b1, W2, b2 = (np.asarray(a) for a in args)
  tile = lambda w: np.broadcast_to(w, (B, *w.shape)).copy()  # the layer tiles over batch
  eta_rows = np.broadcast_to(eta[..., None, :], (*eta.shape, eta.shape[-1])).copy()
  arrays = (k, q, v, eta_rows, ln_w, ln_b, tile(W1), tile(b1), tile(W2), tile(b2))
  return [torch.tensor(a, requires_grad=True) for a in arrays]


def median_s(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def time_release(op: Callable[..., Any], inputs: list[Any], cotangent: Any, remat_group: int,
                 repeats: int) -> dict[str, float]:
  """Seconds of the release op's fwd and fwd+bwd, and the first call's (compile) seconds."""
  import torch

  def fwd():
    with torch.no_grad():
      return op(*inputs, remat_group)

  def fwd_bwd():
    for x in inputs:
      x.grad = None
    (op(*inputs, remat_group) * cotangent).sum().backward()

  t0 = time.perf_counter()
  fwd_bwd()
  first = time.perf_counter() - t0
  return {"fwd": median_s(fwd, repeats, 2), "fwd_bwd": median_s(fwd_bwd, repeats, 2),
          "first_call_s": first}


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  B, H, d, K, L = _B.value, _H.value, _D.value, _K.value, _SEQ_LEN.value
  if L <= 0 or L % K:
    raise app.UsageError(f"--seq_len={L} is not a positive multiple of --K={K}")
  import torch
  op = load_release_op(_RELEASE_DIR.value)
  NC, group = L // K, _REMAT.value
  if group < 0:
    raise app.UsageError(f"--remat_group={group} must be >= 0")
  args = make_inputs("ttt_mlp", B, H, NC, K, d)
  fwd = lambda *a: ttt_mlp(*a, remat_group=group or None)

  inputs = release_inputs(args, B)
  with torch.no_grad():
    theirs = op(*inputs, group).numpy()  # [B, NC, K, H, d]
  ours = np.asarray(jax.jit(fwd)(*args)).transpose(0, 2, 3, 1, 4)  # [B, H, NC, K, d] -> theirs
  diff = float(np.max(np.abs(ours - theirs)))
  if not diff <= AGREE_ATOL:
    raise RuntimeError(f"the two ops disagree by {diff:.3g} > {AGREE_ATOL}: not the same op")

  logging.info("ttt-jax ...")
  timings = fwd_and_bwd(fwd, args, B=B, H=H, seq_len=L,
                        minibatch_flops=step_flops("ttt_mlp", K, d, 4 * d),
                        repeats=_REPEATS.value)
  cotangent = torch.randn(theirs.shape, generator=torch.Generator().manual_seed(1))
  release = {}
  for mode in ("compiled", "eager"):
    logging.info("release, %s ...", mode)
    torch.compiler.set_stance("default" if mode == "compiled" else "force_eager")
    release[mode] = time_release(op, inputs, cotangent, group, _REPEATS.value)
  torch.compiler.set_stance("default")

  ours_s = {p: timings[p]["seconds"] for p in ("fwd", "fwd_bwd")}
  row = {"op": "ttt_mlp", "seq_len": L, "B": B, "H": H, "d": d, "K": K, "NC": NC,
         "remat_group": group, "max_abs_diff": diff, "ttt_jax": timings,
         "release": release, "torch_version": torch.__version__,
         "torch_threads": torch.get_num_threads(),
         "speedup_vs_compiled": {p: release["compiled"][p] / ours_s[p] for p in ours_s},
         "speedup_vs_eager": {p: release["eager"][p] / ours_s[p] for p in ours_s}}
  emit({"release_dir": str(pathlib.Path(_RELEASE_DIR.value).resolve()),
        "repeats": _REPEATS.value}, [row], _OUT.value)


if __name__ == "__main__":
  app.run(main)
