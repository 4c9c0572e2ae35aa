"""Run the whole curriculum (3 -> 9 -> 18 -> 30 -> 63 s), then sample a one-minute video.

    python -m ttt_jax.curriculum --preset=tiny --workdir=workdirs/tiny

Each stage trains in <workdir>/<N>s from the previous stage's latest params
(interrupted stages resume; finished ones are skipped). Afterwards:
<workdir>/loss.png (all stages) and <workdir>/samples/one_minute.{mp4,gif},
sampled from --storyboard or, on toy data, from <workdir>/storyboard.jsonl
(captions of a toy video the model never saw).
"""

from __future__ import annotations

import json
import pathlib

import jax

from absl import app, flags, logging

from ttt_jax import metrics, preflight, sample, train
from ttt_jax import stages as stages_lib
from ttt_jax.data import toy_cartoons

_PRESET = flags.DEFINE_string("preset", "tiny", "Config preset of every stage (tiny | paper).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Root directory; one sub-directory per stage.")
_STAGES = flags.DEFINE_list("stages", ["3", "9", "18", "30", "63"], "Stage lengths in seconds.")
_CONFIG_DIR = flags.DEFINE_string("config_dir", "configs", "Where tom_jerry_<N>s.py live.")
_STORYBOARD = flags.DEFINE_string("storyboard", None, "Captions to sample the final video from "
                                  "(default with toy data: a held-out toy storyboard).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() "
                                 "first (multi-host: every host runs the same command).")


def run(preset: str, workdir: str | pathlib.Path, stages: list[int],
        config_dir: str | pathlib.Path = "configs", storyboard: str | None = None) -> dict:
  workdir = pathlib.Path(workdir)
  lead = jax.process_index() == 0  # one process writes the storyboard, plot, video, summary
  dirs = [workdir / f"{seconds}s" for seconds in stages]
  configs = stages_lib.chain([stages_lib.load_stage_config(config_dir, s, preset)
                              for s in stages], dirs)
  for config in configs:  # every stage checked before the first one trains
    preflight.check(config, "train", init_exists=False)
  summary, runs = {}, []
  for config, stage_dir in zip(configs, dirs):
    summary[f"{config.seconds}s"] = train.train(config, stage_dir)
    runs.append((f"{config.seconds}s", metrics.read_metrics(stage_dir / "metrics.jsonl")))
  if lead:
    metrics.plot_loss(runs, workdir / "loss.png")

  last, last_dir = configs[-1], str(dirs[-1])
  data = last.data
  if storyboard:
    captions = sample.load_storyboard(storyboard)
  elif data.name == "toy_cartoons":  # the toy video just past the training set: never seen
    held_out = toy_cartoons.generate_video(toy_cartoons.ToyCartoonConfig(
        seconds=stages[-1], height=data.height, width=data.width, seed=data.seed,
        num_videos=data.num_videos + 1), data.num_videos)
    if lead:
      toy_cartoons.write_storyboard(held_out, workdir / "storyboard.jsonl")
    captions = list(held_out.captions)
  else:
    captions = None
    logging.warning("no --storyboard to sample from: trained %s, sampled nothing", stages)
  if captions:
    # Every process samples (the restore and the program are the same on all of them);
    # one writes the video.
    frames = sample.sample_video(last_dir, captions, progress=lead)
    if lead:
      summary["samples"] = [str(p) for p in sample.write_video(
          frames, workdir / "samples" / "one_minute", last.sample.fps)]
  if lead:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def main(argv: list[str]) -> None:
  if _DISTRIBUTED.value:  # first: process ids and the global device set exist from here on
    jax.distributed.initialize()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  print(json.dumps(run(_PRESET.value, _WORKDIR.value, [int(s) for s in _STAGES.value],
                       _CONFIG_DIR.value, _STORYBOARD.value), indent=2))


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
