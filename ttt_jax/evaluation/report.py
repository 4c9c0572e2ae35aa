"""What every evaluation task reports: rows with 95 % intervals over seeds, tables, JSON.

A results row is one (task, variant, setting, metric):

    {"task": "video" | "recall", "variant": ..., "seconds": int | None, "metric": ...,
     "mean": float, "ci_low": float | None, "ci_high": float | None, "n_seeds": int}

plus the task's own setting keys (recall: "seq_len", "pairs"). Rows measured
once, without seeds (ground truth, probe validation), have null intervals and
n_seeds 0.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Iterable, Sequence

import numpy as np
import scipy.stats


def interval(values: Sequence[float]) -> tuple[float, float | None, float | None]:
  """(mean, 95 % t-interval low, high) over seeds; no interval from one seed."""
  x = np.asarray(values, np.float64)
  if x.ndim != 1 or not len(x):
    raise ValueError(f"interval needs a non-empty 1-D list of values, got shape {x.shape}")
  mean = float(x.mean())
  if len(x) < 2:
    return mean, None, None
  half = float(scipy.stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
  return mean, mean - half, mean + half


def row(task: str, variant: str, metric: str, values: Sequence[float], *,
        seconds: int | None = None, **setting: Any) -> dict[str, Any]:
  """A results row from one value per seed (`n_seeds` = len(values))."""
  mean, lo, hi = interval(values)
  return dict(task=task, variant=variant, seconds=seconds, **setting, metric=metric, mean=mean,
              ci_low=lo, ci_high=hi, n_seeds=len(values))


def fixed_row(task: str, variant: str, metric: str, value: float, *, seconds: int | None = None,
              **setting: Any) -> dict[str, Any]:
  """A results row measured once, not over seeds (ground truth, a probe's validation)."""
  return dict(task=task, variant=variant, seconds=seconds, **setting, metric=metric,
              mean=float(value), ci_low=None, ci_high=None, n_seeds=0)


def separated(r: dict[str, Any]) -> str:
  """'above 0', 'below 0' or 'holds 0': where a row's 95 % interval lies."""
  if r["ci_low"] is None:
    return "no interval"
  if r["ci_low"] > 0:
    return "above 0"
  if r["ci_high"] < 0:
    return "below 0"
  return "holds 0"


def fmt(r: dict[str, Any] | None) -> str:
  """'mean ± half-width' of a row (its mean alone without an interval; '-' for none)."""
  if r is None:
    return "-"
  mean = r["mean"]
  text = f"{mean:.3g}" if abs(mean) < 1e4 else f"{mean:.3e}"
  return text + (f" ± {(r['ci_high'] - r['ci_low']) / 2:.2g}" if r["ci_low"] is not None
                 else "")


def markdown_table(header: Sequence[str], lines: Iterable[Sequence[str]]) -> list[str]:
  """A markdown table's lines."""
  return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(cells) + " |" for cells in lines])


def write_json(value: Any, path: str | pathlib.Path) -> None:
  """A JSON file (results.json, a run's eval.json), written whole: a reader, or a rerun
  after an interruption, never sees half a file."""
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(value, indent=1))
  tmp.replace(path)
