"""Dense layers and LayerNorms with logical axis names (the building blocks every layer uses).

`dense` is an `nnx.Linear` (parameters `kernel` [in, out] and `bias` [out],
so checkpoints and converters see plain Linear layers) whose kernel carries
logical names and is all-gathered over its storage-only axes right before
the matmul (`ttt_jax.parallel.sharding.GatheredDot`).
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx

from ttt_jax.parallel.sharding import GatheredDot, logical


def dense(n_in: int, n_out: int, names: tuple[str | None, str | None], *,
          init: Callable | None = None, zero: bool = False, **kw: Any) -> nnx.Linear:
  """Linear [n_in] -> [n_out], kernel names `names`, bias the output's name.

  init: the kernel initializer (default LeCun normal, as nnx.Linear);
  zero: a zero-initialised kernel (adaLN-Zero, output projections).
  """
  init = nnx.initializers.zeros if zero else init or nnx.initializers.lecun_normal()
  return nnx.Linear(n_in, n_out, kernel_init=logical(init, *names),
                    bias_init=logical(nnx.initializers.zeros, names[1]),
                    dot_general=GatheredDot(tuple(names)), **kw)


def layer_norm(features: int, eps: float, name: str = "norm", **kw: Any) -> nnx.LayerNorm:
  """Affine nnx.LayerNorm over `features`, its scale and bias named `name`."""
  return nnx.LayerNorm(features, epsilon=eps, scale_init=logical(nnx.initializers.ones, name),
                       bias_init=logical(nnx.initializers.zeros, name), **kw)
