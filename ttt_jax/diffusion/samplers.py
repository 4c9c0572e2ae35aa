"""DDIM and DPM-Solver++(2M) (ODE and SDE) samplers for a v-prediction model.

Both walk "trailing" timesteps 999 > ... > 0 (Lin et al. 2024: with a
zero-terminal-SNR schedule sampling must start at the pure-noise step) and end
at abar = 1, so the last update returns the model's x0 prediction.

Zero terminal SNR makes alpha_999 = 0, hence lambda = log(alpha / sigma) =
-inf at the first step. The updates are therefore written with ratios,
  exp(-h) = exp(lambda_s - lambda_t) = (alpha_s sigma_t) / (sigma_s alpha_t),
which is exactly 0 there; the second-order correction needs
h / h_prev = (lambda_t - lambda_s) / (lambda_s - lambda_prev), whose limit is 0
when alpha_prev = 0, and is taken as such instead of computing inf / inf.

Classifier-free guidance runs the conditional and unconditional branches in
one denoise call on the batch [cond; uncond]. The loop is a jitted
`lax.fori_loop`, or with progress=True a Python loop over the same jitted
step under tqdm. The model's params, cond and uncond are arguments of that
jitted code, never closed over: closed-over arrays would be baked into the
program as constants (gigabytes at 5B).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from tqdm import tqdm

from ttt_jax.diffusion.schedule import NoiseSchedule

Array = jax.Array
Cond = Any  # an array or pytree of arrays with leading batch axis B
Denoise = Callable[[Any, Array, Array, Cond], Array]  # (params, x_t, t [B], cond) -> v


def timesteps(num_inference_steps: int, schedule: NoiseSchedule) -> Array:
  """Descending "trailing" timesteps: int32 [n], starting at T-1.

  t_i = round(T - i T / n) - 1, e.g. 999, 979, ..., 19 for T=1000, n=50.
  """
  num_train = schedule.num_steps
  if not 1 <= num_inference_steps <= num_train:
    raise ValueError(
        f"num_inference_steps must be in [1, {num_train}], "
        f"got {num_inference_steps}")
  i = jnp.arange(num_inference_steps, dtype=jnp.float32)
  ts = jnp.round(num_train - i * (num_train / num_inference_steps)) - 1
  return ts.astype(jnp.int32)


def dynamic_guidance_scale(
    step_index: Array | int, num_steps: int, guidance_scale: float
) -> Array:
  """CogVideoX's cosine guidance ramp: 1 + s at the first step, ~1 at the last.

  s_i = 1 + s (1 - cos(pi ((n - i) / n)^5)) / 2, with i the step index (not
  the timestep value).
  """
  frac = (num_steps - jnp.asarray(step_index, jnp.float32)) / num_steps
  return 1.0 + guidance_scale * (1.0 - jnp.cos(math.pi * frac ** 5.0)) / 2.0


def _alpha_sigma(schedule: NoiseSchedule, t: Array) -> tuple[Array, Array]:
  """Scalar (alpha_t, sigma_t); t = -1 is the clean end point (1, 0)."""
  abar = jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)
  return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def _log_snr(alpha: Array, sigma: Array) -> Array:
  """lambda = log(alpha / sigma), floored to stay finite at alpha or sigma 0."""
  tiny = jnp.finfo(jnp.float32).tiny
  return jnp.log(jnp.maximum(alpha, tiny)) - jnp.log(jnp.maximum(sigma, tiny))


def _guided_v(
    denoise: Denoise,
    params: Any,
    x: Array,
    t: Array,
    cond: Cond,
    uncond: Cond | None,
    scale: Array | None,
) -> Array:
  """The (guided) v prediction at scalar timestep t; x [B, ...].

  With uncond given: v_u + scale (v_c - v_u) from one call on [cond; uncond].
  """
  batch = x.shape[0]
  t_b = jnp.full((batch,), t, jnp.int32)  # [B]
  if uncond is None:
    return denoise(params, x, t_b, cond)
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0),
                      cond, uncond)
  v = denoise(params, jnp.concatenate([x, x], axis=0),
              jnp.concatenate([t_b, t_b], axis=0), both)  # [2B, ...]
  v_c, v_u = v[:batch], v[batch:]
  return v_u + scale * (v_c - v_u)


def _run(
    step: Callable[[Array, Any, Any], Any], carry: Any, args: Any, num_steps: int,
    progress: bool, desc: str,
) -> Any:
  """Jitted fori_loop, or a Python loop over the same jitted step with a tqdm bar.

  args = (params, cond, uncond) reach `step(i, carry, args)` as jit arguments.
  """
  if not progress:
    loop = lambda c, a: lax.fori_loop(0, num_steps, lambda i, c: step(i, c, a), c)
    return jax.jit(loop)(carry, args)
  step = jax.jit(step)
  for i in tqdm(range(num_steps), desc=desc):
    carry = step(jnp.asarray(i, jnp.int32), carry, args)
  return carry


def _make_predict_v(
    denoise: Denoise,
    guided: bool,
    num_steps: int,
    guidance_scale: float,
    dynamic_cfg: bool,
) -> Callable[[Any, Array, Array, Array], Array]:
  """v(args, x, t, step_index) with args = (params, cond, uncond); guided if `guided`."""
  if not guided:
    return lambda args, x, t, i: _guided_v(denoise, args[0], x, t, args[1], None, None)

  def predict_v(args: Any, x: Array, t: Array, i: Array) -> Array:
    if dynamic_cfg:
      scale = dynamic_guidance_scale(i, num_steps, guidance_scale)
    else:
      scale = jnp.float32(guidance_scale)
    return _guided_v(denoise, args[0], x, t, args[1], args[2], scale)

  return predict_v


def _steps(num_steps: int, schedule: NoiseSchedule) -> tuple[Array, Array]:
  """Each step's timestep and the next one; -1 stands for abar = 1 (clean data)."""
  ts = timesteps(num_steps, schedule)
  return ts, jnp.concatenate([ts[1:], jnp.array([-1], jnp.int32)])


