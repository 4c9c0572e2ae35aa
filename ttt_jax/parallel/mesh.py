"""A ('data', 'fsdp') device mesh; batches split over both, parameters over 'fsdp'.

Data parallelism replicates the model over 'data'; fully-sharded data
parallelism (ZeRO-3 style) splits every parameter, and therefore its AdamW
moments, along its largest axis that the 'fsdp' size divides. `jax.jit`
then inserts the all-gathers and reduce-scatters. Works unchanged from one
CPU to a multi-host TPU pod (after `jax.distributed.initialize()`).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")


def make_mesh(mesh_cfg: Mapping[str, int], devices: list | None = None) -> Mesh:
  """mesh_cfg {'data': n or -1, 'fsdp': m or -1}: -1 takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  sizes = [mesh_cfg[a] for a in AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(zip(AXES, sizes))} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                     f"have {len(devices)}")
  return Mesh(np.asarray(devices).reshape(sizes), AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(AXES))


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Shard the largest axis divisible by the fsdp size; replicate small or odd ones."""
  if fsdp == 1:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(mesh: Mesh, state: Any) -> Any:
  """A NamedSharding for every array leaf of `state`."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp)), state)


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded over the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
