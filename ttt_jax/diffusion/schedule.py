"""CogVideoX's noise schedule, rescaled to zero terminal SNR.

The forward process is x_t = alpha_t x0 + sigma_t eps with alpha_t =
sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and abar_t = prod_{s<=t} (1 - beta_s).
CogVideoX uses the DDPM "scaled_linear" betas (linear in sqrt(beta)) and, as
Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are
Flawed", Algorithm 1) recommend, shifts and scales sqrt(abar) so that the
last step is pure noise (alpha_999 = 0 exactly) while the first is unchanged.
Without the rescale the model never sees pure noise in training but starts
from it at sampling (the unrescaled alpha_999 is ~0.068).

The model predicts v = alpha_t eps - sigma_t x0, so that
  x0  = alpha_t x_t - sigma_t v,
  eps = sigma_t x_t + alpha_t v,
both well defined at every t, including alpha_t = 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """Cumulative signal fractions abar_t for t = 0..num_steps-1.

  A pytree, so it can be passed straight into jitted functions.
  """

  alphas_cumprod: Array  # [num_steps] float32

  @classmethod
  def create(
      cls,
      num_steps: int = 1000,
      beta_start: float = 0.00085,
      beta_end: float = 0.012,
      zero_snr: bool = True,
  ) -> NoiseSchedule:
    """Scaled-linear betas, optionally rescaled to zero terminal SNR.

    Built in float64 and rounded once to float32, so abar_0 is 1 - beta_start
    to fp32 precision and (with zero_snr) abar_{T-1} is exactly 0.
    """
    betas = np.linspace(np.sqrt(beta_start), np.sqrt(beta_end), num_steps,
                        dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    if zero_snr:
      sqrt_abar = np.sqrt(abar)
      first, last = sqrt_abar[0], sqrt_abar[-1]
      # Affine map of sqrt(abar): last -> 0, first -> first.
      sqrt_abar = (sqrt_abar - last) * (first / (first - last))
      abar = sqrt_abar ** 2
    return cls(alphas_cumprod=jnp.asarray(abar, dtype=jnp.float32))

  @property
  def num_steps(self) -> int:
    return self.alphas_cumprod.shape[0]

  def alpha_sigma(self, t: Array, ndim: int = 1) -> tuple[Array, Array]:
    """(alpha_t, sigma_t) for int timesteps t [B], shaped [B, 1, ..., 1].

    ndim is the rank of the data x [B, ...] the factors will multiply.
    """
    t = jnp.asarray(t)
    abar = self.alphas_cumprod[t]  # [B]
    shape = t.shape + (1,) * (ndim - t.ndim)
    alpha = jnp.sqrt(abar).reshape(shape)
    sigma = jnp.sqrt(1.0 - abar).reshape(shape)
    return alpha, sigma

  def add_noise(self, x0: Array, noise: Array, t: Array) -> Array:
    """x_t = alpha_t x0 + sigma_t eps."""
    alpha, sigma = self.alpha_sigma(t, x0.ndim)
    return (alpha * x0 + sigma * noise).astype(x0.dtype)

  def v_target(self, x0: Array, noise: Array, t: Array) -> Array:
    """v = alpha_t eps - sigma_t x0, the model's regression target."""
    alpha, sigma = self.alpha_sigma(t, x0.ndim)
    return (alpha * noise - sigma * x0).astype(x0.dtype)

  def x0_from_v(self, x_t: Array, v: Array, t: Array) -> Array:
    """x0 = alpha_t x_t - sigma_t v."""
    alpha, sigma = self.alpha_sigma(t, x_t.ndim)
    return (alpha * x_t - sigma * v).astype(x_t.dtype)

  def eps_from_v(self, x_t: Array, v: Array, t: Array) -> Array:
    """eps = sigma_t x_t + alpha_t v."""
    alpha, sigma = self.alpha_sigma(t, x_t.ndim)
    return (sigma * x_t + alpha * v).astype(x_t.dtype)
