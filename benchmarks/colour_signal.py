"""How much of the evaluation base's loss the first caption's colours explain, by timestep.

    python benchmarks/colour_signal.py --workdir=WORKDIR [--preset=full] [--heldout=24]
        [--timesteps=100,300,500,700,800,850,900,950,990] [--out=colour_signal.json]

WORKDIR is a `python -m ttt_jax.evaluate --preset=PRESET` workdir whose shared
base (local attention alone, 3 s) has finished. On --heldout held-out 3 s
storyboards, each row gives, at one diffusion timestep t, the base's held-out
loss with the true captions and its swap gain: the loss with the first
caption's colours swapped for wrong ones minus the loss with the true ones,
same frames and noise (as `ttt_jax.evaluate.swap_gains`). In a one-scene clip the
caption is in context, so the gain is what knowing the colours is worth to
the loss: the most that a perfect memory of scene 1 could earn a later
segment, whose caption names no colour. `uniform` is the same over
timesteps spread evenly over the schedule, as training samples them.

One JSON document goes to stdout (and to --out); progress goes to stderr.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

from absl import app, flags, logging
import tqdm

from bench_utils import emit  # this directory
from ttt_jax import evaluate

_WORKDIR = flags.DEFINE_string("workdir", None, "An evaluate workdir with a finished base.",
                               required=True)
_PRESET = flags.DEFINE_enum("preset", "full", list(evaluate.PRESETS),
                            "The preset the workdir was run with (its model and frame size).")
_HELDOUT = flags.DEFINE_integer("heldout", 24, "Held-out 3 s storyboards.")
_TIMESTEPS = flags.DEFINE_list("timesteps", ["100", "300", "500", "700", "800", "850", "900",
                                             "950", "990"], "Diffusion timesteps, one row each.")
_UNIFORM = flags.DEFINE_integer("uniform_points", 20, "Evenly spaced timesteps of `uniform`.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON document to this file.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  root = pathlib.Path(_WORKDIR.value)
  base = root / "runs" / "base" / "3s"
  if not (base / "base.json").is_file():
    raise app.UsageError(f"--workdir={root}: no finished base ({base / 'base.json'} missing); "
                         f"run python -m ttt_jax.evaluate --workdir={root} first")
  preset = dataclasses.replace(evaluate.PRESETS[_PRESET.value], heldout=_HELDOUT.value)
  config = evaluate.stage_config(preset, "local", 0, 3, "", root / "data")
  loss_fn = evaluate.segment_loss_fn(config, evaluate.load_model(config, base))
  videos = evaluate.heldout_videos(preset, 3)
  swapped = evaluate.swapped_videos(videos)
  num_steps = config.diffusion.num_steps
  uniform = tuple(int((i + 0.5) * num_steps / _UNIFORM.value) for i in range(_UNIFORM.value))
  points = [(int(t), (int(t),)) for t in _TIMESTEPS.value] + [("uniform", uniform)]

  rows = []
  for name, timesteps in tqdm.tqdm(points, desc="timesteps"):
    loss = float(loss_fn(videos, timesteps)[0])  # a 3 s clip is one segment
    gain = float(loss_fn(swapped, timesteps)[0]) - loss  # swap_gains, the true loss reused
    rows.append({"t": name, "loss": loss, "swap_gain": gain, "share": gain / loss})
    logging.info("%s", rows[-1])
  emit({"workdir": str(root.resolve()), "preset": _PRESET.value, "heldout": _HELDOUT.value,
        "uniform_timesteps": list(uniform)}, rows, _OUT.value)


if __name__ == "__main__":
  app.run(main)
