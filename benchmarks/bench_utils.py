"""Shared pieces of the benchmark scripts: inputs, FLOP counts, timing and memory."""

from __future__ import annotations

import json
import pathlib
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.extend
import jax.numpy as jnp

Array = jax.Array
MIB = 2.0**20


def step_flops(op: str, K: int, d: int, F: int) -> int:
  """Matmul FLOPs of one mini-batch step of one (batch, head), as implemented."""
  if op == "ttt_linear":
    # [K,d]x[d,d] class: xk W, xk^T eg (the update), xq W_b (the read-out).
    return 2 * 3 * K * d * d
  # [K,d]x[d,F] class: xk W1, x2 W2, e2 W2^T, xk^T e1, x2^T e2, xq W1_b, x2_bar W2_b.
  return 2 * 7 * K * d * F


def make_inputs(op: str, B: int, H: int, NC: int, K: int, d: int) -> tuple[Array, ...]:
  """Op arguments (q, k, v, eta, ln_weight, ln_bias, *fast weights), fp32."""
  ks = jax.random.split(jax.random.key(0), 7)
  shape = (B, H, NC, K, d)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  tokens = (unit(jax.random.normal(ks[0], shape)), unit(jax.random.normal(ks[1], shape)),
            jax.random.normal(ks[2], shape), jax.random.uniform(ks[3], shape[:-1]) / d)
  ln = (jnp.ones((H, d)), jnp.zeros((H, d)))
  if op == "ttt_linear":
    weights = (0.02 * jax.random.normal(ks[4], (H, d, d)), jnp.zeros((H, 1, d)))
  else:
    F = 4 * d
    weights = (0.02 * jax.random.normal(ks[4], (H, d, F)), jnp.zeros((H, 1, F)),
               0.02 * jax.random.normal(ks[5], (H, F, d)), jnp.zeros((H, 1, d)))
  return (*tokens, *ln, *weights)


def median_seconds(compiled: Any, args: Sequence[Array], repeats: int) -> float:
  """Median wall time of a compiled function over `repeats` calls, after one warm-up."""
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def measure(fn: Callable[..., Any], args: Sequence[Array], repeats: int
            ) -> tuple[float, float, dict[str, float | None]]:
  """(median seconds, compile seconds, memory in MiB) of jit(fn)(*args)."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  seconds = median_seconds(compiled, args, repeats)
  analysis = compiled.memory_analysis()
  stats = jax.devices()[0].memory_stats()
  memory = {
      name: None if analysis is None else getattr(analysis, f"{name}_size_in_bytes") / MIB
      for name in ("temp", "argument", "output")}
  memory["peak_in_use"] = None if stats is None else stats["peak_bytes_in_use"] / MIB
  return seconds, compile_s, memory


def fwd_and_bwd(fwd: Callable[..., Array], args: Sequence[Array], *, B: int, H: int,
                seq_len: int, minibatch_flops: int, repeats: int) -> dict[str, Any]:
  """Times fwd(*args) and its full gradient; the timing part of a results row.

  fwd+bwd is jax.grad of sum(out * cotangent) w.r.t. every argument; the
  FLOP count is the analytic forward one (B * H streams of seq_len / K steps).
  """
  NC = args[0].shape[2]
  cotangent = jax.random.normal(jax.random.key(1), args[0].shape)
  loss = lambda *a: jnp.sum(fwd(*a[:-1]).astype(jnp.float32) * a[-1])
  grads = jax.grad(loss, argnums=tuple(range(len(args))))
  fwd_s, fwd_compile, fwd_mem = measure(fwd, args, repeats)
  bwd_s, bwd_compile, bwd_mem = measure(grads, (*args, cotangent), repeats)
  flops = B * H * NC * minibatch_flops
  return {
      "fwd": {"seconds": fwd_s, "tokens_per_s": B * seq_len / fwd_s,
              "head_tokens_per_s": B * H * seq_len / fwd_s,
              "flops_per_minibatch": minibatch_flops,
              "flops": flops, "flops_per_s": flops / fwd_s},
      "fwd_bwd": {"seconds": bwd_s, "tokens_per_s": B * seq_len / bwd_s,
                  "head_tokens_per_s": B * H * seq_len / bwd_s},
      "compile_s": {"fwd": fwd_compile, "fwd_bwd": bwd_compile},
      "memory_mib": {"fwd": fwd_mem, "fwd_bwd": bwd_mem},
  }


def emit(config: dict[str, Any], results: list[dict[str, Any]], out: str | None) -> None:
  """Prints the one JSON document of a run (device, versions, config, rows); also to `out`."""
  device = jax.devices()[0]
  doc = json.dumps({"device": str(device), "platform": device.platform,
                    "device_kind": device.device_kind, "jax_version": jax.__version__,
                    "config": config, "results": results}, indent=1)
  print(doc)
  if out:
    pathlib.Path(out).write_text(doc + "\n")
