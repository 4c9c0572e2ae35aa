"""ttt-jax: Test-Time-Training layers for long video diffusion, in JAX."""

__version__ = "0.1.0"
