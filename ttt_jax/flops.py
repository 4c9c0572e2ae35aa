"""Matmul FLOPs counted on a traced program (what runs, loops included).

Used by `ttt_jax.evaluate` (the FLOPs per train step of each variant) and by
the benchmarks (`benchmarks/paper_scale.py`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax


def matmul_flops(fn: Callable[..., Any], *args: Any) -> float:
  """Matmul FLOPs (2 per multiply-add of every dot_general) one call of `fn` executes.

  Counted on the traced program (`jax.make_jaxpr`; args may be ShapeDtypeStructs),
  so it is what runs, recomputation included: a scan body counts `length`
  times, a cond its costliest branch, a shard_map body once per device (its
  shapes are per device), a Pallas kernel once per grid step. XLA's `cost_analysis()` counts a while loop's body
  once whatever its trip count, which at paper scale misses the 42-block scan
  and the 5,487-step TTT scan. Elementwise work is not counted.
  """
  return _count(jax.make_jaxpr(fn)(*args).jaxpr)


def _count(jaxpr: Any) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      out = eqn.outvars[0].aval.shape
      total += 2.0 * math.prod(out) * math.prod(lhs[i] for i in contract)
      continue
    subs = [_count(j) for j in _subjaxprs(eqn.params)]
    if not subs:
      continue
    if name == "scan":
      total += eqn.params["length"] * sum(subs)
    elif name == "cond":
      total += max(subs)
    elif name == "shard_map":
      total += eqn.params["mesh"].size * sum(subs)
    elif name == "pallas_call":  # the kernel body runs once per grid step
      total += math.prod(eqn.params["grid_mapping"].grid) * sum(subs)
    else:
      total += sum(subs)
  return total


def _subjaxprs(params: dict[str, Any]):
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(v, jax.extend.core.ClosedJaxpr):
        yield v.jaxpr
      elif isinstance(v, jax.extend.core.Jaxpr):
        yield v
