"""AOT proof of fit: the `paper` preset's train step (or sampler step), compiled, never run.

    python benchmarks/paper_scale.py --seconds=63 --devices=256
    python benchmarks/paper_scale.py --seconds=63 --platform=tpu --topology=v5p:4x8x8
    python benchmarks/paper_scale.py --seconds=63 --devices=8 --mode=sample

Compiles CogVideoX-5B + TTT-MLP at 480x720 for a stage length with the
preset's mesh, abstract parameters, AdamW state and batch (ShapeDtypeStructs
carrying their shardings: nothing is allocated), for
  --platform=cpu  N fake CPU devices (it sets --xla_force_host_platform_device_count=N);
  --platform=tpu  a Cloud TPU topology (`jax.experimental.topologies`; needs libtpu,
                  `pip install "jax[tpu]"`, but no TPU): XLA:TPU's own buffer assignment,
                  with the splash attention and, with --ttt_impl=pallas_tpu, the fused
                  TTT kernels that the TPU run would use,
and prints one JSON line:

  stage_s, devices, mesh            what was compiled
  argument_bytes, output_bytes,     XLA's memory analysis of the compiled step,
  temp_bytes, peak_bytes_per_device per device (peak = arguments + outputs + temporaries
                                    - donated aliases)
  flops_per_step                    matmul FLOPs the step executes, summed over devices,
                                    counted on its jaxpr (`ttt_jax.flops.matmul_flops`:
                                    scan bodies x trip count, recomputation included)
  model_flops_per_step              the same without what remat recomputes (the step
                                    traced with remat_policy none; the MFU numerator)
  xla_cost_analysis_flops           XLA's `cost_analysis()` of the same executable, which
                                    counts every while-loop body ONCE (so it misses the
                                    block scan and the TTT scans; reported for reference)
  compile_s                         lower + compile seconds on this host

Argument sizes are exact. On CPU, temporaries are XLA:CPU's buffer
assignment, a guide only: it runs bf16 matmuls in fp32 (fp32 copies of
operands), and attention is the chunked XLA path and the inner loop the XLA
scan (Pallas kernels and splash do not lower for CPU). The TPU target is the
real compiler's answer. Kernels are chosen by `jax.default_backend()`; for
the TPU target this script answers "tpu" while it builds and lowers.
--mode=sample compiles one denoising call of the sampler (classifier-free
guidance: batch 2) on the preset's sample.mesh.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

_SECONDS = flags.DEFINE_integer("seconds", 63, "Stage length (3, 9, 18, 30, 63).")
_DEVICES = flags.DEFINE_integer("devices", 256, "Fake CPU devices to compile for (cpu).")
_PLATFORM = flags.DEFINE_enum("platform", "cpu", ["cpu", "tpu"], "Compile for fake CPU devices "
                              "or a TPU topology (AOT, no TPU needed).")
_TOPOLOGY = flags.DEFINE_string("topology", "v5p:4x8x8", "TPU topology (tpu): v5p:4x8x8 is "
                                "256 chips (v5p-512).")
_TTT_IMPL = flags.DEFINE_string("ttt_impl", None, "Override model.ttt.impl (tpu: pallas_tpu).")
_VARIANT = flags.DEFINE_string("variant", None, "Override model.variant (e.g. tiny: a smoke run).")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample"], "Train step or sampler call.")
_MESH = flags.DEFINE_string("mesh", None, "Override the mesh: data,fsdp,context,tensor "
                            "(-1 = the rest), e.g. 4,16,4,1.")
_BATCH = flags.DEFINE_integer("batch", None, "Override train.batch_size.")
_MICRO = flags.DEFINE_integer("microbatches", None, "Override train.microbatches.")
_REMAT_GROUP = flags.DEFINE_integer("remat_group", None, "Override model.ttt.remat_group.")


def _fake_devices(n: int) -> None:
  """Sets the fake CPU device count before the backend starts (or checks it was set)."""
  flag = f"--xla_force_host_platform_device_count={n}"
  xla = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in xla and flag not in xla:
    sys.exit(f"XLA_FLAGS={xla!r} asks for another device count than --devices={n}")
  os.environ["XLA_FLAGS"] = f"{xla} {flag}".strip()
  os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv):
  del argv
  if _PLATFORM.value == "cpu":
    _fake_devices(_DEVICES.value)
  import json
  import time

  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec as P

  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import common
  from ttt_jax import optim, preflight, train
  from ttt_jax.data import pipeline
  from ttt_jax.flops import matmul_flops as jaxpr_matmul_flops
  from ttt_jax.layers import attention
  from ttt_jax.models import dit, vae
  from ttt_jax.parallel import mesh as mesh_lib
  from ttt_jax.parallel import sharding

  if _PLATFORM.value == "tpu":
    from jax.experimental import topologies
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM metadata here
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other JAX processes may hold it
    devices = topologies.get_topology_desc(platform="tpu",
                                           topology_name=_TOPOLOGY.value).devices
    jax.default_backend = lambda: "tpu"  # the kernels the TPU run would pick (see docstring)
  else:
    devices = jax.devices()
    assert len(devices) == _DEVICES.value, devices
  config = common.get_config(_SECONDS.value, "paper")
  with config.unlocked():
    if _MESH.value:
      config.mesh.update(dict(zip(mesh_lib.AXES, (int(n) for n in _MESH.value.split(",")))))
    if _BATCH.value:
      config.train.batch_size = _BATCH.value
    if _MICRO.value:
      config.train.microbatches = _MICRO.value
    if _REMAT_GROUP.value:
      config.model.ttt.remat_group = _REMAT_GROUP.value
    if _TTT_IMPL.value:
      config.model.ttt.impl = _TTT_IMPL.value
    if _VARIANT.value:
      config.model.variant = _VARIANT.value
  training = _MODE.value == "train"
  _, problems = preflight.mesh_problems(config, _MODE.value, len(devices))
  if problems:  # the same checks the real run makes, before minutes of compiling
    raise SystemExit("paper_scale: " + "; ".join(problems))
  mesh_key, mesh_cfg = preflight.mesh_config(config, _MODE.value)
  mesh = mesh_lib.make_mesh(mesh_cfg, devices)
  codec = vae.CODECS[config.data.codec]  # the class: its factors, no weights
  model_cfg = config.model
  layout = pipeline.video_layout(config.data, config.seconds, codec,
                                 dit.VARIANTS[model_cfg.variant].get("patch_size", 2))
  latent_shape = (layout.num_frames, config.data.height // codec.spatial_factor,
                  config.data.width // codec.spatial_factor, 16)

  replicated = NamedSharding(mesh, P())
  batch = config.train.batch_size if training else 2
  rows = mesh_lib.batch_sharding(mesh) if training else replicated
  sds = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=s)
  latents = sds((batch, *latent_shape), jnp.float32, rows)
  text = sds((batch, layout.num_text, config.data.text_dim), jnp.float32, rows)
  null = sds((layout.num_text, config.data.text_dim), jnp.float32, replicated)
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)

  def program(model_cfg):
    """(jitted step, abstract arguments) of `model_cfg`: the train step or a sampler call."""
    def create():
      model = dit.build(model_cfg, text_dim=config.data.text_dim, rngs=nnx.Rngs(0))
      if not training:
        return model
      return model, nnx.Optimizer(model, optim.make_optimizer(config.optim), wrt=nnx.Param)

    graphdef, abstract = nnx.split(nnx.eval_shape(create))
    state_shardings = sharding.shardings(abstract, mesh)
    abstract = jax.tree.map(
        lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s))
        if hasattr(v, "shape") else v, abstract, state_shardings,
        is_leaf=lambda x: isinstance(x, nnx.Variable))
    if not training:
      t = sds((batch,), jnp.int32, replicated)
      denoise = lambda params, x, t, cond: nnx.merge(graphdef, params)(x, cond, t, layout)
      return jax.jit(denoise), (abstract, latents, t, text)

    step = train.pure_step(config, layout, graphdef)
    return (jax.jit(step, donate_argnums=(0,), out_shardings=(state_shardings, None)),
            (abstract, {"latents": latents, "text": text}, key, null))

  fn, args = program(model_cfg)
  # Model FLOPs leave out what remat recomputes: the same step without it, traced only.
  bare = model_cfg.copy_and_resolve_references()
  with bare.unlocked():
    bare.remat_policy, bare.ttt.remat_group = "none", None
  bare_program = program(bare) if training else None  # outside set_mesh: see init_sharded
  with jax.set_mesh(mesh):
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - start
    flops = jaxpr_matmul_flops(fn, *args)
    model_flops = jaxpr_matmul_flops(bare_program[0], *bare_program[1]) if training else flops
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  print(json.dumps({
      "stage_s": config.seconds, "mode": _MODE.value, "platform": _PLATFORM.value,
      "device_kind": devices[0].device_kind, "devices": len(devices),
      "mesh": dict(mesh.shape), "mesh_key": mesh_key, "batch": batch,
      "microbatches": config.train.microbatches if training else 1,
      "tokens_per_video": layout.seq_len,
      "argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
      "temp_bytes": mem.temp_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
      "peak_bytes_per_device": peak, "peak_gib_per_device": round(peak / 2**30, 2),
      "flops_per_step": flops, "model_flops_per_step": model_flops,
      "xla_cost_analysis_flops": float(cost.get("flops", float("nan"))) if cost else None,
      "compile_s": round(compile_s, 1),
      "remat_policy": model_cfg.remat_policy, "ttt_remat_group": model_cfg.ttt.remat_group,
      "attention_impl": attention.resolve_impl(model_cfg.attention_impl, model_cfg.dtype, 64,
                                               layout.attention_windows.index.shape[1]),
      "ttt_impl": model_cfg.ttt.impl,
  }))


if __name__ == "__main__":
  app.run(main)
