"""Schedule, loss, text dropout and samplers of ttt_jax.diffusion.

The samplers are driven by the exact v-prediction of known data
distributions (a Gaussian and a 2-D Gaussian mixture, where E[x0 | x_t] is
closed form), so their output distribution and their ODE solutions can be
compared with the truth rather than with another implementation only.

Tolerances: fp32 identities use 1e-5 on O(1) values. Sample statistics use
about 4 standard errors for N = 4000 points (derived next to each check), plus
the known bias of each sampler, which the tests compute instead of absorbing.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.diffusion import (NoiseSchedule, ddim_sample, dpmpp_2m_sample,
                               drop_text, dynamic_guidance_scale,
                               TimestepDistribution, sample_timesteps, timesteps,
                               v_prediction_loss)

SCHED = NoiseSchedule.create()

# A well separated 2-D isotropic Gaussian mixture.
MIX_W = np.array([0.2, 0.5, 0.3])
MIX_MU = np.array([[-2.0, 0.0], [1.5, 1.5], [1.0, -2.0]])
MIX_SD = np.array([0.3, 0.5, 0.4])



def _params_free(sampler):
  """A sampler for these tests' exact, weight-free models denoise(x, t, cond) -> v (the
  samplers call denoise(params, x, t, cond); params is None here)."""
  return lambda denoise, *a, **kw: sampler(lambda _, x, t, c: denoise(x, t, c), None, *a, **kw)


ddim, dpmpp_2m = _params_free(ddim_sample), _params_free(dpmpp_2m_sample)

def mixture_x0(x: jax.Array, t: jax.Array) -> jax.Array:
  """E[x0 | x_t] for the mixture; x [B, 2], t int [B].

  Given component k, x_t ~ N(a mu_k, (a^2 s_k^2 + sigma^2) I) and
  E[x0 | x_t, k] = mu_k + a s_k^2 / (a^2 s_k^2 + sigma^2) (x_t - a mu_k);
  the components are weighted by their posterior responsibilities.
  """
  a, s = SCHED.alpha_sigma(t, 2)  # [B, 1]
  mu, sd = jnp.asarray(MIX_MU, jnp.float32), jnp.asarray(MIX_SD, jnp.float32)
  var = a ** 2 * sd ** 2 + s ** 2  # [B, K]
  diff = x[:, None, :] - a[:, :, None] * mu  # [B, K, 2]
  logp = (jnp.log(jnp.asarray(MIX_W, jnp.float32))
          - jnp.sum(diff ** 2, -1) / (2 * var) - jnp.log(var))  # [B, K]
  # Hand-written softmax: jax.nn.softmax forms -inf, which trips debug_infs.
  resp = jnp.exp(logp - jnp.max(logp, axis=-1, keepdims=True))
  resp = resp / jnp.sum(resp, axis=-1, keepdims=True)  # [B, K]
  x0_k = mu + (a * sd ** 2 / var)[..., None] * diff  # [B, K, 2]
  return jnp.sum(resp[..., None] * x0_k, axis=1)


def mixture_denoise(x, t, cond):
  """Exact v = (alpha x_t - E[x0 | x_t]) / sigma, plus a cond-dependent shift.

  The shift makes conditional and unconditional predictions differ by
  exactly cond - uncond, so guidance has a known effect.
  """
  a, s = SCHED.alpha_sigma(t, x.ndim)
  v = (a * x - mixture_x0(x, t)) / s
  return v if cond is None else v + cond


# One compiled copy for the step-by-step float64 reference loops.
mixture_denoise_jit = jax.jit(mixture_denoise)

GAUSS_MU, GAUSS_SD = 0.7, 0.4


def gauss_denoise(x, t, cond):
  """Exact v for x0 ~ N(0.7, 0.4^2)."""
  a, s = SCHED.alpha_sigma(t, x.ndim)
  var = a ** 2 * GAUSS_SD ** 2 + s ** 2
  x0 = GAUSS_MU + a * GAUSS_SD ** 2 / var * (x - a * GAUSS_MU)
  return (a * x - x0) / s


def final_step_std(num_steps: int, sd: np.ndarray) -> np.ndarray:
  """Std of E[x0 | x_t] at the last sampled t when x_t is exactly marginal.

  Every sampler here ends by jumping from the last trailing timestep
  (19 for 50 steps) to abar = 1 with the posterior mean, which shrinks a
  Gaussian component's spread by a s / sqrt(a^2 s^2 + sigma^2).
  """
  abar = float(SCHED.alphas_cumprod[int(timesteps(num_steps, SCHED)[-1])])
  return np.sqrt(abar) * sd ** 2 / np.sqrt(abar * sd ** 2 + 1 - abar)


# ----------------------------------------------------------------------------
# (1) Schedule.
# ----------------------------------------------------------------------------


def test_schedule_endpoints_and_monotonicity():
  abar = np.asarray(SCHED.alphas_cumprod)
  assert abar.shape == (1000,) and abar.dtype == np.float32
  assert np.all(np.isfinite(abar))
  # First step unchanged by the rescale: 1 - beta_0 = 1 - 0.00085.
  np.testing.assert_allclose(abar[0], 1 - 0.00085, rtol=0, atol=1e-7)
  assert abar[-1] == 0.0
  assert np.all(np.diff(abar) < 0)
  assert abar[-2] > 0


def test_schedule_snr_identities():
  plain = np.asarray(NoiseSchedule.create(zero_snr=False).alphas_cumprod,
                     np.float64)
  zsnr = np.asarray(SCHED.alphas_cumprod, np.float64)
  # Lin et al. 2024 quote sqrt(abar_T) = 0.068265 for this (SD) schedule.
  np.testing.assert_allclose(np.sqrt(plain[-1]), 0.068265, atol=2e-6)
  # Algorithm 1: sqrt(abar) is affinely mapped, last -> 0, first fixed.
  s_old = np.sqrt(plain)
  expected = (s_old - s_old[-1]) * s_old[0] / (s_old[0] - s_old[-1])
  np.testing.assert_allclose(np.sqrt(zsnr), expected, rtol=1e-5, atol=1e-7)
  # alpha^2 + sigma^2 = 1 and SNR = alpha^2 / sigma^2, decreasing to 0.
  t = jnp.arange(1000)
  alpha, sigma = SCHED.alpha_sigma(t)
  np.testing.assert_allclose(alpha ** 2 + sigma ** 2, 1.0, atol=1e-6)
  snr = np.asarray(alpha ** 2 / sigma ** 2, np.float64)
  np.testing.assert_allclose(snr, zsnr / (1 - zsnr), rtol=1e-4)
  assert snr[-1] == 0.0 and np.all(np.diff(snr) < 0)
  np.testing.assert_allclose(snr[0], (1 - 0.00085) / 0.00085, rtol=1e-4)


def test_alpha_sigma_broadcasts_and_schedule_is_a_pytree():
  t = jnp.array([0, 500, 999])
  alpha, sigma = SCHED.alpha_sigma(t, 5)
  assert alpha.shape == sigma.shape == (3, 1, 1, 1, 1)
  np.testing.assert_array_equal(alpha[2], 0.0)
  np.testing.assert_array_equal(sigma[2], 1.0)
  # Passed through jit as an argument, not baked in as a constant.
  f = jax.jit(lambda sched, x: sched.add_noise(x, x, t))
  x = jnp.ones((3, 2))
  np.testing.assert_allclose(f(SCHED, x), SCHED.add_noise(x, x, t))


# ----------------------------------------------------------------------------
# (2) Parameterisation round trips.
# ----------------------------------------------------------------------------


def test_v_parameterisation_round_trips():
  k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
  B = 64
  x0 = jax.random.normal(k0, (B, 3, 4, 5))  # [B, T, h, w]
  noise = jax.random.normal(k1, x0.shape)
  t = jax.random.randint(k2, (B,), 0, 1000).at[0].set(0).at[1].set(999)
  x_t = SCHED.add_noise(x0, noise, t)
  v = SCHED.v_target(x0, noise, t)
  tol = dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(SCHED.x0_from_v(x_t, v, t), x0, **tol)
  np.testing.assert_allclose(SCHED.eps_from_v(x_t, v, t), noise, **tol)
  np.testing.assert_allclose(
      SCHED.add_noise(SCHED.x0_from_v(x_t, v, t),
                      SCHED.eps_from_v(x_t, v, t), t), x_t, **tol)
  # Pure noise at t = 999: x_t = eps, v = -x0. Almost clean at t = 0.
  np.testing.assert_array_equal(x_t[1], noise[1])
  np.testing.assert_array_equal(v[1], -x0[1])
  a0, s0 = math.sqrt(1 - 0.00085), math.sqrt(0.00085)
  np.testing.assert_allclose(x_t[0], a0 * x0[0] + s0 * noise[0], **tol)
  np.testing.assert_allclose(v[0], a0 * noise[0] - s0 * x0[0], **tol)


# ----------------------------------------------------------------------------
# (3) Loss.
# ----------------------------------------------------------------------------


def _loss_inputs(shape=(32, 3, 4, 4, 2)):
  ks = jax.random.split(jax.random.PRNGKey(1), 4)
  x0 = jax.random.normal(ks[0], shape)  # [B, T, h, w, C]
  noise = jax.random.normal(ks[1], shape)
  v_pred = jax.random.normal(ks[2], shape)
  t = jax.random.randint(ks[3], (shape[0],), 0, 1000)
  t = t.at[0].set(0).at[1].set(999)
  return v_pred, x0, noise, t


def test_weighted_x0_loss_equals_v_mse():
  """w_t = 1/(1 - abar_t) makes the x0 error exactly the v error."""
  v_pred, x0, noise, t = _loss_inputs()
  loss = v_prediction_loss(v_pred, x0, noise, t, SCHED)
  assert loss.shape == (x0.shape[0],)
  v_err = v_pred - SCHED.v_target(x0, noise, t)
  v_mse = jnp.mean(v_err ** 2, axis=(1, 2, 3, 4))
  np.testing.assert_allclose(loss, v_mse, rtol=1e-5, atol=1e-5)
  perfect = v_prediction_loss(SCHED.v_target(x0, noise, t), x0, noise, t, SCHED)
  np.testing.assert_allclose(perfect, 0.0, atol=1e-8)


def test_loss_mask():
  v_pred, x0, noise, t = _loss_inputs()
  B, T = x0.shape[:2]
  # Mask out trailing frames per example: [B, T, 1, 1, 1], broadcast to x0.
  n_valid = jnp.arange(B) % T
  mask = (jnp.arange(T)[None, :] < n_valid[:, None]).astype(jnp.float32)
  mask = mask[:, :, None, None, None]
  loss = v_prediction_loss(v_pred, x0, noise, t, SCHED, mask=mask)
  err = (v_pred - SCHED.v_target(x0, noise, t)) ** 2
  for b in range(B):
    n = int(n_valid[b])
    expected = float(jnp.mean(err[b, :n])) if n else 0.0
    np.testing.assert_allclose(loss[b], expected, rtol=1e-5, atol=1e-6)
  # Masked elements have no influence, in value or gradient.
  garbage = v_pred + 100.0 * (1.0 - mask)
  np.testing.assert_allclose(
      v_prediction_loss(garbage, x0, noise, t, SCHED, mask=mask), loss,
      rtol=1e-5, atol=1e-6)
  grad = jax.grad(lambda v: v_prediction_loss(v, x0, noise, t, SCHED,
                                              mask=mask).sum())(v_pred)
  assert np.all(np.isfinite(grad))
  np.testing.assert_array_equal(grad * (1.0 - mask), 0.0)


def test_sample_timesteps():
  t = sample_timesteps(jax.random.PRNGKey(2), 20000, SCHED)
  assert t.shape == (20000,) and jnp.issubdtype(t.dtype, jnp.integer)
  assert int(t.min()) == 0 and int(t.max()) == 999
  # Uniform: mean 499.5, standard error 288.7 / sqrt(20000) = 2.0.
  assert abs(float(t.mean()) - 499.5) < 8.0
  # The default is the uniform draw it always was (resumed runs see the same timesteps).
  np.testing.assert_array_equal(
      t, jax.random.randint(jax.random.PRNGKey(2), (20000,), 0, 1000, jnp.int32))


@pytest.mark.parametrize("dist,quantiles", [
    # logit-normal: u = sigmoid(1 + 0.8 z), so P(u < sigmoid(1 + 0.8 q)) = Phi(q).
    (TimestepDistribution("logit_normal", loc=1.0, scale=0.8),
     {float(1 / (1 + np.exp(-(1.0 + 0.8 * q)))): p
      for q, p in ((-1.0, 0.158655), (0.0, 0.5), (1.0, 0.841345))}),
    # shift 3: u = 3 v / (1 + 2 v) < w  <=>  v < w / (3 - 2 w).
    (TimestepDistribution("shifted", shift=3.0), {0.5: 0.25, 0.75: 0.5, 0.9: 0.75}),
    (TimestepDistribution(), {0.25: 0.25, 0.9: 0.9}),
])
def test_timestep_distributions_match_their_law(dist, quantiles):
  """Draws against hand-derived quantiles (Phi values from the normal table), and the
  exact pmf against the draws: with n = 200,000 an empirical CDF's standard error is at
  most 0.5 / sqrt(n) = 0.0011, so 0.006 is over 5 standard errors."""
  n = 200_000
  t = np.asarray(sample_timesteps(jax.random.PRNGKey(5), n, SCHED, dist))
  assert t.min() >= 0 and t.max() <= 999 and t.dtype == np.int32
  for u, p in quantiles.items():
    assert abs(np.mean(t < u * 1000) - p) < 0.006, (u, p)
  pmf = dist.probabilities(1000)
  assert pmf.shape == (1000,) and abs(pmf.sum() - 1.0) < 1e-12 and pmf.min() >= 0
  for k in (100, 500, 800, 900, 950):
    assert abs(np.mean(t < k) - pmf[:k].sum()) < 0.006, k


def test_timestep_distribution_errors():
  with pytest.raises(ValueError, match="kind='cosine' is unknown"):
    TimestepDistribution("cosine")
  with pytest.raises(ValueError, match="scale > 0 and shift > 0"):
    TimestepDistribution("shifted", shift=0.0)


# ----------------------------------------------------------------------------
# (4) Text dropout.
# ----------------------------------------------------------------------------


def test_drop_text():
  B, L, D = 4000, 3, 4
  emb = jax.random.normal(jax.random.PRNGKey(3), (B, L, D)) + 5.0  # never near the null
  null = -jnp.arange(L * D, dtype=jnp.float32).reshape(L, D)  # e.g. T5(""), not zeros
  rng = jax.random.PRNGKey(4)
  np.testing.assert_array_equal(drop_text(rng, emb, 0.0, null), emb)
  np.testing.assert_array_equal(drop_text(rng, emb, 1.0, null), jnp.broadcast_to(null, emb.shape))
  out = drop_text(rng, emb, 0.5, null)
  dropped = np.all(np.asarray(out) == np.asarray(null), axis=(1, 2))
  kept = np.all(np.asarray(out) == np.asarray(emb), axis=(1, 2))
  assert np.all(dropped ^ kept)  # whole examples, never partial
  # Binomial(4000, 0.5): standard error 0.0079 of the fraction.
  assert abs(dropped.mean() - 0.5) < 0.035
  np.testing.assert_array_equal(drop_text(rng, emb, 0.5, null), out)
  other = drop_text(jax.random.PRNGKey(5), emb, 0.5, null)
  assert np.any(np.asarray(other) != np.asarray(out))
  out_jit = jax.jit(drop_text, static_argnums=2)(rng, emb, 0.5, null)
  np.testing.assert_array_equal(out_jit, out)


# ----------------------------------------------------------------------------
# (5) Samplers recover the data distribution.
# ----------------------------------------------------------------------------


def _mixture_stats(x: np.ndarray):
  """Weights, means [K, 2] and isotropic stds [K] by nearest component."""
  label = np.argmin(((x[:, None] - MIX_MU) ** 2).sum(-1), axis=1)
  w = np.bincount(label, minlength=3) / len(x)
  mu = np.stack([x[label == k].mean(0) for k in range(3)])
  sd = np.array([np.sqrt(((x[label == k] - mu[k]) ** 2).mean())
                 for k in range(3)])
  return w, mu, sd


@pytest.mark.parametrize("name,num_steps,std_tol", [
    ("ddim", 50, 0.07),
    ("dpmpp_2m", 50, 0.07),
    ("dpmpp_2m_sde", 100, 0.07),
    ("ddim_eta1", 100, 0.12),
])
def test_samplers_recover_mixture(name, num_steps, std_tol):
  """4000 samples; statistics within ~4 standard errors of the truth.

  Weights: binomial standard error <= sqrt(0.25 / 4000) = 0.008 -> 0.035.
  Means: s_k / sqrt(N w_k) <= 0.012 per coordinate -> 0.05.
  Stds: relative standard error 1 / sqrt(2 * 2 N w_k) <= 0.018 -> 0.07,
  against the truth times the known final-step shrinkage (final_step_std).
  DDIM with eta = 1 (ancestral DDPM steps) is additionally under-dispersed
  by a few percent at 100 steps: its posterior variance beta_tilde is the
  lower bound of the true reverse variance (Bao et al. 2022), so 0.12.
  """
  x_T = jax.random.normal(jax.random.PRNGKey(0), (4000, 2))
  rng = jax.random.PRNGKey(10)
  if name == "ddim":
    x = ddim(mixture_denoise, x_T, None, None, SCHED, num_steps, 1.0)
  elif name == "ddim_eta1":
    x = ddim(mixture_denoise, x_T, None, None, SCHED, num_steps, 1.0,
                    eta=1.0, rng=rng)
  else:
    x = dpmpp_2m(mixture_denoise, x_T, None, None, SCHED, num_steps,
                        1.0, rng=rng, sde=name.endswith("sde"))
  x = np.asarray(x)
  assert np.all(np.isfinite(x))
  w, mu, sd = _mixture_stats(x)
  np.testing.assert_allclose(w, MIX_W, atol=0.035)
  np.testing.assert_allclose(mu, MIX_MU, atol=0.05)
  np.testing.assert_allclose(sd, final_step_std(num_steps, MIX_SD),
                             rtol=std_tol)


# ----------------------------------------------------------------------------
# (6) Solver accuracy and agreement.
# ----------------------------------------------------------------------------


def test_ode_solvers_converge_to_exact_flow_and_agree():
  """For Gaussian data the probability-flow ODE is solvable in closed form.

  Along an exact trajectory x_t = a mu + sqrt(a^2 s^2 + sigma^2) z with
  z = x_T, and the final posterior-mean jump at the last timestep t_L maps it
  to mu + a s^2 / sqrt(a^2 s^2 + sigma^2) z. DPM-Solver++(2M) must be much
  more accurate than DDIM, and at 500 steps both must agree.
  """
  x_T = jax.random.normal(jax.random.PRNGKey(1), (2000, 1))

  def exact(num_steps):
    shrink = final_step_std(num_steps, np.array(GAUSS_SD)) / GAUSS_SD
    return GAUSS_MU + GAUSS_SD * shrink * np.asarray(x_T)

  def run(sampler, n):
    return np.asarray(sampler(gauss_denoise, x_T, None, None, SCHED, n, 1.0))

  err_ddim = np.abs(run(ddim, 100) - exact(100)).max()
  err_dpm = np.abs(run(dpmpp_2m, 100) - exact(100)).max()
  # Measured: 0.032 vs 0.0049. The large final steps in lambda keep both
  # below their nominal order, but the second-order gain must remain.
  assert err_dpm < 0.25 * err_ddim and err_dpm < 0.01
  ddim_500, dpm_500 = run(ddim, 500), run(dpmpp_2m, 500)
  np.testing.assert_allclose(dpm_500, exact(500), atol=3e-3)
  # DDIM's first-order error at 500 steps is ~0.01 (max over |z| < 4).
  np.testing.assert_allclose(ddim_500, dpm_500, atol=0.02)


def test_ode_solvers_agree_on_mixture():
  """Same x_T, 500 steps: the two ODE solvers give the same samples.

  Points on the separatrix between modes are chaotic under any
  discretisation error, so the agreement is asserted for 99% of them.
  """
  x_T = jax.random.normal(jax.random.PRNGKey(2), (2000, 2))
  a = ddim(mixture_denoise, x_T, None, None, SCHED, 500, 1.0)
  b = dpmpp_2m(mixture_denoise, x_T, None, None, SCHED, 500, 1.0)
  diff = np.abs(np.asarray(a - b)).max(axis=1)
  assert np.quantile(diff, 0.99) < 0.02  # measured ~0.01
  assert np.median(diff) < 5e-3  # measured ~0.003


def test_dpmpp_first_order_steps_are_ddim():
  """With two steps DPM-Solver++(2M) takes only first-order steps = DDIM."""
  x_T = jax.random.normal(jax.random.PRNGKey(3), (256, 2))
  a = ddim(mixture_denoise, x_T, None, None, SCHED, 2, 1.0)
  b = dpmpp_2m(mixture_denoise, x_T, None, None, SCHED, 2, 1.0)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _reference_dpmpp_2m(denoise, x_T, num_steps, noises=None):
  """Textbook DPM-Solver++(2M) in float64 with lambda and IEEE infinities.

  lambda = -inf at alpha = 0 and +inf at sigma = 0; numpy's exp(-inf) = 0
  and 1 / inf = 0 give the limits the sampler computes with ratios. With
  noises, the SDE variant of diffusers' "sde-dpmsolver++".
  """
  n_train = SCHED.num_steps
  ts = np.round(np.arange(n_train, 0, -n_train / num_steps)).astype(int) - 1
  abar = np.append(np.asarray(SCHED.alphas_cumprod, np.float64)[ts], 1.0)
  alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(sigma)
  x = np.asarray(x_T, np.float64)
  x0_prev = None
  with np.errstate(divide="ignore", invalid="raise"):
    for i in range(num_steps):
      t_b = jnp.full((x.shape[0],), ts[i])
      v = denoise(jnp.asarray(x, jnp.float32), t_b, None)
      v = np.asarray(v, np.float64)
      x0 = alpha[i] * x - sigma[i] * v
      h = lam[i + 1] - lam[i]
      if i == 0 or i == num_steps - 1:
        d = x0
      else:
        r = (lam[i] - lam[i - 1]) / h
        d = x0 + 0.5 / r * (x0 - x0_prev)
      if noises is None:
        x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * np.expm1(-h) * d
      else:
        x = (sigma[i + 1] / sigma[i] * np.exp(-h) * x
             - alpha[i + 1] * np.expm1(-2 * h) * d
             + sigma[i + 1] * np.sqrt(-np.expm1(-2 * h)) * noises[i])
      x0_prev = x0
  return x


@pytest.mark.parametrize("sde", [False, True])
def test_dpmpp_matches_float64_reference(sde):
  num_steps = 12
  x_T = jax.random.normal(jax.random.PRNGKey(4), (64, 2))
  rng = jax.random.PRNGKey(5)
  # The sampler draws step i's noise as normal(fold_in(rng, i)).
  noises = [np.asarray(jax.random.normal(jax.random.fold_in(rng, i), x_T.shape),
                       np.float64) for i in range(num_steps)] if sde else None
  ref = _reference_dpmpp_2m(mixture_denoise_jit, x_T, num_steps, noises)
  out = dpmpp_2m(mixture_denoise, x_T, None, None, SCHED, num_steps, 1.0,
                        rng=rng, sde=sde)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------
# (7) Classifier-free guidance.
# ----------------------------------------------------------------------------


def _recording(denoise):
  """denoise that records the batch size of every (traced) call."""
  sizes = []

  def f(x, t, cond):
    sizes.append(x.shape[0])
    return denoise(x, t, cond)

  return f, sizes


def _cfg_inputs(B=8):
  x_T = jax.random.normal(jax.random.PRNGKey(6), (B, 2))
  cond = jnp.full((B, 2), 0.3) * jnp.arange(1, B + 1)[:, None] / B  # [B, 2]
  uncond = jnp.full((B, 2), -0.2)
  return x_T, cond, uncond


def test_guidance_scale_one_is_cond_only_single_call():
  x_T, cond, uncond = _cfg_inputs()
  for sampler in (ddim, dpmpp_2m):
    f, sizes = _recording(mixture_denoise)
    guided = sampler(f, x_T, cond, uncond, SCHED, 4, 1.0)
    assert set(sizes) == {x_T.shape[0]}
    cond_only = sampler(mixture_denoise, x_T, cond, None, SCHED, 4, 1.0)
    np.testing.assert_array_equal(guided, cond_only)
    # With guidance the two branches run as one call on a doubled batch.
    f, sizes = _recording(mixture_denoise)
    sampler(f, x_T, cond, uncond, SCHED, 4, 5.0)
    assert set(sizes) == {2 * x_T.shape[0]}


@pytest.mark.parametrize("dynamic", [False, True])
def test_one_step_guided_combination(dynamic):
  """One step from t = 999 (alpha = 0, sigma = 1) returns x0 = -v_guided."""
  x_T, cond, uncond = _cfg_inputs()
  s = 4.0
  t = jnp.full((x_T.shape[0],), 999)
  v_c = mixture_denoise(x_T, t, cond)
  v_u = mixture_denoise(x_T, t, uncond)
  scale = 1.0 + s if dynamic else s  # dynamic ramp at step 0 of 1
  expected = -(v_u + scale * (v_c - v_u))
  for sampler in (ddim, dpmpp_2m):
    out = sampler(mixture_denoise, x_T, cond, uncond, SCHED, 1, s,
                  dynamic_cfg=dynamic)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_dynamic_guidance_schedule():
  s, n = 6.0, 50
  scales = np.asarray(dynamic_guidance_scale(jnp.arange(n), n, s))
  np.testing.assert_allclose(scales[0], 1.0 + s, rtol=1e-6)
  last = 1.0 + s * (1.0 - math.cos(math.pi * (1.0 / n) ** 5)) / 2.0
  np.testing.assert_allclose(scales[-1], last, rtol=1e-6)
  assert abs(scales[-1] - 1.0) < 1e-6
  assert np.all(np.diff(scales) <= 0)


def test_ddim_dynamic_cfg_matches_float64_reference():
  """Multi-step DDIM with the per-step dynamic scale, against a plain loop."""
  x_T, cond, uncond = _cfg_inputs()
  s, n = 5.0, 10
  ts = np.round(np.arange(1000, 0, -1000 / n)).astype(int) - 1
  abar = np.append(np.asarray(SCHED.alphas_cumprod, np.float64)[ts], 1.0)
  x = np.asarray(x_T, np.float64)
  for i in range(n):
    scale = 1 + s * (1 - math.cos(math.pi * ((n - i) / n) ** 5)) / 2
    t_b = jnp.full((x.shape[0],), ts[i])
    xj = jnp.asarray(x, jnp.float32)
    v_c = np.asarray(mixture_denoise_jit(xj, t_b, cond), np.float64)
    v_u = np.asarray(mixture_denoise_jit(xj, t_b, uncond), np.float64)
    v = v_u + scale * (v_c - v_u)
    a_s, s_s = np.sqrt(abar[i]), np.sqrt(1 - abar[i])
    x0, eps = a_s * x - s_s * v, s_s * x + a_s * v
    x = np.sqrt(abar[i + 1]) * x0 + np.sqrt(1 - abar[i + 1]) * eps
  out = ddim(mixture_denoise, x_T, cond, uncond, SCHED, n, s,
                    dynamic_cfg=True)
  np.testing.assert_allclose(out, x, rtol=1e-4, atol=1e-4)


def test_guidance_with_pytree_conditioning():
  """(text_emb, text_mask)-style tuples are concatenated leaf by leaf."""
  x_T, cond, uncond = _cfg_inputs()
  mask = jnp.ones((x_T.shape[0], 3))

  def denoise(x, t, c):
    shift, m = c
    return mixture_denoise(x, t, shift * m[:, :1])

  a = ddim(denoise, x_T, (cond, mask), (uncond, mask), SCHED, 5, 3.0)
  b = ddim(mixture_denoise, x_T, cond, uncond, SCHED, 5, 3.0)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# (8) Progress bar loop == fori_loop; jit.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddim", "ddim_eta", "dpmpp", "dpmpp_sde"])
def test_progress_loop_equals_fori_loop(kind):
  x_T, cond, uncond = _cfg_inputs()
  rng = jax.random.PRNGKey(7)

  def run(progress):
    kw = dict(dynamic_cfg=True, progress=progress)
    if kind.startswith("ddim"):
      return ddim(mixture_denoise, x_T, cond, uncond, SCHED, 8, 4.0,
                         eta=0.5 if kind == "ddim_eta" else 0.0, rng=rng, **kw)
    return dpmpp_2m(mixture_denoise, x_T, cond, uncond, SCHED, 8, 4.0,
                           rng=rng, sde=kind == "dpmpp_sde", **kw)

  # Same jaxpr per step, same noise keys: bit-identical.
  np.testing.assert_array_equal(run(True), run(False))


def test_samplers_jit():
  x_T, cond, uncond = _cfg_inputs()

  @jax.jit
  def sample(x_T, cond, uncond, sched):
    return dpmpp_2m(mixture_denoise, x_T, cond, uncond, sched, 8, 4.0)

  np.testing.assert_allclose(
      sample(x_T, cond, uncond, SCHED),
      dpmpp_2m(mixture_denoise, x_T, cond, uncond, SCHED, 8, 4.0),
      rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# (9) The zero-SNR first step.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddim", "ddim_eta", "dpmpp", "dpmpp_sde"])
def test_no_nan_or_inf_anywhere(kind):
  """Op by op (jit disabled), no intermediate is NaN or inf.

  alpha_999 = 0 makes lambda = -inf; the sampler must never form it.
  """
  x_T, cond, uncond = _cfg_inputs(B=4)
  rng = jax.random.PRNGKey(8)
  with jax.disable_jit(), jax.debug_nans(True), jax.debug_infs(True):
    if kind.startswith("ddim"):
      out = ddim(mixture_denoise, x_T, cond, uncond, SCHED, 3, 3.0,
                        eta=1.0 if kind == "ddim_eta" else 0.0, rng=rng)
    else:
      out = dpmpp_2m(mixture_denoise, x_T, cond, uncond, SCHED, 4, 3.0,
                            rng=rng, sde=kind == "dpmpp_sde")
  assert np.all(np.isfinite(np.asarray(out)))


def test_first_step_from_pure_noise():
  """Step 999 -> t_1 is alpha_1 x0_hat + sigma_1 x_T (first order, exact)."""
  x_T, _, _ = _cfg_inputs()
  t0 = jnp.full((x_T.shape[0],), 999)
  x0_hat = -mixture_denoise(x_T, t0, None)
  # Two trailing steps: 999 -> 499, then the final jump to E[x0 | x_499].
  a1, s1 = (float(v[0]) for v in SCHED.alpha_sigma(jnp.array([499])))
  x1 = a1 * x0_hat + s1 * x_T
  expected = mixture_x0(x1, jnp.full((x_T.shape[0],), 499))
  for sampler in (ddim, dpmpp_2m):
    out = sampler(mixture_denoise, x_T, None, None, SCHED, 2, 1.0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # The SDE's first step discards x_T entirely (exp(-h) = 0).
  rng = jax.random.PRNGKey(9)
  z0 = jax.random.normal(jax.random.fold_in(rng, 0), x_T.shape)
  t1 = jnp.full((x_T.shape[0],), 499)
  expected_sde = mixture_x0(a1 * x0_hat + s1 * z0, t1)
  out = dpmpp_2m(mixture_denoise, x_T, None, None, SCHED, 2, 1.0,
                        rng=rng, sde=True)
  np.testing.assert_allclose(out, expected_sde, rtol=1e-5, atol=1e-5)


def test_timesteps_trailing():
  np.testing.assert_array_equal(timesteps(1, SCHED), [999])
  ts = np.asarray(timesteps(50, SCHED))
  np.testing.assert_array_equal(ts[:3], [999, 979, 959])
  assert ts[-1] == 19 and np.all(np.diff(ts) < 0)
  np.testing.assert_array_equal(timesteps(1000, SCHED), np.arange(999, -1, -1))
  with pytest.raises(ValueError):
    timesteps(1001, SCHED)


@pytest.mark.parametrize("progress", [False, True])
def test_params_and_captions_are_arguments_not_constants(monkeypatch, progress):
  """The model's weights and the captions enter the sampling loop as jit arguments: a
  closed-over array would be baked into the program as a constant (GBs at 5B)."""
  from ttt_jax.diffusion import samplers
  w = jax.random.normal(jax.random.PRNGKey(0), (48, 48))  # "weights", a shape nothing else has
  cond, uncond = jnp.full((2, 48), 0.5), jnp.zeros((2, 48))
  x_T = jax.random.normal(jax.random.PRNGKey(1), (2, 48))
  programs, jit = [], jax.jit

  def spy(f, **kw):
    jitted = jit(f, **kw)

    def call(*args):
      programs.append(jitted.lower(*args).as_text())
      return jitted(*args)
    return call

  monkeypatch.setattr(samplers.jax, "jit", spy)
  denoise = lambda p, x, t, c: x @ p + c
  for sampler in (ddim_sample, dpmpp_2m_sample):
    out = sampler(denoise, w, x_T, cond, uncond, SCHED, 3, 2.0, progress=progress)
    assert out.shape == x_T.shape and bool(jnp.isfinite(out).all())
  assert programs
  for text in programs:  # 48x48 f32 in the program only as an argument type, never a constant
    assert not re.search(r"stablehlo.constant dense<[^>]*> : tensor<48x48xf32>", text)
    assert not re.search(r"constant dense<[^>]*> : tensor<2x48xf32>", text)
    assert "tensor<48x48xf32>" in text
