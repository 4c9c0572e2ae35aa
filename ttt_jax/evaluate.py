"""Evaluate the sequence layers: `python -m ttt_jax.evaluate --task=video|recall --preset=...`.

    python -m ttt_jax.evaluate --task=video --preset=ci --workdir=workdirs/eval
    python -m ttt_jax.evaluate --task=recall --preset=full --workdir=workdirs/eval --seeds=3,4,5

Tasks (ttt_jax/evaluation/): `video`, the paper's comparison between a positive
and a negative control on toy cartoons (video.py); `recall`, multi-query
associative recall through the same slot cores (recall.py). Presets are
ml_collections configs: configs/evaluate_<task>.py:<preset>. The same command
resumes (finished runs are skipped). W/results.json holds the rows of every
task run in W (`ttt_jax.evaluation.report`); W/results.md their tables.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import jax
import ml_collections
from absl import app, flags, logging

from ttt_jax import stages
from ttt_jax.evaluation import recall, report, video

TASKS = {"video": video.run, "recall": recall.run}


def load_preset(task: str, preset: str, config_dir: str | pathlib.Path = "configs",
                seeds: Sequence[int] | None = None,
                variants: Sequence[str] | None = None) -> ml_collections.ConfigDict:
  """configs/evaluate_<task>.py:<preset>, with seeds and variants overridden if given."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; choose from {tuple(TASKS)}")
  config = stages.load_config(pathlib.Path(config_dir) / f"evaluate_{task}.py", preset)
  with config.unlocked():
    if seeds:
      config.seeds = tuple(int(s) for s in seeds)
    if variants:
      config.variants = tuple(variants)
  return config


def run(task: str, config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        config_dir: str | pathlib.Path = "configs") -> list[dict[str, Any]]:
  """Runs one task; W/results.json keeps the other tasks' rows and replaces this one's."""
  root = pathlib.Path(workdir)
  rows = (TASKS[task](config, root, config_dir) if task == "video"
          else TASKS[task](config, root))
  path = root / "results.json"
  kept = [r for r in (json.loads(path.read_text()) if path.exists() else [])
          if r["task"] != task]
  report.write_json(kept + rows, path)
  parts = [p.read_text() for t in TASKS if (p := root / f"results_{t}.md").exists()]
  (root / "results.md").write_text("\n\n".join(parts))
  return rows


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if not jax.config.jax_compilation_cache_dir:
    # Seeds of a variant compile the same programs: the later ones load them.
    jax.config.update("jax_compilation_cache_dir",
                      str(pathlib.Path(FLAGS.workdir).absolute() / "jax_cache"))
  config = load_preset(FLAGS.task, FLAGS.preset, FLAGS.config_dir, FLAGS.seeds, FLAGS.variants)
  run(FLAGS.task, config, FLAGS.workdir, FLAGS.config_dir)
  print((pathlib.Path(FLAGS.workdir) / f"results_{FLAGS.task}.md").read_text())


FLAGS = flags.FLAGS

if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Where runs, results.json/.md and plots go.")
  flags.DEFINE_enum("task", "video", list(TASKS), "video: the layer comparison on toy "
                    "cartoons; recall: associative recall through the same cores.")
  flags.DEFINE_string("preset", "ci", "A preset of configs/evaluate_<task>.py (ci | full).")
  flags.DEFINE_list("seeds", None, "Seeds to run instead of the preset's (e.g. 3,4,5).")
  flags.DEFINE_list("variants", None, "A subset of the preset's variants.")
  flags.DEFINE_string("config_dir", "configs", "Where evaluate_<task>.py and the stage "
                      "configs live.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
