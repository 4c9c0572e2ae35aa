"""The evaluation's shared reporting: t-intervals over seeds, rows, formats."""

import json
import math

import pytest

from ttt_jax.evaluation import report


def test_interval_is_the_t_interval_over_seeds():
  """mean ± t(0.975, n-1) s / sqrt(n); t(0.975, 2) = 4.3027 from the printed t-table."""
  mean, lo, hi = report.interval([1.0, 2.0, 3.0])
  assert mean == 2.0
  assert hi - mean == pytest.approx(4.3027 * 1.0 / math.sqrt(3), rel=1e-4)
  assert mean - lo == pytest.approx(hi - mean)
  assert report.interval([0.5]) == (0.5, None, None)  # one seed: no interval claimed
  assert report.interval([0.0, 0.0, 0.0]) == (0.0, 0.0, 0.0)
  with pytest.raises(ValueError, match="non-empty 1-D"):
    report.interval([])


def test_rows_carry_the_contract_keys(tmp_path):
  r = report.row("video", "ttt_mlp", "swap_gain_later", [0.4, 0.5, 0.6], seconds=9)
  assert list(r) == ["task", "variant", "seconds", "metric", "mean", "ci_low", "ci_high",
                     "n_seeds"]
  assert r["n_seeds"] == 3 and r["mean"] == pytest.approx(0.5)
  assert report.separated(r) == "above 0"
  recall = report.row("recall", "mamba2", "accuracy", [0.5, 0.7], seq_len=256, pairs=16)
  assert (recall["seconds"], recall["seq_len"], recall["pairs"]) == (None, 256, 16)
  fixed = report.fixed_row("video", "ground_truth", "consistency", 1.0, seconds=9)
  assert (fixed["ci_low"], fixed["ci_high"], fixed["n_seeds"]) == (None, None, 0)
  assert report.separated(fixed) == "no interval"
  assert report.separated(report.row("video", "local", "g", [0.0, 0.0])) == "holds 0"
  assert report.separated(report.row("video", "x", "g", [-1.0, -1.1, -0.9])) == "below 0"
  assert report.fmt(r) == "0.5 ± 0.25" and report.fmt(fixed) == "1" and report.fmt(None) == "-"
  path = tmp_path / "results.json"
  report.write_json([r, fixed], path)
  assert json.loads(path.read_text()) == [r, fixed]
  assert report.markdown_table(("a", "b"), [("1", "2")]) == ["| a | b |", "|---|---|",
                                                             "| 1 | 2 |"]
