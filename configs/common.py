"""The shared config of every curriculum stage (3 -> 9 -> 18 -> 30 -> 63 s).

Presets (the text after `:` in `--config=configs/tom_jerry_9s.py:tiny`):
  paper  CogVideoX-5B + TTT-MLP at 480x720, the paper's recipe and batch 64
         (the TPU-pod job), on your storyboard videos prepared with the real
         CogVideoX VAE and T5 (`python -m ttt_jax.data.prepare`).
  tiny   the same pipeline shrunk to run every stage in minutes on a 2-core
         CPU: a 2-block, 64-wide DiT trained from scratch on toy cartoons.

Stage recipe (paper Sec. 4): the 3 s stage fine-tunes everything, starting
from pretrained CogVideoX weights in the paper preset (`model.pretrained`; new TTT
parameters at a 10x learning rate); later stages start from the previous
stage's weights and train only attention q/k/v/o, the TTT layers and their
gates. A learning rate of 0 freezes a parameter group.
"""

from __future__ import annotations

import ml_collections

# stage seconds -> (paper steps, tiny steps, previous stage)
STAGES = {3: (5000, 800, None), 9: (5000, 120, 3), 18: (1000, 50, 9), 30: (1000, 30, 18),
          63: (250, 24, 30)}
PRESETS = ("paper", "tiny")


