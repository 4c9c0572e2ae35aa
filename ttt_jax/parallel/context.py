"""Context parallelism, "Ulysses over heads": per-head sequence work on a sharded sequence.

The residual stream [B, L, D] is split along the tokens over the mesh's
'context' axis (C devices) and its heads over 'tensor' (T). TTT and local
attention need whole sequences, but each head is independent of the others,
so `heads_parallel` runs them in `jax.shard_map`:

    [B/dp, L/C, H/T, ...] --all-to-all over context--> [B/dp, L, H/(T*C), ...]
        fn(...) on whole sequences of H/(T*C) heads (window gathers, the TTT
        order permutation and the inner-loop scan all stay on the device)
    [B/dp, L, H/(T*C), ...] --all-to-all back-------> [B/dp, L/C, H/T, ...]

(DeepSpeed-Ulysses; maxdiffusion's `_ulysses_attention`.) Each all-to-all
moves (C - 1) / C^2 of a sequence-sharded array per device, no all-gather of a
whole [L, D] operand ever happens, and no collective runs inside the TTT
scan. Explicit `shard_map` also keeps the Pallas kernels, custom calls that
GSPMD cannot partition, on their local shards. After the first all-to-all a
device holds the global heads (t * C + c) * H / (T * C) + [0, H / (T * C)):
per-head parameters are passed split over ('tensor', 'context') in that
order, so they line up. L must be a multiple of C (`VideoDiT` pads the
sequence); H a multiple of T * C.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
from jax.sharding import PartitionSpec as P

from ttt_jax.parallel.mesh import BATCH_AXES
from ttt_jax.parallel.sharding import current_mesh

Array = jax.Array


def context_size() -> int:
  """Devices on the current mesh's 'context' axis (1 without a mesh)."""
  mesh = current_mesh()
  return 1 if mesh is None else mesh.shape.get("context", 1)


def batch_axes(mesh, batch: int) -> tuple[str, ...]:
  """The leading run of (data, fsdp) whose size divides `batch` (a sampler's batch of 2 on a
  data-parallel mesh is replicated rather than refused)."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  while axes and batch % math.prod(mesh.shape[a] for a in axes):
    axes = axes[:-1]
  return axes


def heads_parallel(fn: Callable[..., Array], activations: Sequence[Array],
                   head_params: Sequence[Array] = ()) -> Array:
  """fn(*activations, *head_params) with every head's whole sequence on one device.

  activations: [B, L, H, ...] each, in any token order fn understands;
  head_params: [H, ...] each; fn returns [B, L, H, ...] of the rank of
  activations[0]. Without a mesh of more than one device, fn is called
  directly.
  """
  mesh = current_mesh()
  if mesh is None or mesh.size == 1:
    return fn(*activations, *head_params)
  B, L, H = activations[0].shape[:3]
  C, T = mesh.shape.get("context", 1), mesh.shape.get("tensor", 1)
  if L % C:
    raise ValueError(f"context parallelism: sequence length {L} is not a multiple of the "
                     f"mesh's context size {C} (VideoDiT pads its sequence; pad others)")
  if H % (C * T):
    raise ValueError(f"context parallelism: {H} heads do not split over context x tensor = "
                     f"{C} x {T} devices; choose mesh.context * mesh.tensor dividing {H}")
  batch = batch_axes(mesh, B) or None
  act_spec = lambda ndim: P(batch, "context", "tensor", *[None] * (ndim - 3))
  param_spec = lambda ndim: P(("tensor", "context"), *[None] * (ndim - 1))
  n = len(activations)

  def local(*args: Array) -> Array:
    acts = [jax.lax.all_to_all(x, "context", split_axis=2, concat_axis=1, tiled=True)
            if C > 1 else x for x in args[:n]]  # [B', L, H/(T*C), ...]
    out = fn(*acts, *args[n:])
    return jax.lax.all_to_all(out, "context", split_axis=1, concat_axis=2, tiled=True) \
        if C > 1 else out

  return jax.shard_map(
      local, mesh=mesh,
      in_specs=tuple(act_spec(x.ndim) for x in activations)
      + tuple(param_spec(p.ndim) for p in head_params),
      out_specs=act_spec(activations[0].ndim),
      # Per-head parameters are replicated over the batch axes; check_vma would make
      # their fast-weight carries fail ("varying" vs replicated) without adding safety.
      check_vma=False,
  )(*activations, *head_params)