def ddim_sample(
    denoise: Denoise,
    params: Any,
    x_T: Array,
    cond: Cond,
    uncond: Cond | None,
    schedule: NoiseSchedule,
    num_steps: int,
    guidance_scale: float,
    eta: float = 0.0,
    rng: Array | None = None,
    dynamic_cfg: bool = False,
    progress: bool = False,
) -> Array:
  """DDIM (Song et al. 2021) from pure noise x_T [B, ...] to x0 [B, ...]; `params` is
  denoise's first argument (the model's weights: any pytree, or None).

  From s to t: x_t = alpha_t x0 + sqrt(sigma_t^2 - c^2) eps + c z with
  c = eta (sigma_t / sigma_s) sqrt(1 - abar_s / abar_t); eta = 0 is the
  deterministic sampler (equal to first-order DPM-Solver++), eta > 0 needs rng.
  guidance_scale is a Python float; uncond=None or 1.0 disables guidance.
  """
  if eta > 0 and rng is None:
    raise ValueError("ddim_sample with eta > 0 needs rng")
  ts, ts_next = _steps(num_steps, schedule)  # [n] each
  guided = uncond is not None and guidance_scale != 1.0
  predict_v = _make_predict_v(denoise, guided, num_steps, guidance_scale, dynamic_cfg)
  args = (params, cond, uncond if guided else None)

  def step(i: Array, x: Array, args: Any) -> Array:
    alpha_s, sigma_s = _alpha_sigma(schedule, ts[i])
    alpha_t, sigma_t = _alpha_sigma(schedule, ts_next[i])
    v = predict_v(args, x, ts[i], i).astype(jnp.float32)
    xf = x.astype(jnp.float32)
    x0 = alpha_s * xf - sigma_s * v
    eps = sigma_s * xf + alpha_s * v
    if eta == 0:
      return (alpha_t * x0 + sigma_t * eps).astype(x.dtype)
    c = eta * (sigma_t / sigma_s) * jnp.sqrt(
        jnp.maximum(1.0 - jnp.square(alpha_s / alpha_t), 0.0))
    z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
    direction = jnp.sqrt(jnp.maximum(jnp.square(sigma_t) - jnp.square(c), 0.0))
    return (alpha_t * x0 + direction * eps + c * z).astype(x.dtype)

  return _run(step, x_T, args, num_steps, progress, "DDIM")


