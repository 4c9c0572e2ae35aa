"""MQAR recall of the DiT's sequence-slot cores (`ttt_jax/evaluation/recall.py`).

  python -m ttt_jax.evaluate --task=recall --preset=ci --workdir=workdirs/eval

Presets (the text after `:`):
  ci    every core on one setting (4 pairs at 64 tokens), 2 lrs, 2 seeds
        (see benchmarks/RESULTS.md for its time on one CPU core).
  full  every core; seq_len 64..512 at 8 pairs and 4..32 pairs at 256 tokens,
        3 seeds, a 3-lr sweep (see benchmarks/out/recall_full.md for its time).

Settings are a cross, not a grid: every seq_len at base_pairs, then every
pair count at base_seq_len. The slots' options are the DiT's own
(configs/common.py `model.ttt` / `model.baselines`), sized to the benchmark:
the sliding window and LaCT's chunk are one distractor segment (as the DiT's
are one 3 s segment), TTT keeps each inner model's default base lr and no
remat.
"""

from __future__ import annotations

import ml_collections

from configs import common

PRESETS = ("ci", "full")
VARIANTS = ("full_attention", "sliding_window", "mamba2", "gated_deltanet", "ttt_linear",
            "ttt_mlp", "lact", "local")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or "full"
  if preset not in PRESETS:
    raise ValueError(f"unknown recall preset {preset!r}; choose from {PRESETS}")
  ci = preset == "ci"
  segment = 16  # distractor tokens per segment: local attention's reach per block

  model = common.get_config(3, "tiny").model
  ttt = {k: v for k, v in model.ttt.to_dict().items() if k != "base_lr"}
  ttt["remat_group"] = None  # no remat: tiny activations, and recompute costs CPU time
  baselines = model.baselines.to_dict()
  baselines["sliding_window"]["window"] = segment
  # LaCT's chunk: 4 segments. At one segment (16 tokens) its Muon steps per chunk made a
  # train step 3-10x any other core's on the CPU.
  baselines["lact"]["chunk_size"] = 4 * segment

  c = ml_collections.ConfigDict()
  c.preset = preset
  c.variants = VARIANTS
  c.seq_lens = (64,) if ci else (64, 128, 256, 512)
  c.pairs = (4,) if ci else (4, 8, 16, 32)
  c.base_seq_len = 64 if ci else 256  # where pairs are swept
  c.base_pairs = 4 if ci else 8  # where seq_lens are swept
  c.seeds = (0, 1) if ci else (0, 1, 2)
  # Zoology sweeps lr because MQAR learning is a sudden, lr- and seed-dependent transition:
  # full attention at 64 tokens, 1000 steps reached 1.00 at 3e-3 on seeds 1, 2 while 1e-2
  # stayed at 1/K on seed 1.
  c.lrs = (3e-3, 1e-2) if ci else (1e-3, 3e-3, 1e-2)
  # Vocabulary ranges (Zoology's key / value split, plus distractors); chance = 1 / num_values.
  # 16 each: at 64 each (width 64) full attention was still at 0.03 after 400 steps.
  c.num_keys = 16 if ci else 64
  c.num_values = 16 if ci else 64
  c.num_distractors = 16 if ci else 64
  c.segment = segment
  c.width = 32 if ci else 64
  c.depth = 2
  c.num_heads = 2
  c.ttt = ttt
  c.baselines = baselines
  c.steps = 1000 if ci else 2000
  c.batch = 16 if ci else 32
  c.warmup_steps = 100
  c.weight_decay = 0.01
  c.grad_clip = 1.0
  c.log_every = 50
  c.eval_batches = 8  # held-out queries: eval_batches * batch * pairs
  c.lock()
  return c
