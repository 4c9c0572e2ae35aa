"""Smoke tests of the benchmark scripts: tiny runs emit well-formed JSON on stdout."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

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


def test_ttt_kernels_benchmark_json_and_guard():
  """XLA vs kernel rows (kernels in interpret mode off their platform, and flagged so)."""
  run = lambda *flags: subprocess.run(
      [sys.executable, "benchmarks/ttt_kernels.py", "--seq_lens=32", "--K=16", "--d=16",
       "--repeats=1", *flags], cwd=REPO, capture_output=True, text=True, timeout=300,
      check=False)
  refused = run()  # impl 'pallas' on a CPU backend without --interpret
  assert refused.returncode != 0 and "pass --interpret" in refused.stderr
  refused = run("--impls=pallas_gpu")
  assert refused.returncode != 0 and "'pallas_gpu' runs pallas_gpu, which cannot run natively on this 'cpu' backend" in refused.stderr
  proc = run("--interpret", "--impls=xla,pallas,pallas_gpu")
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = json.loads(proc.stdout)["results"]
  assert sorted((r["kind"], r["impl"], r["runs"]) for r in rows) == [
      (kind, impl, runs) for kind in ("linear", "mlp") for impl, runs in [
          ("pallas", "pallas_tpu"), ("pallas_gpu", "pallas_gpu"), ("xla", "xla")]]
  for r in rows:
    assert r["interpret"] == (r["impl"] != "xla")
    assert r["NC"] == 2 and r["fwd"]["flops"] > 0
    assert math.isfinite(r["fwd_bwd"]["tokens_per_s"]) and r["fwd_bwd"]["tokens_per_s"] > 0


# A stand-in for the release's op module, with its interface (inputs [B, H, NC, K, d], eta
# [B, H, NC, K, K] with the per-token rate in every row, output [B, NC, K, H, d]) and the inner
# gradient by torch autograd, so the script's layout conversion and agreement check are tested
# without the release's checkout (not available offline).
_STAND_IN_OP = """
import torch
import torch.nn.functional as F


def ttt_mlp(XK, XQ, XV, eta, ln_w, ln_b, W1, b1, W2, b2, checkpoint_group_size):
  d = XK.shape[-1]
  ln = lambda z: torch.stack([F.layer_norm(z[:, h], (d,), ln_w[h], ln_b[h], eps=1e-8)
                              for h in range(z.shape[1])], 1)
  g = lambda x, W1, b1, W2, b2: F.gelu(x @ W1 + b1, approximate="tanh") @ W2 + b2
  W, out = (W1, b1, W2, b2), []
  for n in range(XK.shape[2]):
    xk, xq, xv, lr = XK[:, :, n], XQ[:, :, n], XV[:, :, n], eta[:, :, n, -1]
    with torch.enable_grad():  # the inner gradient, also when called under no_grad
      W = tuple(w if w.requires_grad else w.detach().requires_grad_() for w in W)
      loss = (0.5 * lr * ((ln(g(xk, *W)) - (xv - xk)) ** 2).sum(-1)).sum()
      W = tuple(w - dw for w, dw in zip(W, torch.autograd.grad(loss, W, create_graph=True)))
    out.append(xq + ln(g(xq, *W)))
  return torch.stack(out, 1).permute(0, 1, 3, 2, 4)
