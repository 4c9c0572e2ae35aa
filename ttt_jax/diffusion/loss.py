"""CogVideoX's training objective, its timestep distributions and classifier-free-guidance
text dropout.

CogVideoX converts the v prediction to an x0 prediction and weights the x0
error by w_t = 1 / (1 - abar_t) = 1 / sigma_t^2. Since
x0_pred - x0 = -sigma_t (v_pred - v), this is exactly the unweighted MSE on v;
it is kept in the x0 form to match the reference objective term for term.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special
import scipy.stats

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


TIMESTEP_KINDS = ("uniform", "logit_normal", "shifted")


@dataclasses.dataclass(frozen=True)
class TimestepDistribution:
  """Where training draws its diffusion timesteps t in [0, num_steps), as u = t / num_steps.

  uniform       u ~ U[0, 1) (CogVideoX's recipe);
  logit_normal  u = sigmoid(loc + scale z), z ~ N(0, 1) (SD3's; loc > 0 leans to high noise);
  shifted       u = shift v / (1 + (shift - 1) v), v ~ U[0, 1) (SD3's and Wan's shift;
                shift > 1 leans to high noise).
  t = floor(u num_steps). High noise is where a caption (or a memory of one) decides what the
  frames show: below it the noisy frames give their content away.
  """
  kind: str = "uniform"
  loc: float = 0.0
  scale: float = 1.0
  shift: float = 1.0

  def __post_init__(self):
    if self.kind not in TIMESTEP_KINDS:
      raise ValueError(f"diffusion.timesteps.kind={self.kind!r} is unknown; choose from "
                       f"{TIMESTEP_KINDS}")
    if self.scale <= 0 or self.shift <= 0:
      raise ValueError(f"diffusion.timesteps needs scale > 0 and shift > 0, got scale="
                       f"{self.scale}, shift={self.shift}")

  def sample(self, rng: Array, batch: int, num_steps: int) -> Array:
    """int32 [batch] timesteps."""
    if self.kind == "uniform":
      return jax.random.randint(rng, (batch,), 0, num_steps, jnp.int32)
    if self.kind == "logit_normal":
      u = jax.nn.sigmoid(self.loc + self.scale * jax.random.normal(rng, (batch,)))
    else:
      v = jax.random.uniform(rng, (batch,))
      u = self.shift * v / (1.0 + (self.shift - 1.0) * v)
    return jnp.clip(jnp.floor(u * num_steps), 0, num_steps - 1).astype(jnp.int32)

  def cdf(self, u: np.ndarray) -> np.ndarray:
    """P(t / num_steps < u) for u in [0, 1], float64."""
    u = np.clip(np.asarray(u, np.float64), 0.0, 1.0)
    if self.kind == "uniform":
      return u
    if self.kind == "logit_normal":
      with np.errstate(divide="ignore"):
        return scipy.stats.norm.cdf((scipy.special.logit(u) - self.loc) / self.scale)
    return u / (self.shift - (self.shift - 1.0) * u)  # the shift's inverse map

  def probabilities(self, num_steps: int) -> np.ndarray:
    """[num_steps] float64: P(t = k), summing to 1 (t = num_steps - 1 takes u's top edge)."""
    p = np.diff(self.cdf(np.arange(num_steps + 1) / num_steps))
    return p / p.sum()


def sample_timesteps(rng: Array, batch: int, schedule: NoiseSchedule,
                     distribution: TimestepDistribution = TimestepDistribution()) -> Array:
  """Training timesteps from `distribution` (uniform by default): int32 [batch]."""
  return distribution.sample(rng, batch, schedule.num_steps)


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
