"""Smoke test of benchmarks/ttt_layer.py: a tiny run emits well-formed JSON on stdout."""

import json
import math
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_ttt_layer_benchmark_json():
  proc = subprocess.run(
      [sys.executable, "benchmarks/ttt_layer.py", "--seq_lens=128,256", "--K=16", "--d=16",
       "--repeats=1"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  doc = json.loads(proc.stdout)

  assert {"device", "platform", "device_kind", "jax_version", "config"} <= doc.keys()
  rows = doc["results"]
  assert sorted((r["op"], r["seq_len"]) for r in rows) == [
      ("ttt_linear", 128), ("ttt_linear", 256), ("ttt_mlp", 128), ("ttt_mlp", 256)]
  positive = lambda x: isinstance(x, (int, float)) and math.isfinite(x) and x > 0
  for r in rows:
    assert (r["K"], r["d"], r["NC"]) == (16, 16, r["seq_len"] // 16)
    for key in ("seconds", "tokens_per_s", "head_tokens_per_s", "flops", "flops_per_s"):
      assert positive(r["fwd"][key]), (r["op"], key)
    for key in ("seconds", "tokens_per_s", "head_tokens_per_s"):
      assert positive(r["fwd_bwd"][key]), (r["op"], key)
    assert positive(r["compile_s"]["fwd"]) and positive(r["compile_s"]["fwd_bwd"])
    for phase in ("fwd", "fwd_bwd"):
      mem = r["memory_mib"][phase]
      assert {"temp", "argument", "output", "peak_in_use"} <= mem.keys()
      assert positive(mem["argument"]) and positive(mem["output"])
