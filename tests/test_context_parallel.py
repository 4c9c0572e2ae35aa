"""Context parallelism and the 4-axis mesh on 8 fake CPU devices (one subprocess each).

  (i)  the TTT layer and local attention, head-sharded between all-to-alls
       ("Ulysses over heads"), equal one device in values and gradients;
       their compiled HLO has all-to-alls, never all-gathers a sequence, and
       runs no collective inside a while loop (the TTT scan);
  (ii) two tiny train steps on a (fsdp=2, context=4) mesh, the sequence
       padded to a multiple of 4, equal two steps on one device, with every
       parameter and AdamW moment sharded by the logical rules; in the step's
       HLO no collective sits inside a loop nested in the scan over blocks,
       and no all-gather has a sequence-by-width operand; its checkpoint
       restores exactly into another mesh's shardings.
Tolerance 1e-5: float32 sums reduced in another order across shards
(rounding ~1e-7 relative), amplified at most by AdamW's g / (sqrt(v) + eps)
at learning rate 1e-4.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_on_8_devices(script: str) -> dict:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-6000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
  return json.loads(line[len("RESULT "):])


_LAYERS = """
    import functools, json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from tests.hlo import collectives, collectives_in_while_bodies, computations
    from ttt_jax.layers.attention import LocalSelfAttention
    from ttt_jax.layers.ttt import BidirectionalTTT
    from ttt_jax.layout import VideoLayout
    from ttt_jax.parallel import mesh as mesh_lib, sharding

    assert jax.device_count() == 8
    D, H = 128, 8
    layout = VideoLayout((3, 2), (3, 2), 2, 3).padded(4)  # 35 tokens + 1 pad
    L = layout.seq_len
    x = jax.random.normal(jax.random.key(0), (2, L, D))
    cot = jax.random.normal(jax.random.key(1), (2, L, D))
    layers = {
        "ttt": BidirectionalTTT(D, H, inner="mlp", mini_batch_size=8, base_lr=5.0,
                                rngs=nnx.Rngs(0)),
        # The fused TPU kernel (interpreted here), a custom call GSPMD cannot partition,
        # runs on each device's heads inside the shard_map.
        "ttt_pallas": BidirectionalTTT(D, H, inner="mlp", mini_batch_size=8, base_lr=5.0,
                                       impl="pallas_tpu", pallas_interpret=True,
                                       rngs=nnx.Rngs(0)),
        "attention": LocalSelfAttention(D, H, impl="xla", rngs=nnx.Rngs(1)),
    }
    res, wants = {}, {}
    for name, layer in layers.items():
      graph, params = nnx.split(layer)
      loss = lambda p, x: jnp.sum(nnx.merge(graph, p)(x, layout) * cot)
      grad = jax.value_and_grad(loss, argnums=(0, 1))
      # The kernel (same parameters) against the XLA scan on one device.
      want = wants[name] = wants["ttt"] if name == "ttt_pallas" else jax.jit(grad)(params, x)
      for mesh_cfg in ({"data": 2, "fsdp": 1, "context": 4, "tensor": 1},
                       {"data": 1, "fsdp": 1, "context": 4, "tensor": 2}
                       )[:1 if name == "ttt_pallas" else 2]:
        mesh = mesh_lib.make_mesh(mesh_cfg)
        with jax.set_mesh(mesh):
          p_shard = sharding.shardings(params, mesh)
          x_shard = NamedSharding(mesh, sharding.spec(x.shape, ("act_batch", "act_length",
                                                               "act_embed"), mesh))
          step = jax.jit(grad, out_shardings=(None, (p_shard, x_shard)))
          args = (jax.device_put(params, p_shard), jax.device_put(x, x_shard))
          got = step(*args)
          hlo = step.lower(*args).compile().as_text()
        # Per output: max error relative to the output's largest magnitude (at least 1).
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   / max(1.0, float(np.max(np.abs(np.asarray(b)))))
                   for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
        ops = [op for lines in computations(hlo).values() for op in collectives(lines)]
        res[f"{name} {mesh_cfg['data']}x{mesh_cfg['context']}x{mesh_cfg['tensor']}"] = dict(
            diff=diff,
            all_to_all=sum(k == "all-to-all" for k, _ in ops),
            sequence_gathers=[s for k, shapes in ops if k == "all-gather" for s in shapes
                              if L in s or L // 4 in s],
            in_loops=collectives_in_while_bodies(hlo))
    print("RESULT", json.dumps(res))
"""


@pytest.mark.slow  # ~2-3 min on 2 cores: sharded compiles of small layers, a kernel interpreted
def test_ttt_and_attention_head_sharded_equal_one_device():
  res = run_on_8_devices(_LAYERS)
  assert len(res) == 5
  for name, r in res.items():
    assert r["diff"] < 1e-5, (name, r["diff"])
    assert r["all_to_all"] >= 2, name  # into and out of head sharding (fwd and bwd)
    assert r["sequence_gathers"] == [], name  # the sequence is never gathered
    assert r["in_loops"] == [], name  # nothing crosses devices inside the TTT scan


_TRAIN = """
    import functools, json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from tests.conftest import perturb, small_config
    from tests.hlo import collectives, collectives_in_while_bodies, computations
    from ttt_jax import optim, train
    from ttt_jax.data import pipeline
    from ttt_jax.diffusion import NoiseSchedule, TimestepDistribution
    from ttt_jax.models import dit
    from ttt_jax.models.vae import make_codec
    from ttt_jax.parallel import mesh as mesh_lib, sharding

    assert jax.device_count() == 8
    cfg = small_config()
    cfg.optim.lr.update(dict(other=1e-4, attn_qkvo=1e-4, ttt=1e-4))
    layout = pipeline.video_layout(cfg.data, 3, make_codec("toy"), 2)  # 82 tokens: padded to 84
    D = 128  # wider than the 64 patch features, so a gathered [L, D] is recognisable
    rng = np.random.default_rng(0)
    batch = {"latents": rng.normal(size=(2, 13, 4, 6, 16)).astype(np.float32),
             "text": rng.normal(size=(2, 4, cfg.data.text_dim)).astype(np.float32)}
    null = np.zeros(batch["text"].shape[1:], np.float32)

    def create():
      model = dit.VideoDiT.from_config(
          "tiny", width=D, text_dim=cfg.data.text_dim, ttt=dict(cfg.model.ttt),
          rngs=nnx.Rngs(0))
      return model, nnx.Optimizer(model, optim.make_optimizer(cfg.optim), wrt=nnx.Param)

    step = functools.partial(train.train_step, optim_cfg=cfg.optim.to_dict(), layout=layout,
                             schedule=NoiseSchedule.create(num_steps=1000),
                             timesteps=TimestepDistribution(), text_dropout=0.5)

    def run(model, optimizer, batch):
      jitted = nnx.jit(step)
      losses = [float(jitted(model, optimizer, batch, jax.random.key(i), null)["loss"])
                for i in range(2)]
      return losses, nnx.to_pure_dict(nnx.state(model, nnx.Param)), jitted

    # Random weights: zero-initialised heads and gates too, so every parameter moves at once.
    def randomise(model):
      perturb(model, 0.05)

    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 2, "context": 4, "tensor": 1})
    model, optimizer = sharding.init_sharded(create, mesh)
    randomise(model)
    specs = {jax.tree_util.keystr(p): str(x.sharding.spec)
             for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}
    opt_specs = [str(x.sharding.spec) for x in jax.tree.leaves(nnx.state(optimizer))]
    with jax.set_mesh(mesh):
      global_batch = mesh_lib.global_batch(batch, mesh)
      sharded_losses, sharded, jitted = run(model, optimizer, global_batch)
      hlo = jitted.lower(model, optimizer, global_batch, jax.random.key(0), null
                         ).compile().as_text()
    out_specs = [str(x.sharding.spec) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]

    # Save on this mesh; restore straight into the shardings of another (a later stage
    # with another mesh): Orbax reads each device's shard, no device gets a whole array.
    import tempfile
    from ttt_jax import checkpoint
    workdir = tempfile.mkdtemp()
    ckpt = checkpoint.Checkpointer(workdir)
    ckpt.save(2, model, optimizer, jax.random.key(0), {})
    ckpt.close()
    other = mesh_lib.make_mesh({"data": 2, "fsdp": 4, "context": 1, "tensor": 1})
    model2, optimizer2 = sharding.init_sharded(create, other)
    checkpoint.Checkpointer(workdir).restore(model2, optimizer2)
    restored = nnx.to_pure_dict(nnx.state(model2, nnx.Param))
    reshard_diff = max(jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), restored, sharded)))
    reshard_spec = str(model2.blocks.attn.to_q.kernel[...].sharding.spec)

    model, optimizer = create()
    randomise(model)
    single_losses, single, _ = run(model, optimizer, batch)
    diffs = jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), sharded, single))
    fresh = create()[0]
    randomise(fresh)
    moved = jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), single,
        nnx.to_pure_dict(nnx.state(fresh, nnx.Param))))
    ops = [op for lines in computations(hlo).values() for op in collectives(lines)]
    L = {layout.seq_len, layout.seq_len + 2, layout.num_video}
    print("RESULT", json.dumps(dict(
        specs=specs, opt_specs=opt_specs, out_specs=out_specs,
        batch_spec=str(global_batch["latents"].sharding.spec),
        sharded_losses=sharded_losses, single_losses=single_losses,
        max_param_diff=max(diffs), min_param_move=min(moved),
        reshard_diff=reshard_diff, reshard_spec=reshard_spec,
        all_to_all=sum(k == "all-to-all" for k, _ in ops),
        sequence_gathers=[s for k, shapes in ops if k == "all-gather" for s in shapes
                          if D in s and (set(s) & L or any(n * 4 in L for n in s))],
        in_inner_loops=collectives_in_while_bodies(hlo, min_depth=2))))
