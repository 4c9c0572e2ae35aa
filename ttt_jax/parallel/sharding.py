"""Logical axis names -> mesh axes: the ONE rules table, and the helpers that apply it.

Every parameter is created with logical names for its axes
(`logical(init, "embed", "mlp")`; the stacked-block `nnx.vmap` adds
"layers"), and major activations are pinned with `constrain(x, "act_batch",
"act_length", "act_embed")`. `RULES` maps each name to mesh axes of the
('data', 'fsdp', 'context', 'tensor') mesh (`ttt_jax.parallel.mesh`), as
maxtext / maxdiffusion do; changing the parallel layout means changing this
table, never a module. Weight names and activation names are kept apart, so
one spec never uses a mesh axis twice.

Mesh axes of size 1 are left out of specs. A dimension that the mesh axes of
its name do not divide keeps the longest leading run of those axes that does (e.g. 4 heads over tensor=8: replicated);
so any model runs on any mesh, and a tiny one simply shards less. Without a
mesh (no `jax.set_mesh`) `constrain` does nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MeshAxes = str | tuple[str, ...] | None
ZERO_AXES = ("data", "fsdp", "context")  # what a weight is split over only to store it

RULES: tuple[tuple[str, MeshAxes], ...] = (
    # ---- weights
    ("layers", None),  # the stacked depth axis: every device holds its slice of every layer
    ("embed", ("fsdp", "context")),  # the model width D: ZeRO-3 over fsdp and context
    ("heads", "tensor"),  # attention / TTT heads (H or H * d)
    ("mlp", "tensor"),  # the MLP hidden width
    ("kv", None),  # per-head feature axes (head dim, inner-model widths)
    ("in_features", None),  # narrow inputs: patch features, T5 width, time embedding
    ("norm", None),  # LayerNorm scales, biases and gates over D
    # ---- activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", "context"),  # the residual stream is sequence-sharded
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
)
_RULES = dict(RULES)


def mesh_axes(name: str | None) -> tuple[str, ...]:
  """The mesh axes of one logical name (() for None or a replicated name)."""
  if name is None:
    return ()
  if name not in _RULES:
    raise KeyError(f"logical axis name {name!r} is not in ttt_jax.parallel.sharding.RULES; "
                   f"known: {', '.join(_RULES)}")
  axes = _RULES[name]
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def spec(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh | Any) -> P:
  """PartitionSpec of an array of `shape` with logical `names` on `mesh` (divisibility kept)."""
  if len(names) != len(shape):
    raise ValueError(f"logical names {tuple(names)} do not match shape {tuple(shape)}")
  out = []
  for size, name in zip(shape, names):
    axes = tuple(a for a in mesh_axes(name) if mesh.shape.get(a, 1) > 1)
    while axes and size % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def logical(init: Callable, *names: str | None) -> Callable:
  """An initializer whose Variable carries logical axis `names` (sharded later, explicitly).

  Eager sharding is off: a model builds anywhere (no mesh needed); sharded
  creation is `init_sharded`'s jit with out_shardings.
  """
  return nnx.with_partitioning(init, tuple(names), eager_sharding=False)


def param(init: Callable, rngs: nnx.Rngs, shape: Sequence[int], dtype: Any,
          names: Sequence[str | None]) -> nnx.Param:
  """A free-standing nnx.Param of `shape` initialised by `init`, with logical `names`."""
  return nnx.Param(logical(init, *names)(rngs.params(), tuple(shape), dtype))


def named_param(value: jax.Array, *names: str | None) -> nnx.Param:
  """An nnx.Param holding `value`, with logical `names`."""
  return nnx.Param(value, out_sharding=tuple(names), eager_sharding=False)


def names_of(variable: nnx.Variable) -> tuple[str | None, ...]:
  """The logical names of a Variable (all None if it has none, e.g. RNG state)."""
  names = variable.get_metadata().get("out_sharding")
  return tuple(names) if names else (None,) * len(getattr(variable, "shape", ()))


def shardings(state: Any, mesh: Mesh) -> Any:
  """A NamedSharding for every Variable of an nnx state (or abstract state) tree."""
  def one(v: Any) -> Any:
    if not hasattr(v, "shape"):  # an optimizer's masked-out placeholder: no arrays
      return v
    return NamedSharding(mesh, spec(v.shape, names_of(v), mesh))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def current_mesh() -> Any | None:
  """The mesh of the enclosing `jax.set_mesh` (abstract inside jit), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """with_sharding_constraint by logical names under the current mesh; identity without one."""
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(x.shape, names, mesh)))



def init_sharded(create: Callable[[], Any], mesh: Mesh) -> Any:
  """create() (a module, or a tuple of them such as (model, optimizer)), built directly
  into the shardings `RULES` gives its Variables on `mesh`.

  The shapes come from `nnx.eval_shape` (nothing allocated); one jit with
  those out_shardings then creates every array in place, so no device ever
  holds a whole parameter or optimizer moment. Call it outside `jax.set_mesh`:
  under a mesh, nnx.eval_shape would read the logical names as mesh axes.
  """
  graphdef, abstract = nnx.split(nnx.eval_shape(create))
  with jax.set_mesh(mesh):
    state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings(abstract, mesh))()
  return nnx.merge(graphdef, state)


def gathered(w: jax.Array, *names: str | None) -> jax.Array:
  """A weight with logical `names`, all-gathered over its storage-only axes (ZERO_AXES) for use.

  FSDP's pattern made explicit: the whole weight (still split over 'tensor')
  meets the sequence-sharded activations, whose tokens never move; the
  backward reduce-scatters the weight's gradient. Left to itself GSPMD may
  instead all-gather the activations to produce the sharded weight gradient
  directly, a [L, D] gather per projection at paper size.
  """
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return w
  keep = lambda entry: tuple(a for a in ((entry,) if isinstance(entry, str) else entry or ())
                             if a not in ZERO_AXES)
  compute = P(*[(k[0] if len(k) == 1 else k) if (k := keep(e)) else None
                for e in spec(w.shape, names, mesh)])
  return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, compute))


@dataclasses.dataclass(frozen=True)
class GatheredDot:
  """`lax.dot_general` whose right operand, a kernel with logical `names`, is `gathered` first
  (an nnx.Linear's `dot_general`)."""
  names: tuple[str | None, ...]

  def __call__(self, lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
               **kw: Any) -> jax.Array:
    return jax.lax.dot_general(lhs, gathered(rhs, *self.names), dimension_numbers,
                               precision=precision, **kw)
