"""The ('data', 'fsdp') mesh: sizes, errors, parameter specs, and a sharded train step."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from ttt_jax.parallel import mesh as mesh_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


class FakeDevice:
  def __init__(self, i):
    self.id = i

  def __repr__(self):
    return f"FakeDevice({self.id})"


def _fake(n):
  return [FakeDevice(i) for i in range(n)]


@pytest.mark.parametrize("cfg, n, shape", [
    ({"data": -1, "fsdp": 1}, 8, (8, 1)),
    ({"data": -1, "fsdp": 2}, 8, (4, 2)),
    ({"data": 2, "fsdp": -1}, 8, (2, 4)),
    ({"data": 2, "fsdp": 3}, 6, (2, 3)),
    ({"data": 1, "fsdp": -1}, 5, (1, 5)),
])
def test_make_mesh_sizes(cfg, n, shape):
  devices = _fake(n)
  mesh = mesh_lib.make_mesh(cfg, devices=devices)
  assert mesh.axis_names == ("data", "fsdp")
  assert tuple(mesh.shape.values()) == shape
  assert [d.id for d in mesh.devices.reshape(-1)] == list(range(n))  # row-major, none lost


def test_make_mesh_defaults_to_jax_devices():
  mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1})
  assert mesh.devices.size == jax.device_count()
  assert mesh.shape["data"] == jax.device_count()


@pytest.mark.parametrize("cfg, n, match", [
    ({"data": -1, "fsdp": -1}, 4, "at most one axis may be -1"),
    ({"data": -1, "fsdp": 2}, 3, "does not divide 3 devices"),
    ({"data": 2, "fsdp": 2}, 8, "needs 4 devices, have 8"),
    ({"data": 3, "fsdp": 1}, 2, "needs 3 devices, have 2"),
])
def test_make_mesh_errors(cfg, n, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.make_mesh(cfg, devices=_fake(n))


@pytest.mark.parametrize("shape, fsdp, spec", [
    ((64, 256), 1, P()),  # no fsdp: replicate
    ((64, 256), 4, P(None, "fsdp")),  # largest axis
    ((256, 64), 4, P("fsdp", None)),
    ((8, 8), 4, P("fsdp", None)),  # tie: the first
    ((12, 8), 8, P(None, "fsdp")),  # largest not divisible: next largest
    ((2, 42, 3072), 16, P(None, None, "fsdp")),  # scanned block params: never the depth axis here
    ((6, 3), 4, P()),  # nothing divisible: replicate
    ((), 2, P()),  # scalars (optimizer step count)
])
def test_param_spec(shape, fsdp, spec):
  assert mesh_lib.param_spec(shape, fsdp) == spec


_SHARDED_SCRIPT = textwrap.dedent("""
    import functools, json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from tests.conftest import build_model, perturb, small_config
    from ttt_jax import optim, train
    from ttt_jax.data import pipeline
    from ttt_jax.diffusion import NoiseSchedule
    from ttt_jax.models.vae import make_codec
    from ttt_jax.parallel import mesh as mesh_lib

    assert jax.device_count() == 4, jax.devices()
    cfg = small_config()
    cfg.optim.lr.update(dict(other=1e-4, attn_qkvo=1e-4, ttt=1e-4))
    layout = pipeline.video_layout(cfg.data, 3, make_codec("toy"), 2)
    rng = np.random.default_rng(0)
    batch = {"latents": rng.normal(size=(4, 13, 4, 6, 16)).astype(np.float32),
             "text": rng.normal(size=(4, 4, cfg.data.text_dim)).astype(np.float32)}

    def setup():  # random weights: every parameter, TTT included, gets a gradient at once
      model = perturb(build_model(cfg), 0.05)
      return model, nnx.Optimizer(model, optim.make_optimizer(cfg.optim), wrt=nnx.Param)

    step = nnx.jit(functools.partial(train.train_step, optim_cfg=cfg.optim.to_dict(),
                                     layout=layout, schedule=NoiseSchedule.create(num_steps=1000),
                                     text_dropout=0.5))

    def run(model, optimizer, batch):
      null = np.zeros(batch["text"].shape[1:], np.float32)  # the toy encoder's ""
      losses = [float(step(model, optimizer, batch, jax.random.key(i), null)["loss"])
                for i in range(2)]
      return losses, nnx.to_pure_dict(nnx.state(model, nnx.Param))

    # Sharded: data=2 x fsdp=2, exactly as train.train places state and batches.
    mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2})
    model, optimizer = setup()
    state = nnx.state((model, optimizer))
    nnx.update((model, optimizer), jax.device_put(state, mesh_lib.param_shardings(mesh, state)))
    specs = {jax.tree_util.keystr(p): str(x.sharding.spec)
             for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}
    opt_specs = [str(x.sharding.spec) for x in jax.tree.leaves(nnx.state(optimizer))]
    global_batch = mesh_lib.global_batch(batch, mesh)
    batch_spec = str(global_batch["latents"].sharding.spec)
    sharded_losses, sharded = run(model, optimizer, global_batch)
    out_specs = [str(x.sharding.spec) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]

    # Single device: the same two steps, nothing sharded.
    model, optimizer = setup()
    single_losses, single = run(model, optimizer, jax.device_put(batch, jax.devices()[0]))
    diffs = jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), sharded, single))
    moved = jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), single,
        nnx.to_pure_dict(nnx.state(setup()[0], nnx.Param))))
    print("RESULT", json.dumps(dict(
        specs=specs, opt_specs=opt_specs, out_specs=out_specs, batch_spec=batch_spec,
        sharded_losses=sharded_losses, single_losses=single_losses,
        max_param_diff=max(diffs), min_param_move=min(moved))))
""")


@pytest.mark.slow  # ~55-70 s on 2 busy cores: two cold compiles of the train step
def test_fsdp_data_parallel_train_step_matches_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=540, check=False)
  assert proc.returncode == 0, proc.stderr[-6000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
  res = json.loads(line[len("RESULT "):])

  # (i) FSDP really shards parameters and their AdamW moments; the batch is split over both axes.
  fsdp_params = [p for p, s in res["specs"].items() if "fsdp" in s]
  assert any("ttt" in p for p in fsdp_params) and any("attn" in p for p in fsdp_params)
  assert len(fsdp_params) >= len(res["specs"]) // 2, res["specs"]
  assert sum("fsdp" in s for s in res["opt_specs"]) >= 2 * len(fsdp_params)  # mu and nu
  assert sum("fsdp" in s for s in res["out_specs"]) == len(fsdp_params)  # stays sharded
  assert "data" in res["batch_spec"] and "fsdp" in res["batch_spec"]

  # (ii) Same numbers as one device. Tolerance 1e-5: float32 sums are reduced in another
  # order across shards (rounding ~1e-7 relative); lr 1e-4 bounds how far AdamW's
  # g / (sqrt(v) + eps) can amplify such rounding on near-zero gradients.
  assert res["min_param_move"] > 0  # every parameter took part in the two steps
  for got, want in zip(res["sharded_losses"], res["single_losses"]):
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
  assert res["max_param_diff"] < 1e-5, res["max_param_diff"]
