"""Diffusion: zero-terminal-SNR v-prediction schedule, loss and samplers."""

from ttt_jax.diffusion.loss import (TimestepDistribution, drop_text, sample_timesteps,
                                    v_prediction_loss)
from ttt_jax.diffusion.samplers import (ddim_sample, dpmpp_2m_sample,
                                        dynamic_guidance_scale, timesteps)
from ttt_jax.diffusion.schedule import NoiseSchedule

__all__ = [
    "NoiseSchedule",
    "TimestepDistribution",
    "ddim_sample",
    "dpmpp_2m_sample",
    "drop_text",
    "dynamic_guidance_scale",
    "sample_timesteps",
    "timesteps",
    "v_prediction_loss",
]