"""


def test_release_op_benchmark_json_and_guard(tmp_path):
  """Side by side with a stand-in release op: the two agree and both are timed; a checkout
  without the op is refused by name."""
  run = lambda release_dir: subprocess.run(
      [sys.executable, "benchmarks/release_op.py", f"--release_dir={release_dir}",
       "--seq_len=64", "--K=16", "--d=8", "--H=2", "--B=2", "--remat_group=2", "--repeats=1"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  refused = run(tmp_path)
  assert refused.returncode != 0 and "no ttt/models/ssm/ops/ttt_mlp.py there" in refused.stderr
  op_file = tmp_path / "ttt/models/ssm/ops/ttt_mlp.py"
  op_file.parent.mkdir(parents=True)
  op_file.write_text(_STAND_IN_OP)
  proc = run(tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  row = json.loads(proc.stdout)["results"][0]
  assert row["max_abs_diff"] < 1e-5 and row["NC"] == 4  # fp32, 4 steps of 16 tokens
  for mode in ("compiled", "eager"):
    assert row["release"][mode]["fwd"] > 0 and row["release"][mode]["fwd_bwd"] > 0
  assert row["ttt_jax"]["fwd_bwd"]["seconds"] > 0
  assert row["speedup_vs_compiled"]["fwd_bwd"] == pytest.approx(
      row["release"]["compiled"]["fwd_bwd"] / row["ttt_jax"]["fwd_bwd"]["seconds"])


def test_convert_memory_benchmark_json():
  """A small synthetic sharded checkpoint converts in a subprocess; its peak RSS is reported."""
  proc = subprocess.run(
      [sys.executable, "benchmarks/convert_memory.py", "--width=128", "--depth=2", "--text_dim=32",
       "--shard_mb=1"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  assert row["shards"] > 1 and row["depth"] == 2
  assert 0 < row["weights_gb"] <= row["output_gb"] * 1.01 and row["peak_rss_gb"] > row["weights_gb"]
  assert math.isfinite(row["peak_over_weights"]) and row["seconds"] > 0


def test_vae_memory_benchmark_json():
  """A narrow VAE streams two lengths through decode_chunks; RSS peaks come back as JSON."""
  proc = subprocess.run(
      [sys.executable, "benchmarks/vae_memory.py", "--nocompiled", "--latent_frames=1,5",
       "--latent_size=8,12"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  runs = row["streamed"]["runs"]
  assert [r["latent_frames"] for r in runs] == [1, 5] and [r["frames"] for r in runs] == [1, 17]
  assert all(r["peak_rss_gb"] > 0 and r["chunks"] >= 1 for r in runs)
  assert "compiled" not in row


def test_attention_benchmark_json():
  """Small windows run for every CPU impl; the paper window is compiled only, dense vs chunked."""
  proc = subprocess.run(
      [sys.executable, "benchmarks/attention.py", "--seq_lens=100,256", "--H=2", "--d=16",
       "--repeats=1"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = json.loads(proc.stdout)["results"]
  key = lambda r: (r["impl"], r["seq_len"], r["executed"])
  assert sorted(map(key, rows)) == [("chunked", 100, True), ("chunked", 256, True),
                                    ("chunked", 17776, False), ("xla", 100, True),
                                    ("xla", 256, True), ("xla", 17776, False)]
  for r in rows:
    assert all(r["memory_mib"][phase]["argument"] > 0 for phase in ("fwd", "fwd_bwd"))
    if r["executed"]:
      assert r["fwd"]["seconds"] > 0 and r["fwd_bwd"]["tokens_per_s"] > 0
  paper = {r["impl"]: r["memory_mib"]["fwd_bwd"]["temp"] for r in rows if not r["executed"]}
  assert paper["chunked"] < paper["xla"] / 50  # ~2 GiB vs ~170 GiB of scores


def test_train_step_benchmark_json():
  """One full training step (fwd, bwd, AdamW) of a minimal DiT: one JSON line, all positive."""
  proc = subprocess.run(
      [sys.executable, "benchmarks/train_step.py", "--width=32", "--depth=1", "--heads=2",
       "--seconds=3", "--latent_h=4", "--latent_w=4", "--text_len=8", "--text_dim=16",
       "--dtype=float32", "--remat=none", "--preset=tiny", "--repeats=1"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 1
  row = json.loads(lines[0])
  assert {"device", "platform", "device_kind", "jax_version"} <= row.keys()
  assert row["config"]["width"] == 32 and row["config"]["depth"] == 1
  positive = lambda x: isinstance(x, (int, float)) and math.isfinite(x) and x > 0
  for key in ("param_count", "seq_len", "tokens_per_step", "compile_s", "step_s", "tokens_per_s"):
    assert positive(row[key]), key
  assert row["seq_len"] == 13 * 2 * 2 + 8  # 13 latent frames of a 2x2 grid + one caption
  assert all(math.isfinite(loss) for loss in row["losses"]) and len(row["losses"]) == 2
  mem = row["memory_mib"]
  for key in ("temp", "argument", "output", "state"):
    assert positive(mem[key]), key
  assert mem["peak_in_use"] is None or positive(mem["peak_in_use"])  # None: the CPU reports none


@pytest.mark.slow  # ~40-60 s: one sharded compile of a narrow model at the paper's 480x720
def test_paper_scale_aot_json():
  """The AOT script compiles a stage on fake devices and prints one JSON line with its keys
  (a narrow 'tiny' model at the paper resolution, so it compiles in seconds)."""
  proc = subprocess.run(
      [sys.executable, "benchmarks/paper_scale.py", "--seconds=3", "--devices=4",
       "--mesh=1,1,4,1", "--batch=1", "--microbatches=1", "--variant=tiny"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
      env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
  assert proc.returncode == 0, proc.stderr[-4000:]
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  assert row["stage_s"] == 3 and row["devices"] == 4 and row["tokens_per_video"] == 18008
  assert row["mesh"] == {"data": 1, "fsdp": 1, "context": 4, "tensor": 1}
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes_per_device",
              "flops_per_step", "compile_s"):
    assert row[key] > 0, key
  # The jaxpr count sees the scans XLA's cost analysis counts once.
  assert row["flops_per_step"] > 10 * row["xla_cost_analysis_flops"]


@pytest.mark.slow  # ~70 s: three compiles of the tiny DiT's train step, each in a new process
def test_scaling_benchmark_json_and_slopes(tmp_path):
  """local attention at 3 and 9 s is measured and its slopes are those of the rows; at 18 s
  it is over the memory cap: compiled, not run. Full attention over the token cap is skipped
  before compiling. The plot is written. A run past its timeout is given up, and so are the
  longer lengths of its variant."""
  run = lambda *flags: subprocess.run(
      [sys.executable, "benchmarks/scaling.py", "--repeats=1", *flags],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  plot = tmp_path / "scaling.png"
  proc = run("--variants=local,full_attention", "--seconds=18,3,9", "--max_memory_gib=0.1",
             "--max_tokens_full_attention=100", f"--plot={plot}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  doc = json.loads(proc.stdout)
  assert {"device", "platform", "jax_version", "config", "results", "slopes"} <= doc.keys()
  rows = {(r["variant"], r["seconds"]): r for r in doc["results"]}
  assert list(rows) == [(v, s) for v in ("local", "full_attention") for s in (3, 9, 18)]
  assert [r["tokens"] for r in doc["results"][:3]] == [
      16 + 13 * 4 * 6, 3 * 16 + 37 * 4 * 6, 6 * 16 + 73 * 4 * 6]  # captions + frames of 4x6
  positive = lambda x: isinstance(x, (int, float)) and math.isfinite(x) and x > 0
  for s in (3, 9, 18):
    r = rows["local", s]
    assert r["width"] == "tiny"
    for field in ("compile_s", "temp_mib", "argument_mib", "output_mib", "flops"):
      assert positive(r[field]), (s, field)
    assert r["memory_mib"] == pytest.approx(r["temp_mib"] + r["argument_mib"] + r["output_mib"])
    fa = rows["full_attention", s]
    assert fa["skipped"] == f"{fa['tokens']} tokens > --max_tokens_full_attention=100"
    assert "memory_mib" not in fa  # never compiled
  local = [rows["local", 3], rows["local", 9]]
  assert all(r["skipped"] is None and positive(r["step_s"]) for r in local)
  over = rows["local", 18]  # ~120 MiB
  assert "step_s" not in over and over["memory_mib"] > 0.1 * 1024
  assert over["skipped"] == (
      f"compiled memory {over['memory_mib'] / 1024:.1f} GiB > --max_memory_gib=0.1")
  assert local[1]["flops"] > local[0]["flops"]

  slopes = doc["slopes"]["local/tiny"]
  assert slopes["points"] == 2
  for field in ("step_s", "memory_mib", "temp_mib"):
    want = np.polyfit(np.log([r["tokens"] for r in local]),
                      np.log([r[field] for r in local]), 1)[0]
    assert slopes[field] == pytest.approx(want), field
  assert doc["slopes"]["full_attention/tiny"] == {
      "points": 0, "step_s": None, "memory_mib": None, "temp_mib": None}
  assert plot.stat().st_size > 0

  proc = run("--variants=local", "--seconds=3,9", "--run_timeout_s=0.5")  # not even imported
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert [r["skipped"] for r in json.loads(proc.stdout)["results"]] == [
      "timed out after 0.5 s (--run_timeout_s)",
      "the 3 s run: timed out after 0.5 s (--run_timeout_s)"]


@pytest.mark.slow  # ~1 min: a 25-step base, then its losses at two timesteps and the shares
def test_memory_signal_benchmark_json(tmp_path):
  from ttt_jax import evaluate as ev
  from ttt_jax.evaluation import video

  cmd = [sys.executable, "benchmarks/memory_signal.py", f"--workdir={tmp_path}", "--preset=ci"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode != 0
  assert f"no finished base ({tmp_path}/runs/base/3s/checkpoints missing)" in proc.stderr

  # Past the 20-step warm-up, so the zero-initialised gates have let the caption in.
  preset = ev.load_preset("video", "ci")
  with preset.unlocked():
    preset.base.steps, preset.score.heldout = 25, 2
  video.train_base(preset, tmp_path, "configs")
  proc = subprocess.run(cmd + ["--heldout=2", "--timesteps=100,900"],
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  rows = json.loads(proc.stdout)["results"]
  assert [r["t"] for r in rows] == [100, 900, "uniform", "base", "stage"]
  for r in rows[:2]:
    assert math.isfinite(r["loss"]) and r["loss"] > 0
    # The base reads its caption, so another paint changes its loss (either way this early).
    assert math.isfinite(r["swap_gain"]) and r["swap_gain"] != 0.0
    assert r["share"] == pytest.approx(r["swap_gain"] / r["loss"])
  assert rows[0]["loss"] != rows[1]["loss"]  # each row at its own timestep
  # The same shares the evaluation's base records.
  recorded = json.loads((tmp_path / "runs/base/3s/eval.json").read_text())
  for r in rows[2:]:
    assert r["share"] == pytest.approx(recorded[f"memory_share_{r['t']}"], rel=1e-5)