"""


@pytest.mark.slow  # ~2-3 min on 2 cores: cold compiles of the sharded and the single step
def test_context_parallel_train_step_matches_single_device():
  res = run_on_8_devices(_TRAIN)
  specs = res["specs"]
  # Logical rules, not a size heuristic: the block stack axis is never split; the model
  # width is over (fsdp, context); the TTT fast weights (heads first) are whole per head.
  assert specs["['blocks']['attn']['to_q']['kernel'].value"] == "P(None, ('fsdp', 'context'), None)"
  assert specs["['blocks']['ff_in']['kernel'].value"] == "P(None, ('fsdp', 'context'), None)"
  assert specs["['blocks']['ttt']['ttt']['W1'].value"] == "P(None, None, None, None)"
  assert specs["['text_proj']['kernel'].value"] == "P(None, ('fsdp', 'context'))"
  sharded = [p for p, s in specs.items() if "fsdp" in s]
  assert sum("fsdp" in s for s in res["opt_specs"]) >= 2 * len(sharded)  # mu and nu
  assert sum("fsdp" in s for s in res["out_specs"]) == len(sharded)  # stays sharded
  assert res["batch_spec"] == "P(('data', 'fsdp'),)"

  assert res["min_param_move"] > 0  # every parameter took part in the two steps
  for got, want in zip(res["sharded_losses"], res["single_losses"]):
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
  assert res["max_param_diff"] < 1e-5, res["max_param_diff"]
  assert res["reshard_diff"] == 0.0 and res["reshard_spec"] == "P(None, 'fsdp', None)"

  assert res["all_to_all"] >= 4  # attention and TTT, forward and backward
  assert res["sequence_gathers"] == []
  assert res["in_inner_loops"] == []  # the TTT scans inside the block scan stay local