def get_config(seconds: int, arg: str | None) -> ml_collections.ConfigDict:
  preset = arg or "paper"
  if preset not in PRESETS:
    raise ValueError(f"unknown config preset {preset!r} for the {seconds} s stage; "
                     f"choose from {PRESETS}")
  paper_steps, tiny_steps, previous = STAGES[seconds]
  tiny = preset == "tiny"
  first_stage = previous is None

  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seconds = seconds
  c.seed = 0
  # Workdir of the previous stage whose latest params initialise this one
  # ('' = fresh init). `ttt_jax.curriculum` fills it in stage by stage.
  c.init_from = ""
  # True: init_from may lack the global slot's parameters (model.sequence_layer and its
  # gates), which then start fresh: a base trained without that layer is given it, as the
  # paper gives CogVideoX its TTT layers. Every other parameter must still match.
  c.init_new_layers = False

  c.data = ml_collections.ConfigDict(dict(
      # "toy_cartoons": the embedded procedural set, generated and encoded on first use
      # into data.dir (default <workdir>/data); "storyboard": your videos, prepared into
      # data.dir by python -m ttt_jax.data.prepare (one folder per clip length).
      name="toy_cartoons" if tiny else "storyboard",
      dir="" if tiny else "data/tom_jerry",
      num_videos=8 if tiny else 10_000,  # toy cartoons only
      colours="",  # toy cartoons: comma-separated character colours ('' = the whole palette)
      # Toy cartoons: comma-separated house paints (toy_cartoons.PAINTS; '' = unpainted):
      # every video's walls and floor take two, named in its first caption only, or in
      # every caption with restate_paint (the oracle storyboard).
      paints="",
      restate_paint=False,
      height=64 if tiny else 480,
      width=96 if tiny else 720,
      seed=0,
      text_len=16 if tiny else 458,  # tokens per segment caption (paper: 63 s = 351,168 tokens)
      text_dim=32 if tiny else 4096,  # text encoder width (T5-XXL: 4096)
      # The frozen encoders. Paper: the CogVideoX-5B diffusers folder (THUDM/CogVideoX-5b:
      # its vae/, text_encoder/ and tokenizer/) holds the VAE and T5 v1.1 XXL.
      codec="toy" if tiny else "cogvideox",
      codec_path="" if tiny else "weights/CogVideoX-5b",
      text_encoder="toy" if tiny else "t5",
      text_encoder_path="" if tiny else "weights/CogVideoX-5b",
      prefetch=2,  # batches read ahead (each a batch of clips in host memory)
  ))

  # Tokens of one 3 s segment: its caption and 12 latent frames of (h/16) x (w/16) patches.
  segment_tokens = c.data.text_len + 12 * (c.data.height // 16) * (c.data.width // 16)
  c.model = ml_collections.ConfigDict(dict(
      variant="tiny" if tiny else "cogvideox-5b",
      # CogVideoX weights the first stage starts from ('' = random init): a checkpoint
      # written by `python -m ttt_jax.convert cogvideox --src=DIR --dst=OUT`, or the
      # diffusers folder DIR itself (converted on the fly). The paper recipe fine-tunes
      # CogVideoX-5B: put the diffusers download (THUDM/CogVideoX-5b, its transformer/
      # is enough) in weights/CogVideoX-5b and convert it to weights/cogvideox-5b-jax,
      # or pass --config.model.pretrained=PATH. TTT layers and gates start fresh (gates
      # tanh 0.1, fast weights N(0, 0.02^2)). Later stages load the previous stage.
      pretrained="weights/cogvideox-5b-jax" if first_stage and not tiny else "",
      # The global slot of every block (ttt_jax/layers/sequence.py): "ttt" (model.ttt), "local"
      # (none), or a baseline of the paper's comparison with its options in model.baselines.
      sequence_layer="ttt",
      scan_layers=True,
      remat_policy="none" if tiny else "full",
      dtype="float32" if tiny else "bfloat16",
      attention_impl="auto",  # splash on TPU, cudnn on GPU, else chunked (long) / xla (short)
      ttt=dict(
          inner="mlp",
          impl="xla",  # "pallas": the TPU/GPU fused kernels (pallas_kernels/), by backend
          mini_batch_size=16 if tiny else 64,
          base_lr=0.1,
          remat_group=4 if tiny else 16,
          matmul_dtype="float32" if tiny else "bfloat16",
      ),
      baselines=dict(
          # One 3 s segment of tokens: what local attention sees, here across boundaries.
          sliding_window=dict(window=segment_tokens),
          full_attention=dict(),
          mamba2=dict(state_dim=64, chunk_size=64),
          gated_deltanet=dict(chunk_size=64),
          lact=dict(chunk_size=segment_tokens, muon_steps=5),
      ),
  ))

  c.diffusion = ml_collections.ConfigDict(dict(
      num_steps=1000,
      text_dropout=0.1,  # classifier-free guidance: drop the caption of 10% of examples
      # Where training draws t (ttt_jax.diffusion.TimestepDistribution): "uniform" (the
      # paper's), "logit_normal" (loc, scale) or "shifted" (shift), both leaning to high
      # noise for loc > 0 / shift > 1.
      timesteps=dict(kind="uniform", loc=0.0, scale=1.0, shift=1.0),
  ))

  if tiny:
    lr = dict(other=2e-3, attn_qkvo=2e-3, ttt=2e-3) if first_stage else \
        dict(other=0.0, attn_qkvo=1e-3, ttt=1e-3)
  else:
    lr = dict(other=1e-5, attn_qkvo=1e-5, ttt=1e-4) if first_stage else \
        dict(other=0.0, attn_qkvo=1e-5, ttt=1e-5)
  c.optim = ml_collections.ConfigDict(dict(
      lr=lr, warmup_steps=20 if tiny else 100, b1=0.9, b2=0.95, weight_decay=1e-4,
      grad_clip=1.0 if tiny else 0.1,
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=tiny_steps if tiny else paper_steps,
      batch_size=(4 if first_stage else 2) if tiny else 64,
      # Gradient accumulation: the batch is processed in this many parts, one at a time
      # (the same update; activations of batch / microbatches examples at once).
      microbatches=1 if tiny else 4,
      log_every=10 if tiny else 10,
      ckpt_every=50 if tiny else 250,
      keep_checkpoints=2,
      # A NaN/inf loss or gradient norm: "stop" (non-zero exit, the last checkpoint kept)
      # or "skip" (the update is not applied; skipped steps are counted in metrics).
      nonfinite="stop",
  ))

  c.sample = ml_collections.ConfigDict(dict(
      sampler="dpmpp_2m_sde", steps=25 if tiny else 50, guidance_scale=6.0,
      dynamic_cfg=True, fps=16, seed=0,
      # Sampling is one video: every device in one context group (heads must divide).
      mesh=dict(data=1, fsdp=1, context=-1, tensor=1),
  ))

  # ('data', 'fsdp', 'context', 'tensor'); -1: all remaining devices. The batch splits over
  # data x fsdp; parameters over fsdp x context (model width) and tensor (heads, MLP); the
  # sequence over context (ttt_jax/parallel/). Paper: 256 chips = 1 x 16 x 16, a context
  # group of 16 chips per video, 4 videos per group in 4 microbatches (train.microbatches):
  # 21,948 tokens and 3 heads a chip at 63 s (benchmarks/paper_scale.py, RESULTS.md).
  c.mesh = ml_collections.ConfigDict(
      dict(data=-1, fsdp=1, context=1, tensor=1) if tiny else
      dict(data=-1, fsdp=16, context=16, tensor=1))
  c.lock()
  return c