def dpmpp_2m_sample(
    denoise: Denoise,
    params: Any,
    x_T: Array,
    cond: Cond,
    uncond: Cond | None,
    schedule: NoiseSchedule,
    num_steps: int,
    guidance_scale: float,
    rng: Array | None = None,
    dynamic_cfg: bool = False,
    progress: bool = False,
    sde: bool = False,
) -> Array:
  """DPM-Solver++(2M) (Lu et al. 2022), data prediction, x_T [B, ...] -> x0.

  With D = x0_s + (h / 2 h_prev) (x0_s - x0_prev), h = lambda_t - lambda_s:
    ODE: x_t = (sigma_t/sigma_s) x_s + alpha_t (1 - e^-h) D
    SDE: x_t = (sigma_t/sigma_s) e^-h x_s + alpha_t (1 - e^-2h) D
               + sigma_t sqrt(1 - e^-2h) z          (needs rng)
  The first step (no history) and the last (lambda_t = +inf at abar = 1) are
  first order (D = x0_s); so is the second, whose predecessor had alpha = 0.
  guidance_scale is a Python float; uncond=None or 1.0 disables guidance.
  """
  if sde and rng is None:
    raise ValueError("dpmpp_2m_sample with sde=True needs rng")
  ts, ts_next = _steps(num_steps, schedule)  # [n] each
  ts_prev = jnp.concatenate([ts[:1], ts[:-1]])  # [n]; entry 0 unused
  guided = uncond is not None and guidance_scale != 1.0
  predict_v = _make_predict_v(denoise, guided, num_steps, guidance_scale, dynamic_cfg)
  args = (params, cond, uncond if guided else None)

  def step(i: Array, carry: tuple[Array, Array], args: Any) -> tuple[Array, Array]:
    x, x0_prev = carry  # [B, ...] each
    alpha_p, sigma_p = _alpha_sigma(schedule, ts_prev[i])
    alpha_s, sigma_s = _alpha_sigma(schedule, ts[i])
    alpha_t, sigma_t = _alpha_sigma(schedule, ts_next[i])
    v = predict_v(args, x, ts[i], i).astype(jnp.float32)
    xf = x.astype(jnp.float32)
    x0 = alpha_s * xf - sigma_s * v

    # exp(-h) as a ratio: 0 at alpha_s = 0 (first step) and at sigma_t = 0.
    exp_neg_h = (alpha_s * sigma_t) / (sigma_s * alpha_t)
    second = (i > 0) & (i < num_steps - 1) & (alpha_p > 0)
    lam_p, lam_s, lam_t = (_log_snr(alpha_p, sigma_p),
                           _log_snr(alpha_s, sigma_s),
                           _log_snr(alpha_t, sigma_t))
    h_ratio = jnp.where(
        second, (lam_t - lam_s) / jnp.where(second, lam_s - lam_p, 1.0), 0.0)
    d = x0 + 0.5 * h_ratio * (x0 - x0_prev.astype(jnp.float32))

    if sde:
      decay = 1.0 - jnp.square(exp_neg_h)
      z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
      x_next = ((sigma_t / sigma_s) * exp_neg_h * xf + alpha_t * decay * d
                + sigma_t * jnp.sqrt(decay) * z)
    else:
      x_next = (sigma_t / sigma_s) * xf + alpha_t * (1.0 - exp_neg_h) * d
    return x_next.astype(x.dtype), x0.astype(x.dtype)

  x, _ = _run(step, (x_T, jnp.zeros_like(x_T)), args, num_steps, progress,
              "DPM++(2M) SDE" if sde else "DPM++(2M)")
  return x
