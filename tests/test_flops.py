"""ttt_jax.flops: matmul FLOPs counted on the traced program."""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from ttt_jax.flops import matmul_flops as flops


def test_matmul_flops_counts_what_runs():
  """Scan bodies times their length, recomputation under remat, shard_map bodies per device,
  Pallas kernels per grid step; XLA's cost analysis counts a loop body once."""
  x, w = jnp.ones((8, 16)), jnp.ones((16, 16))
  one = 2 * 8 * 16 * 16
  scanned = lambda x, w: jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None,
                                      length=10)[0].sum()
  assert flops(lambda x, w: x @ w, x, w) == one
  assert flops(scanned, x, w) == 10 * one
  assert flops(jax.grad(scanned, argnums=(0, 1)), x, w) == 30 * one  # fwd, dx, dw
  assert flops(jax.grad(jax.checkpoint(scanned), argnums=(0, 1)), x, w) == 40 * one  # + recompute
  assert jax.jit(scanned).lower(x, w).compile().cost_analysis()["flops"] < 2 * one

  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] @ x_ref[...]
  y = jnp.ones((256, 128))
  call = lambda y: pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((256, 128), jnp.float32), grid=(2,),
      in_specs=[pl.BlockSpec((128, 128), lambda i: (i, 0))],
      out_specs=pl.BlockSpec((128, 128), lambda i: (i, 0)), interpret=True)(y)
  assert flops(call, y) == 2 * 2 * 128**3
