"""The ('data', 'fsdp', 'context', 'tensor') mesh, the logical-axis rules and data shards.

Multi-device behaviour (sharded steps equal one device, HLO collectives) is
tests/test_context_parallel.py, on 8 fake CPU devices in a subprocess.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.conftest import build_model, small_config
from ttt_jax.parallel import mesh as mesh_lib
from ttt_jax.parallel import sharding


@pytest.mark.parametrize("cfg, n, shape", [
    ({"data": -1, "fsdp": 1, "context": 1, "tensor": 1}, 8, (8, 1, 1, 1)),
    ({"data": -1, "fsdp": 2, "context": 2, "tensor": 1}, 8, (2, 2, 2, 1)),
    ({"data": 1, "fsdp": 1, "context": -1, "tensor": 2}, 8, (1, 1, 4, 2)),
    ({"data": 2, "fsdp": 3, "context": 1, "tensor": 1}, 6, (2, 3, 1, 1)),
    ({"data": 4, "fsdp": 16, "context": 4, "tensor": 1}, 256, (4, 16, 4, 1)),  # the paper preset
    ({"data": -1, "fsdp": 1}, 4, (4, 1, 1, 1)),  # configs from before context / tensor existed
])
def test_mesh_shape(cfg, n, shape):
  assert tuple(mesh_lib.mesh_shape(cfg, n).values()) == shape


@pytest.mark.parametrize("cfg, n, match", [
    ({"data": -1, "fsdp": -1}, 4, "at most one axis may be -1"),
    ({"data": -1, "fsdp": 2, "context": 2}, 6, "multiply to 4, which does not divide the 6"),
    ({"data": 2, "fsdp": 2, "context": 1, "tensor": 1}, 8, "needs 4 devices, have 8"),
    ({"data": 1, "fsdp": 1, "context": 0, "tensor": 1}, 1, "sizes must be positive"),
])
def test_mesh_shape_errors(cfg, n, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.mesh_shape(cfg, n)


def test_make_mesh_on_this_host():
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "context": 1, "tensor": 1})
  assert mesh.axis_names == mesh_lib.AXES
  assert mesh.devices.size == jax.device_count() and mesh.shape["data"] == jax.device_count()
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


class FakeDevice:
  def __init__(self, process_index):
    self.process_index = process_index


def _grid(shape, devices_per_process):
  n = int(np.prod(shape))
  grid = np.empty(n, object)
  grid[:] = [FakeDevice(i // devices_per_process) for i in range(n)]
  return grid.reshape(shape)


@pytest.mark.parametrize("shape, per_process, want", [
    ((1, 1, 1, 1), 1, [(0, 1)]),
    ((4, 2, 1, 1), 4, [(0, 2), (1, 2)]),  # plain data parallel: one part per process
    # data=2 x context=4 over 8 processes of 1 device: the 4 hosts of a context group
    # hold one sequence between them and must read the same rows.
    ((2, 1, 4, 1), 1, [(0, 2)] * 4 + [(1, 2)] * 4),
    ((1, 2, 2, 2), 2, [(0, 2), (0, 2), (1, 2), (1, 2)]),
])
def test_process_batch_shard(shape, per_process, want):
  grid = _grid(shape, per_process)
  processes = sorted({d.process_index for d in grid.reshape(-1)})
  assert [mesh_lib.process_batch_shard(grid, p) for p in processes] == want


def test_process_batch_shard_refuses_uneven_processes():
  grid = _grid((2, 1, 3, 1), 4)  # process 0 covers rows 0 and 1, process 1 only row 1
  with pytest.raises(ValueError, match="unequal or overlapping batch rows"):
    mesh_lib.process_batch_shard(grid, 0)


class _Mesh:  # what `sharding.spec` reads of a mesh
  def __init__(self, **shape):
    self.shape = shape


@pytest.mark.parametrize("shape, names, mesh, want", [
    ((3072, 12288), ("embed", "mlp"), dict(data=4, fsdp=16, context=4, tensor=1),
     P(("fsdp", "context"), None)),
    ((42, 3072, 3072), ("layers", "embed", "heads"), dict(fsdp=2, context=2, tensor=4),
     P(None, ("fsdp", "context"), "tensor")),
    ((64, 64), ("embed", "heads"), dict(fsdp=8, context=16, tensor=1),
     P("fsdp", None)),  # 8 x 16 does not divide 64: the leading run that does
    ((4, 16), ("heads", "kv"), dict(tensor=8), P(None, None)),  # 4 heads over 8: replicated
    ((2, 82, 64), ("act_batch", "act_length", "act_embed"), dict(data=1, fsdp=2, context=2),
     P("fsdp", "context", None)),  # size-1 axes left out
    ((8, 82, 64), ("act_batch", "act_length", "act_embed"), dict(data=2, fsdp=2, context=2),
     P(("data", "fsdp"), "context", None)),
    ((1, 84, 64), ("act_batch", "act_length", None), dict(data=2, fsdp=1, context=4),
     P(None, "context", None)),  # batch 1 on data=2: replicated
])
def test_logical_spec(shape, names, mesh, want):
  assert sharding.spec(shape, names, _Mesh(**mesh)) == want


def test_logical_spec_errors():
  with pytest.raises(KeyError, match="'embd' is not in ttt_jax.parallel.sharding.RULES"):
    sharding.spec((4,), ("embd",), _Mesh(fsdp=2))
  with pytest.raises(ValueError, match=r"logical names \('embed',\) do not match shape \(4, 4\)"):
    sharding.spec((4, 4), ("embed",), _Mesh(fsdp=2))


def test_no_spec_uses_a_mesh_axis_twice():
  """Weight and activation names are apart, so every spec the model makes is valid on a mesh
  with all four axes in use."""
  mesh = _Mesh(data=2, fsdp=2, context=2, tensor=2)
  specs = [sharding.spec(var.shape, var.get_metadata()["out_sharding"], mesh)
           for _, var in nnx.to_flat_state(nnx.state(build_model(small_config()), nnx.Param))]
  specs += [sharding.spec((4, 8, 4, 16), ("act_batch", "act_length", "act_heads", "act_kv"), mesh),
            sharding.spec((4, 8, 64), ("act_batch", "act_length", "act_embed"), mesh)]
  for spec in specs:
    axes = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
    assert len(axes) == len(set(axes)), spec
  assert any("tensor" in str(s) for s in specs) and any("context" in str(s) for s in specs)


def test_every_parameter_has_logical_names():
  """No parameter is left to a default rule: all carry names, the block stack 'layers' first."""
  cfg = small_config()
  model = build_model(cfg)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names and len(names) == var.ndim, (path, names)
    assert all(n is None or n in dict(sharding.RULES) for n in names), (path, names)
    assert (names[0] == "layers") == (path[0] == "blocks"), (path, names)


def test_constrain_is_identity_without_a_mesh():
  x = jnp.ones((2, 8, 4))
  assert sharding.constrain(x, "act_batch", "act_length", "act_embed") is x
