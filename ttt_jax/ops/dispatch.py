"""One entry point for the TTT inner loop: inner model x implementation.

`inner_loop(kind, impl, ...)` runs TTT-Linear (kind="linear") or TTT-MLP
(kind="mlp") either as the pure-JAX `lax.scan` of `ttt_jax.ops.ttt`
(impl="xla": any backend, fp64 included) or as the fused Pallas TPU kernels
of `pallas_kernels.tpu` (impl="pallas": TPU, or any backend with
interpret=True). Both take the same arguments and give the same results and
gradients (to round-off; see the kernel tests for the tolerances).

remat_group. For "xla" it checkpoints the scan carry every remat_group
mini-batches (None: autodiff keeps every step's residuals). The Pallas
kernels implement the same trade-off natively: the forward kernel stores
the fast weights each G-th mini-batch starts from (None: every mini-batch,
no recompute) and the backward kernel recomputes the rest of each group in
VMEM. So remat_group is honoured by both implementations with one meaning,
"keep NC / G weight states for the backward and recompute the rest", and
never changes the results; only the memory/compute balance differs. (For
TTT-MLP with the Pallas kernels it is the main memory knob: a per-mini-batch
checkpoint is 2dF + F + d floats per stream; see `pallas_kernels.tpu.ttt`.)
The Pallas path has stricter shape and dtype limits (K, d, F multiples of 8,
fp32/bf16 only, a VMEM budget that also bounds remat_group); it raises a
ValueError naming them rather than silently falling back to XLA.

interpret is a Pallas-only switch (run the kernels in Pallas TPU interpret
mode, e.g. on CPU in tests); impl="xla" has nothing to interpret and
ignores it, so a model can carry the flag whatever its impl.

`pallas_kernels` imports `ttt_jax.ops.ttt`, hence the kernels are imported
inside `ttt` on first use, not at module import (which would be a cycle
through `ttt_jax.ops`).
"""

from __future__ import annotations

from typing import Any

import jax

from ttt_jax.ops.ttt import ttt_linear, ttt_mlp

Array = jax.Array

WEIGHT_NAMES = {"linear": ("W", "b"), "mlp": ("W1", "b1", "W2", "b2")}
KINDS = tuple(WEIGHT_NAMES)
IMPLS = ("xla", "pallas")


def check_kind_impl(kind: str, impl: str) -> None:
  """ValueError unless kind is in KINDS and impl in IMPLS."""
  if kind not in WEIGHT_NAMES:
    raise ValueError(f"inner_loop: unknown inner model kind {kind!r}; expected one of {KINDS}")
  if impl not in IMPLS:
    raise ValueError(f"inner_loop: unknown impl {impl!r}; expected one of {IMPLS} "
                     f"('xla': the lax.scan op, 'pallas': the fused TPU kernels)")


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
    impl: "xla" (`ttt_jax.ops.ttt_linear` / `ttt_mlp`) or "pallas"
      (`pallas_kernels.tpu.ttt_linear_pallas` / `ttt_mlp_pallas`).
    q, k, v: [B, H, NC, K, d]; eta: [B, H, NC, K]; ln_weight, ln_bias: [H, d].
    *weights: the initial fast weights of `kind`, in the order above.
    remat_group: keep the fast weights for the backward only every this many
      mini-batches and recompute the rest (both impls; see module docstring).
    matmul_dtype: dtype of the matmul operands (None: the fp32 state dtype).
    return_final_weights: also return the fast weights after the last step.
    interpret: impl="pallas" only: run the kernels in Pallas TPU interpret
      mode (True or a `pltpu.InterpretParams`); ignored by impl="xla".

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
  if impl == "xla":
    fn = ttt_linear if kind == "linear" else ttt_mlp
  else:
    # Lazy: pallas_kernels.tpu.ttt imports ttt_jax.ops.ttt (see module docstring).
    from pallas_kernels.tpu.ttt import ttt_linear_pallas, ttt_mlp_pallas
    fn = ttt_linear_pallas if kind == "linear" else ttt_mlp_pallas
    kw["interpret"] = interpret
  return fn(q, k, v, eta, ln_weight, ln_bias, *weights, **kw)
