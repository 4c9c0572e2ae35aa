"""One entry point for the TTT inner loop: inner model x implementation.

`inner_loop(kind, impl, ...)` runs TTT-Linear (kind="linear") or TTT-MLP
(kind="mlp") as
  impl="xla"         the pure-JAX `lax.scan` of `ttt_jax.ops.ttt` (any
                     backend, fp64 included);
  impl="pallas_tpu"  the fused Pallas TPU (Mosaic) kernels of
                     `pallas_kernels.tpu`;
  impl="pallas_gpu"  the fused Pallas GPU (Triton) kernels of
                     `pallas_kernels.gpu`;
  impl="pallas"      the fused kernels of the default backend: pallas_tpu on
                     a TPU, pallas_gpu on a GPU (on a CPU there is no native
                     kernel: name one of the two with interpret=True).
All take the same arguments and give the same results and gradients (to
round-off; see the kernel tests for the tolerances). Exporting for another
platform (e.g. `jax.export(..., platforms=["tpu"])` from a CPU host) needs
the explicit pallas_tpu / pallas_gpu.

remat_group. For "xla" it checkpoints the scan carry every remat_group
mini-batches (None: autodiff keeps every step's residuals). The Pallas
kernels implement the same trade-off natively: the forward kernel stores
the fast weights each G-th mini-batch starts from (None: every mini-batch,
no recompute) and the backward kernel recomputes the rest. So remat_group is
honoured by every implementation with one meaning, "keep NC / G weight
states for the backward and recompute the rest", and never changes the
results; only the memory/compute balance differs. (For TTT-MLP with the
kernels it is the main memory knob: a per-mini-batch checkpoint is
2dF + F + d floats per stream.) The kernels have stricter shape and dtype
limits (see their modules); they raise a ValueError naming the limit rather
than silently falling back to XLA.

interpret is a kernel-only switch (run the Pallas kernels in interpret
mode, e.g. on CPU in tests); impl="xla" has nothing to interpret and
ignores it, so a model can carry the flag whatever its impl.

The op and the kernels share the per-mini-batch math of `ttt_jax.ttt_step`
and import nothing of each other, so this module imports both directly.
"""

from __future__ import annotations

from typing import Any

import jax

from pallas_kernels.gpu.ttt import ttt_linear_pallas_gpu, ttt_mlp_pallas_gpu
from pallas_kernels.tpu.ttt import ttt_linear_pallas, ttt_mlp_pallas
from ttt_jax.ops.ttt import ttt_linear, ttt_mlp

Array = jax.Array

WEIGHT_NAMES = {"linear": ("W", "b"), "mlp": ("W1", "b1", "W2", "b2")}
KINDS = tuple(WEIGHT_NAMES)
IMPLS = ("xla", "pallas", "pallas_tpu", "pallas_gpu")
NATIVE_KERNELS = {"tpu": "pallas_tpu", "gpu": "pallas_gpu"}  # jax.default_backend() -> impl


def check_kind_impl(kind: str, impl: str) -> None:
  """ValueError unless kind is in KINDS and impl in IMPLS."""
  if kind not in WEIGHT_NAMES:
    raise ValueError(f"inner_loop: unknown inner model kind {kind!r}; expected one of {KINDS}")
  if impl not in IMPLS:
    raise ValueError(f"inner_loop: unknown impl {impl!r}; expected one of {IMPLS} "
                     f"('xla': the lax.scan op, 'pallas_tpu' / 'pallas_gpu': the fused "
                     f"TPU / GPU kernels, 'pallas': those of the default backend)")


def resolve_impl(impl: str) -> str:
  """'pallas' -> the default backend's kernels; other impls unchanged."""
  if impl != "pallas":
    return impl
  backend = jax.default_backend()
  if backend not in NATIVE_KERNELS:
    raise ValueError(
        f"inner_loop: impl='pallas' means the fused kernels of the default backend, and "
        f"the default backend {backend!r} has none; use impl='xla', or "
        f"'pallas_tpu' / 'pallas_gpu' with interpret=True to interpret a kernel here")
  return NATIVE_KERNELS[backend]


def inner_loop(
    kind: str, impl: str,
    q: Array, k: Array, v: Array, eta: Array,
    ln_weight: Array, ln_bias: Array, *weights: Array,
    remat_group: int | None = None,
    matmul_dtype: Any = None,
    return_final_weights: bool = False,
    interpret: Any = False,
):
  """The TTT inner loop of inner model `kind`, run by implementation `impl`.

  Args:
    kind: "linear" (weights W [H, d, d], b [H, 1, d]) or "mlp" (weights
      W1 [H, d, F], b1 [H, 1, F], W2 [H, F, d], b2 [H, 1, d]).
    impl: "xla", "pallas_tpu", "pallas_gpu" or "pallas" (see module docstring).
    q, k, v: [B, H, NC, K, d]; eta: [B, H, NC, K]; ln_weight, ln_bias: [H, d].
    *weights: the initial fast weights of `kind`, in the order above.
    remat_group: keep the fast weights for the backward only every this many
      mini-batches and recompute the rest (both impls; see module docstring).
    matmul_dtype: dtype of the matmul operands (None: the fp32 state dtype).
    return_final_weights: also return the fast weights after the last step.
    interpret: kernels only: run them in Pallas interpret mode (True; for
      pallas_tpu also a `pltpu.InterpretParams`); ignored by impl="xla".

  Returns:
    z [B, H, NC, K, d], and if asked the final weights (leading batch axis).

  Raises:
    ValueError: unknown kind or impl, the wrong number of weights for kind,
      or (from the op / kernels) bad shapes and unsupported settings.
  """
  check_kind_impl(kind, impl)
  names = WEIGHT_NAMES[kind]
  if len(weights) != len(names):
    raise ValueError(f"inner_loop: kind {kind!r} takes {len(names)} fast-weight arrays "
                     f"({', '.join(names)}), got {len(weights)}")
  kw = dict(remat_group=remat_group, matmul_dtype=matmul_dtype,
            return_final_weights=return_final_weights)
  impl = resolve_impl(impl)
  if impl == "xla":
    fn = ttt_linear if kind == "linear" else ttt_mlp
  elif impl == "pallas_tpu":
    fn = ttt_linear_pallas if kind == "linear" else ttt_mlp_pallas
    kw["interpret"] = interpret
  else:
    fn = ttt_linear_pallas_gpu if kind == "linear" else ttt_mlp_pallas_gpu
    kw["interpret"] = bool(interpret)
  return fn(q, k, v, eta, ln_weight, ln_bias, *weights, **kw)
