"""Fused Pallas kernels for the TTT inner loop.

`pallas_kernels.tpu` holds Mosaic (TPU) kernels, `pallas_kernels.gpu` Triton
(NVIDIA GPU) kernels; `pallas_kernels.common` what they share. Each kernel
is a drop-in replacement for a pure-JAX op in `ttt_jax.ops` with the same
signature, semantics and output dtypes, and is tested against that op in
Pallas interpret mode (which runs on CPU). `ttt_jax.ops.inner_loop(kind,
impl, ...)` selects between the ops (impl="xla") and these kernels
(impl="pallas_tpu" / "pallas_gpu", or "pallas" for the default backend's).
"""
