"""Never waste a run, seen as a user sees it: real `python -m ttt_jax.train` subprocesses.

SIGKILL then resume (bit-exact), SIGTERM (a checkpoint at that step, exit
143), a truncated checkpoint (fallback with a message, the damaged one kept),
NaN steps (stop with the step named, or skip and count), the design-card
command and a later stage without init (refused in seconds), the default
workdir, metrics timing fields, parameter counts and the config history.
The subprocesses share the session's persistent JIT cache (conftest).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.conftest import build_model, flat, params_of, small_config
from ttt_jax import checkpoint, metrics
from ttt_jax.data import pipeline
from ttt_jax.models.vae import make_codec

REPO = pathlib.Path(__file__).resolve().parents[1]
# The command-line twin of conftest.small_config() on the 3 s tiny stage.
SMALL = [f"--config={REPO}/configs/tom_jerry_3s.py:tiny", "--config.data.height=32",
         "--config.data.width=48", "--config.data.num_videos=4", "--config.data.text_len=4",
         "--config.model.ttt.mini_batch_size=8", "--config.optim.lr.other=3e-3",
         "--config.optim.lr.attn_qkvo=3e-3", "--config.optim.lr.ttt=3e-3",
         "--config.optim.warmup_steps=5", "--config.train.batch_size=2"]


def command(workdir, *flags):
  return [sys.executable, "-m", "ttt_jax.train", *SMALL, *flags] + (
      [f"--workdir={workdir}"] if workdir else [])


ENV = {**os.environ, "PYTHONPATH": str(REPO)}  # the config files import `configs` from any cwd


def run(workdir, *flags, cwd=REPO, timeout=600):
  return subprocess.run(command(workdir, *flags), cwd=cwd, capture_output=True, text=True,
                        timeout=timeout, check=False, env=ENV)


def start(workdir, *flags):
  return subprocess.Popen(command(workdir, *flags), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc, timeout=300):
  deadline = time.monotonic() + timeout
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f"the run ended early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError("timed out waiting for the run")
    time.sleep(0.2)


def final_params(workdir):
  model = build_model(small_config(), seed=99)
  step = checkpoint.load_params(workdir, model)
  return step, flat(params_of(model))


def steps_on_disk(workdir):
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                if p.name.isdigit())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 12-step run (checkpoints every 4)."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = run(workdir, "--config.train.steps=12", "--config.train.ckpt_every=4",
             "--config.train.log_every=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_sigkill_then_resume_is_bit_exact(reference, tmp_path):
  ref_dir, _ = reference
  flags = ("--config.train.steps=12", "--config.train.ckpt_every=4", "--config.train.log_every=1")
  proc = start(tmp_path, *flags)
  wait_for(lambda: (tmp_path / "checkpoints").is_dir() and steps_on_disk(tmp_path)
           and max(steps_on_disk(tmp_path)) >= 4 and len(metrics.read_metrics(
               tmp_path / "metrics.jsonl")) >= 6, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  again = run(tmp_path, *flags)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from step" in again.stderr
  (step_a, a), (step_b, b) = final_params(ref_dir), final_params(tmp_path)
  assert step_a == step_b == 12
  for k in a:
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)
  rows = metrics.read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 13))
  ref_rows = metrics.read_metrics(ref_dir / "metrics.jsonl")
  assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


def test_sigterm_saves_the_current_step(tmp_path):
  proc = start(tmp_path, "--config.train.steps=100000", "--config.train.ckpt_every=100000",
               "--config.train.log_every=1")
  wait_for(lambda: len(metrics.read_metrics(tmp_path / "metrics.jsonl")) >= 3, proc)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
  line = next(l for l in stderr.splitlines() if "SIGTERM at step" in l)
  step = int(line.split("SIGTERM at step ")[1].split(":")[0])
  assert step >= 3 and steps_on_disk(tmp_path) == [step]
  assert final_params(tmp_path)[0] == step
  rows = metrics.read_metrics(tmp_path / "metrics.jsonl")
  assert rows[-1]["step"] >= step - 1


def test_truncated_checkpoint_falls_back_with_a_message(reference, tmp_path):
  ref_dir, _ = reference
  shutil.copytree(ref_dir, tmp_path / "run")
  workdir = tmp_path / "run"
  assert steps_on_disk(workdir) == [8, 12]  # keep_checkpoints = 2
  files = sorted((p for p in (workdir / "checkpoints" / "12").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
  victim = files[-1]  # the largest file: array data
  size = victim.stat().st_size
  victim.write_bytes(victim.read_bytes()[: size // 2])
  proc = run(workdir, "--config.train.steps=14", "--config.train.ckpt_every=4",
             "--config.train.log_every=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  warning = next(l for l in proc.stderr.splitlines() if "does not restore" in l)
  assert "checkpoint step 12" in warning and "falling back to step 8" in warning
  assert "12.damaged" in warning and (workdir / "checkpoints" / "12.damaged").is_dir()
  assert f"damaged: {victim} has {size // 2:,} of its {size:,} bytes" in warning  # named
  assert "resumed from step 8" in proc.stderr
  assert final_params(workdir)[0] == 14
  rows = metrics.read_metrics(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(1, 15))


@pytest.fixture(scope="module")
def blowup_flags():
  """A learning rate so large that the second update overflows the weights."""
  return ["--config.optim.lr.other=1e30", "--config.optim.lr.attn_qkvo=1e30",
          "--config.optim.lr.ttt=1e30", "--config.optim.warmup_steps=1",
          "--config.optim.grad_clip=1e30", "--config.train.steps=6",
          "--config.train.ckpt_every=1", "--config.train.log_every=1"]


def test_nonfinite_loss_stops_the_run(tmp_path, blowup_flags):
  proc = run(tmp_path, *blowup_flags)
  assert proc.returncode == 1, proc.stderr[-3000:]
  line = next(l for l in proc.stderr.splitlines() if "training stopped" in l)
  step = int(line.split("step ")[1].split(":")[0])
  assert "is not finite" in line and ("nan" in line or "inf" in line)
  assert f"the last checkpoint (step {step - 1})" in line
  assert max(steps_on_disk(tmp_path)) == step - 1  # nothing saved after the bad step
  _, params = final_params(tmp_path)
  assert all(np.isfinite(v).all() for v in params.values())


def test_nonfinite_steps_can_be_skipped(tmp_path, blowup_flags):
  proc = run(tmp_path, *blowup_flags, "--config.train.nonfinite=skip")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = metrics.read_metrics(tmp_path / "metrics.jsonl")
  skipped = [r["skipped_steps"] for r in rows]
  assert 0 < skipped[-1] < 6 and "update skipped" in proc.stderr
  assert skipped[-1] > skipped[-2]  # step 6 was skipped ...
  # ... so it changed nothing: the checkpoints of steps 5 and 6 hold the same state.
  assert steps_on_disk(tmp_path) == [5, 6]
  with ocp.CheckpointManager(tmp_path / "checkpoints") as manager:
    at = lambda s: flat(dict(manager.restore(s, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), opt=ocp.args.StandardRestore()))))
    five, six = at(5), at(6)
  assert five.keys() == six.keys()
  for k in five:
    np.testing.assert_array_equal(np.asarray(six[k]), np.asarray(five[k]), err_msg=k)
  assert all(np.isfinite(np.asarray(v)).all() for v in six.values())


def test_design_card_command_refuses_in_seconds(tmp_path):
  t0 = time.monotonic()
  proc = subprocess.run([sys.executable, "-m", "ttt_jax.train",
                         f"--config={REPO}/configs/tom_jerry_63s.py"], cwd=tmp_path,
                        capture_output=True, text=True, timeout=300, check=False, env=ENV)
  seconds = time.monotonic() - t0
  assert proc.returncode == 1, proc.stderr[-3000:]
  err = proc.stderr
  assert "preflight refused this run" in err
  assert "optim.lr.other=0 freezes the base weights" in err and "init_from" in err
  assert "GiB per device needed" in err and "cpu device" in err
  assert "`paper` (the default preset) is the pod job" in err and ":tiny" in err
  assert "python -m ttt_jax.curriculum" in err
  assert "holds no prepared 63 s clips" in err and "python -m ttt_jax.data.prepare" in err
  assert "workdirs/tom_jerry_63s" in err  # where it would write, printed first
  assert not (tmp_path / "workdirs" / "tom_jerry_63s" / "data").exists()  # no data work
  print(f"refused in {seconds:.1f} s")


def test_later_stage_without_init_is_refused(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "ttt_jax.train",
                         f"--config={REPO}/configs/tom_jerry_9s.py:tiny", f"--workdir={tmp_path}"],
                        cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 1
  assert "optim.lr.other=0 freezes the base weights" in proc.stderr
  assert "--config.init_from=" in proc.stderr


def test_default_workdir_metrics_and_history(tmp_path):
  proc = run(None, "--config.train.steps=3", "--config.train.log_every=1", cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  workdir = tmp_path / "workdirs" / "tom_jerry_3s_tiny"
  assert f"workdir: {workdir}" in proc.stderr
  line = next(l for l in proc.stderr.splitlines() if "parameters:" in l)
  model = build_model(small_config())
  total = sum(v.size for v in flat(params_of(model)).values())
  assert f"{total:,} total, {total:,} trainable" in line and "ttt " in line
  rows = metrics.read_metrics(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3]
  layout = pipeline.video_layout(small_config().data, 3, make_codec("toy"), 2)
  assert len({r["compile_s"] for r in rows}) == 1 and rows[0]["compile_s"] > 0
  for r in rows:  # step 1 is the compile; later rows time the steps after it
    assert r["s_per_step"] > 0
    assert r["tokens_per_s"] == pytest.approx(2 * layout.seq_len / r["s_per_step"], rel=1e-9)
  assert rows[0]["s_per_step"] == rows[0]["compile_s"] and rows[1]["s_per_step"] < rows[0]["compile_s"]
  history = [json.loads(l) for l in (workdir / "config_history.jsonl").read_text().splitlines()]
  assert len(history) == 1
  again = run(None, "--config.train.steps=4", "--config.train.log_every=1", cwd=tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "config changed since the last run" in again.stderr and "train.steps: 3 -> 4" in again.stderr
  history = [json.loads(l) for l in (workdir / "config_history.jsonl").read_text().splitlines()]
  assert [h["config"]["train"]["steps"] for h in history] == [3, 4]
  assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 4
