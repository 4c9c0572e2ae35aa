"""CogVideoX's training objective and classifier-free-guidance text dropout.

CogVideoX converts the v prediction to an x0 prediction and weights the x0
error by w_t = 1 / (1 - abar_t) = 1 / sigma_t^2. Since
x0_pred - x0 = -sigma_t (v_pred - v), this is exactly the unweighted MSE on v;
it is kept in the x0 form to match the reference objective term for term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ttt_jax.diffusion.schedule import NoiseSchedule

Array = jax.Array


def v_prediction_loss(
    v_pred: Array,
    x0: Array,
    noise: Array,
    t: Array,
    schedule: NoiseSchedule,
    mask: Array | None = None,
) -> Array:
  """Per-example loss [B]: mean over non-batch axes of w_t (x0_pred - x0)^2.

  v_pred, x0, noise: [B, ...]; t: int [B]. mask, broadcastable to x0, is 1
  where an element counts; the mean is over counted elements only (an
  example with nothing counted gets 0). Computed in float32.
  """
  v_pred, x0, noise = (a.astype(jnp.float32) for a in (v_pred, x0, noise))
  x_t = schedule.add_noise(x0, noise, t)
  x0_pred = schedule.x0_from_v(x_t, v_pred, t)
  _, sigma = schedule.alpha_sigma(t, x0.ndim)  # [B, 1, ...]
  err = jnp.square(x0_pred - x0) / jnp.square(sigma)  # [B, ...]
  axes = tuple(range(1, x0.ndim))
  if mask is None:
    return jnp.mean(err, axis=axes)
  mask = jnp.broadcast_to(mask, x0.shape).astype(jnp.float32)
  count = jnp.sum(mask, axis=axes)  # [B]
  total = jnp.sum(err * mask, axis=axes)  # [B]
  return jnp.where(count > 0, total / jnp.maximum(count, 1e-12), 0.0)


def sample_timesteps(rng: Array, batch: int, schedule: NoiseSchedule) -> Array:
  """Training timesteps, uniform over [0, num_steps): int32 [batch]."""
  return jax.random.randint(rng, (batch,), 0, schedule.num_steps, jnp.int32)


def drop_text(rng: Array, text_emb: Array, p: float, null_text: Array) -> Array:
  """Replaces each example's text embedding [B, L, D] by null_text [L, D] with probability p.

  null_text is the text encoder's encoding of "" (per segment), the null
  caption the sampler's unconditional branch uses too, so this teaches the
  model the unconditional prediction that classifier-free guidance needs (the
  public release configured it but never applied it). For a pretrained
  CogVideoX it must be T5(""), not zeros, to stay on its distribution.
  """
  batch = text_emb.shape[0]
  drop = jax.random.bernoulli(rng, p, (batch,))  # [B]
  drop = drop.reshape((batch,) + (1,) * (text_emb.ndim - 1))
  return jnp.where(drop, jnp.broadcast_to(null_text.astype(text_emb.dtype), text_emb.shape),
                   text_emb)
