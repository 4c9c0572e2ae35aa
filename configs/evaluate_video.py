"""The video comparison of `python -m ttt_jax.evaluate --task=video` (ttt_jax/evaluation/video.py).

    python -m ttt_jax.evaluate --task=video --preset=ci --workdir=workdirs/eval_ci
    python -m ttt_jax.evaluate --task=video --preset=full --workdir=workdirs/eval_full

Presets:
  ci    the controls (local attention, full attention, the oracle storyboard) and TTT-MLP
        at 9 s, three seeds: the check that the comparison separates, in CI time.
  full  every sequence layer and the oracle at 9 / 18 / 63 s, three seeds.

The remembered attribute is the house's paint, named in the first caption only
(`ToyCartoonConfig.paints`). The base is the tiny DiT (2 blocks): local attention
reaches segments 0 and 1, so every segment from index 2 on is beyond its reach.
"""

from __future__ import annotations

import ml_collections

from ttt_jax.data import toy_cartoons

PRESETS = ("ci", "full")
# Every sequence layer of the DiT's global slot, then the oracle control.
ALL_VARIANTS = ("local", "sliding_window", "full_attention", "mamba2", "gated_deltanet",
                "ttt_linear", "ttt_mlp", "lact", "oracle")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or "ci"
  if preset not in PRESETS:
    raise ValueError(f"unknown video evaluation preset {preset!r}; choose from {PRESETS}")
  ci = preset == "ci"
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seconds = (9,) if ci else (9, 18, 63)  # evaluated lengths, each a curriculum stage
  c.seeds = (0, 1, 2)
  c.variants = ("local", "full_attention", "oracle", "ttt_mlp") if ci else ALL_VARIANTS
  c.model = "tiny"
  c.data = dict(
      # 32x48 pixels: 2x3 DiT tokens a frame, so a fine-tuning step at 9 s takes ~0.1-0.2 s
      # on one core; the paint covers the frame at any size (benchmarks/RESULTS.md).
      height=32, width=48, num_videos=128, text_len=32,
      colours="orange,blue,red,purple,yellow", paints=",".join(toy_cartoons.PAINTS),
      restate_paint=False)
  # The shared base: local attention alone at 3 s, seed 0. Shifted timesteps (SD3's shift 3)
  # put 25 % of its steps at t >= 900, where the caption's paint decides the frame.
  c.base = dict(steps=3000, batch=4, lr=2e-3, timesteps=dict(kind="shifted", loc=0.0,
                                                             scale=1.0, shift=3.0))
  # Every variant's stages, from the base: its global layer added fresh at the first one.
  # Only attention q/k/v/o and the slot train (the paper's later-stage recipe).
  c.stage = dict(
      steps={9: 200, 18: 100, 63: 30}, batch=2, warmup_steps=20,
      lr=dict(other=0.0, attn_qkvo=1e-3, ttt=3e-3),
      timesteps=dict(kind="shifted", loc=0.0, scale=1.0, shift=3.0))
  # The longest length a variant is run at (the rest: every length).
  c.max_seconds = {}
  c.score = dict(
      heldout=24,  # storyboards of the held-out losses and swap gains
      sampled=16,  # of them sampled and read by the paint probe
      sample_steps=10, sampler="dpmpp_2m", guidance_scale=1.0,
      loss_timesteps=(200, 500, 800),
      # Where the paint is worth most: the noisy frames no longer show it.
      swap_timesteps=(800, 900, 950),
  )
  c.lock()
  return c
