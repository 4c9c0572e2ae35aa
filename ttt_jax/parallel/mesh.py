"""The ('data', 'fsdp', 'context', 'tensor') device mesh, and batches placed on it.

  data     pure data parallelism: replicas of the (fsdp x context x tensor) group;
  fsdp     data parallelism with parameters and AdamW moments sharded (ZeRO-3);
  context  sequence parallelism: the residual stream is split along the tokens, and
           TTT / attention run head-sharded between two all-to-alls
           (`ttt_jax.parallel.context`); parameters are sharded over it too;
  tensor   heads and MLP hidden units split across devices.
The batch is split over (data, fsdp). Which array axis goes to which mesh axis
is `ttt_jax.parallel.sharding.RULES`. Every axis is `AxisType.Auto` (GSPMD
propagates shardings; `with_sharding_constraint` pins activations). Works
unchanged from one CPU to a multi-host pod (after `jax.distributed.initialize()`).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: Mapping[str, int], num_devices: int, key: str = "mesh"
               ) -> dict[str, int]:
  """{'data': n, ...} with the -1 entry (at most one) resolved; ValueError naming the problem
  (the sizes as config `key`.axis=n).

  Keys missing from `mesh_cfg` are 1 (configs written with only data and fsdp).
  """
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in AXES}
  text = lambda: ", ".join(f"{key}.{a}={s}" for a, s in sizes.items())
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"{text()}: at most one axis may be -1 (the remaining devices)")
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f"{text()}: sizes must be positive (or -1 for the remaining devices)")
  known = math.prod(s for s in sizes.values() if s != -1)
  if -1 in sizes.values():
    if num_devices % known:
      raise ValueError(f"{text()}: the fixed sizes multiply to {known}, which does not divide "
                       f"the {num_devices} devices")
    sizes = {a: num_devices // known if s == -1 else s for a, s in sizes.items()}
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"{text()} needs {math.prod(sizes.values())} devices, have {num_devices}; "
                     f"set one axis to -1 to take the rest")
  return sizes


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of `config.mesh` over `devices` (default: all), -1 taking the rest.

  Device order comes from `mesh_utils.create_device_mesh`, which places the
  innermost axes (tensor, context) on the closest chips of a TPU slice.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in AXES)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (AssertionError, NotImplementedError, ValueError):
    grid = np.asarray(devices).reshape(shape)  # a topology it cannot map (e.g. odd TPU counts)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over (data, fsdp); replicated over context and tensor."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the mesh's batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def process_batch_shard(devices: np.ndarray, process: int | None = None) -> tuple[int, int]:
  """(index, count): which of `count` equal parts of every global batch this process feeds.

  Processes whose devices cover the same batch rows (e.g. the hosts of one
  context group, which hold one sequence between them) must feed identical
  rows to `global_batch`, so data is sharded by batch group, not by process.
  devices: a mesh's device grid (`mesh.devices`, axes in `AXES` order).
  """
  process = jax.process_index() if process is None else process
  fsdp = devices.shape[AXES.index("fsdp")]
  rows: dict[int, set[int]] = {}
  for coords, device in np.ndenumerate(devices):
    rows.setdefault(device.process_index, set()).add(coords[0] * fsdp + coords[1])
  groups = sorted({tuple(sorted(r)) for r in rows.values()})
  if len({len(g) for g in groups}) > 1 or len({r for g in groups for r in g}) != sum(map(len, groups)):
    raise ValueError(f"mesh of shape {devices.shape}: processes cover unequal or overlapping "
                     f"batch rows {groups}; reorder the devices or change mesh.data/fsdp")
  return groups.index(tuple(sorted(rows[process]))), len(groups)
