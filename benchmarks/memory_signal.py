"""What knowing the first caption's paint is worth to the evaluation base's loss, by timestep.

    python benchmarks/memory_signal.py --workdir=WORKDIR [--preset=ci] [--heldout=24]
        [--timesteps=100,300,500,700,800,850,900,950,990] [--out=memory_signal.json]

WORKDIR is a `python -m ttt_jax.evaluate --task=video --preset=PRESET` workdir
whose shared base (local attention alone, 3 s) has finished. On --heldout
held-out 3 s storyboards, each row gives, at one diffusion timestep t, the
base's held-out loss with the true captions and its swap gain: the loss with
the paint swapped for another minus with the true one, same frames and noise
(`ttt_jax.evaluation.video_scores.swap_gains`). In a one-scene clip the
caption is in context, so the gain is what knowing the paint is worth: the
most a perfect memory of scene 1 could earn a later segment, whose caption
does not name it. The rows `uniform`, `base` and `stage` give its share of the
loss over those timestep distributions (`memory_signal`: uniform t, the base's
and the stages' draws).

One JSON document goes to stdout (and to --out); progress goes to stderr.
"""

from __future__ import annotations

import pathlib
from typing import Sequence

from absl import app, flags, logging
import tqdm

from bench_utils import emit  # this directory
from ttt_jax import evaluate
from ttt_jax.evaluation import video
from ttt_jax.evaluation import video_scores as vs

_WORKDIR = flags.DEFINE_string("workdir", None, "An evaluate workdir with a finished base.",
                               required=True)
_PRESET = flags.DEFINE_string("preset", "ci", "The video preset the workdir was run with.")
_HELDOUT = flags.DEFINE_integer("heldout", 24, "Held-out 3 s storyboards.")
_TIMESTEPS = flags.DEFINE_list("timesteps", ["100", "300", "500", "700", "800", "850", "900",
                                             "950", "990"], "Diffusion timesteps, one row each.")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON document to this file.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  root = pathlib.Path(_WORKDIR.value)
  base = root / "runs" / "base" / "3s"
  if not (base / "checkpoints").is_dir():
    raise app.UsageError(f"--workdir={root}: no finished base ({base / 'checkpoints'} "
                         f"missing); run python -m ttt_jax.evaluate --workdir={root} first")
  preset = evaluate.load_preset("video", _PRESET.value)
  config = video.base_config(preset, root / "data")
  loss_fn = vs.segment_loss_fn(config, vs.load_model(config, base))
  videos = vs.heldout_videos(config.data, 3, _HELDOUT.value)
  swapped = vs.swapped_videos(videos, config.data.paints.split(","))

  rows = []
  for t in tqdm.tqdm([int(t) for t in _TIMESTEPS.value], desc="timesteps"):
    loss, gain = (float(x[0]) for x in vs.swap_gains(loss_fn, videos, swapped, (t,)))
    rows.append({"t": t, "loss": loss, "swap_gain": gain, "share": gain / loss})
    logging.info("%s", rows[-1])
  shares = vs.memory_signal(loss_fn, videos, swapped, video.signal_distributions(preset),
                            config.diffusion.num_steps)
  rows += [{"t": name.removeprefix("memory_share_"), "share": share}
           for name, share in shares.items()]
  emit({"workdir": str(root.resolve()), "preset": _PRESET.value, "heldout": _HELDOUT.value,
        "signal_edges": list(vs.SIGNAL_EDGES)}, rows, _OUT.value)


if __name__ == "__main__":
  app.run(main)
