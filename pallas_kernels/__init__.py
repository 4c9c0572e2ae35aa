"""Fused Pallas kernels for the TTT inner loop.

`pallas_kernels.tpu` holds Mosaic (TPU) kernels. Each kernel is a drop-in
replacement for a pure-JAX op in `ttt_jax.ops` with the same signature,
semantics and output dtypes, and is tested against that op in Pallas
interpret mode (which runs on CPU). `ttt_jax.ops.ttt(kind, impl, ...)`
selects between the ops (impl="xla") and these kernels (impl="pallas").
"""
