"""notebooks/sample_video.ipynb runs top to bottom against a trained workdir."""

import json
import pathlib

from tests.conftest import small_config
from ttt_jax import train

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "sample_video.ipynb"


def test_sample_notebook_runs(tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  train.train(small_config(3, steps=2), workdir)
  cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
  namespace = {}
  for i, cell in enumerate(cells):
    source = "".join(cell["source"])
    if i == 0:  # the parameter cell: point it at the test workdir, keep it short
      source += f"\nWORKDIR = {str(workdir)!r}\nSTORYBOARD = STORYBOARD[:2]\nSTEPS = 2\n"
    exec(compile(source, f"{NOTEBOOK.name}[{i}]", "exec"), namespace)
  assert namespace["frames"].shape == (97, 32, 48, 3)  # two 3 s segments: 2 * 48 + 1 frames
  assert all(p.exists() and p.stat().st_size > 0 for p in namespace["paths"])
