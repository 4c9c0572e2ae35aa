"""Per-step metrics as JSON lines, and the loss-curve plot."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


class MetricsWriter:
  """Appends {"step": ..., ...} lines to `path`; on resume drops lines past `resume_step`."""

  def __init__(self, path: str | pathlib.Path, resume_step: int = 0):
    self.path = pathlib.Path(path)
    kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
    self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

  def write(self, step: int, **values: Any) -> None:
    with self.path.open("a") as f:
      f.write(json.dumps({"step": step, **values}) + "\n")


def read_metrics(path: str | pathlib.Path) -> list[dict[str, Any]]:
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(runs: Sequence[tuple[str, list[dict[str, Any]]]], out: str | pathlib.Path) -> None:
  """Training loss of one or more consecutive runs (e.g. curriculum stages) -> PNG."""
  fig, ax = plt.subplots(figsize=(8, 4.5))
  offset = 0
  for name, rows in runs:
    rows = [r for r in rows if "loss" in r]
    if not rows:
      continue
    steps = [offset + r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label=name, linewidth=1.2)
    offset = steps[-1]
  ax.set_xlabel("step")
  ax.set_ylabel("v-prediction loss")
  ax.set_yscale("log")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=120)
  plt.close(fig)
