"""The launch scripts' --dry-run commands (no gcloud / SLURM on PATH) and curriculum --distributed."""

import pathlib
import shlex
import shutil
import subprocess

import jax
import pytest
from absl import flags
from absl.testing import flagsaver

from ttt_jax import curriculum

REPO = pathlib.Path(__file__).resolve().parents[1]
BASH = shutil.which("bash")


def launch(script, *args, env=None, tmp_path):
  """Runs launch/<script> with bash and a PATH of one empty folder: builtins only, so no
  gcloud, sbatch or srun, whatever this machine has."""
  empty = tmp_path / "empty_bin"
  empty.mkdir(exist_ok=True)
  return subprocess.run([BASH, str(REPO / "launch" / script), *args], cwd=tmp_path,
                        env={"PATH": str(empty), **(env or {})}, capture_output=True,
                        text=True, timeout=30, check=False)


def commands(proc):
  assert proc.returncode == 0, proc.stderr
  return [shlex.split(line) for line in proc.stdout.splitlines()]


def remote(argv):
  """The --command= of a `gcloud ... ssh` line, as the worker's shell splits it."""
  [command] = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
  return command


def curriculum_argv(words):
  i = words.index("ttt_jax.curriculum")
  assert words[i - 1] == "-m"
  return words[i + 1:]


def test_tpu_pod_dry_run_create_copy_install_train(tmp_path):
  proc = launch("tpu_pod.sh", "--dry-run", "--create", "--accelerator-type=v5p-256",
                "--project=proj", "--stages=3,9", "my-v5p-256", "us-east5-a", "/gcs/bucket/ttt",
                "--", "--storyboard=held out.jsonl", tmp_path=tmp_path)
  create, tar, scp, install, run = commands(proc)

  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-v5p-256"]
  assert {"--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-256",
          "--version=v2-alpha-tpuv5"} <= set(create[6:])

  assert tar[0] == "tar" and tar[tar.index("-C") + 1] == str(REPO) and "--exclude=.git" in tar
  tarball = tar[tar.index("-czf") + 1]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5] == tarball and scp[6] == "my-v5p-256:~/ttt-jax.tgz"
  assert {"--worker=all", "--zone=us-east5-a", "--project=proj"} <= set(scp)

  for line in (install, run):
    assert line[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p-256"]
    assert {"--worker=all", "--zone=us-east5-a", "--project=proj"} <= set(line)
  setup = remote(install)
  assert "tar -xzf ~/ttt-jax.tgz -C ~/ttt-jax" in setup
  assert 'pip install -U "jax[tpu]"' in setup and setup.endswith("pip install -e .")
  assert setup.index("jax[tpu]") < setup.index("pip install -e .")

  train = shlex.split(remote(run))
  assert train[:4] == ["cd", "~/ttt-jax", "&&", "python3"]
  assert curriculum_argv(train) == ["--distributed", "--preset=paper",
                                    "--workdir=/gcs/bucket/ttt", "--stages=3,9",
                                    "--storyboard=held out.jsonl"]


def test_tpu_pod_dry_run_defaults_no_create(tmp_path):
  """No --create: copy, install, train; positional STAGES and PRESET as before; --skip-setup."""
  lines = commands(launch("tpu_pod.sh", "--dry-run", "pod", "europe-west4-a", "/mnt/run",
                          "3,9,18", "tiny", tmp_path=tmp_path))
  assert [line[4] for line in lines[1:]] == ["scp", "ssh", "ssh"] and lines[0][0] == "tar"
  assert not any("create" in line for line in lines)
  assert curriculum_argv(shlex.split(remote(lines[-1]))) == [
      "--distributed", "--preset=tiny", "--workdir=/mnt/run", "--stages=3,9,18"]

  [only] = commands(launch("tpu_pod.sh", "--dry-run", "--skip-setup", "pod", "z", "/mnt/run",
                           tmp_path=tmp_path))
  assert only[4] == "ssh" and "--stages=3,9,18,30,63" in remote(only)


@pytest.mark.parametrize("args, named", [
    ((), "TPU_NAME"),
    (("pod",), "ZONE"),
    (("pod", "us-east5-a"), "WORKDIR"),
    (("--create", "pod", "us-east5-a", "/mnt/run"), "--accelerator-type"),
    (("pod", "us-east5-a", "gs://bucket/run"), "gcsfuse"),
    (("--bogus", "pod", "us-east5-a", "/mnt/run"), "--bogus"),
])
def test_tpu_pod_refuses_missing_arguments(tmp_path, args, named):
  proc = launch("tpu_pod.sh", "--dry-run", *args, tmp_path=tmp_path)
  assert proc.returncode != 0 and proc.stdout == ""
  assert named in proc.stderr and "usage: launch/tpu_pod.sh" in proc.stderr


def test_gpu_slurm_dry_run_submits_then_sruns(tmp_path):
  proc = launch("gpu_slurm.sh", "--dry-run", "--stages=3,9", "--", "--storyboard=s.jsonl",
                env={"WORKDIR": "/shared/ttt", "NODES": "4", "GPUS_PER_NODE": "8",
                     "PARTITION": "gpu"}, tmp_path=tmp_path)
  submit, step = commands(proc)

  assert submit[0] == "sbatch"
  assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive",
          "--partition=gpu", f"--chdir={REPO}"} <= set(submit)
  script = submit.index(str(REPO / "launch" / "gpu_slurm.sh"))
  assert submit[script + 1:] == ["--workdir=/shared/ttt", "--preset=paper", "--stages=3,9",
                                 "--python=python", "--", "--storyboard=s.jsonl"]

  assert step[:2] == ["env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7"] and step[2] == "srun"
  assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8"} <= set(step)
  assert step[step.index("-m") - 1] == "python"
  assert curriculum_argv(step) == ["--distributed", "--preset=paper", "--workdir=/shared/ttt",
                                   "--stages=3,9", "--storyboard=s.jsonl"]


def test_gpu_slurm_dry_run_inside_a_job_takes_the_allocation(tmp_path):
  """In the batch job (or salloc) the script runs srun at once, sized by SLURM's variables."""
  [step] = commands(launch("gpu_slurm.sh", "--dry-run", "--workdir=/shared/ttt",
                           "--preset=tiny", env={"SLURM_JOB_ID": "7",
                                                 "SLURM_JOB_NUM_NODES": "3",
                                                 "SLURM_GPUS_ON_NODE": "4"},
                           tmp_path=tmp_path))
  assert step[:3] == ["env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3", "srun"]
  assert {"--nodes=3", "--gpus-per-node=4", "--ntasks-per-node=1"} <= set(step)
  assert curriculum_argv(step) == ["--distributed", "--preset=tiny", "--workdir=/shared/ttt",
                                   "--stages=3,9,18,30,63"]


@pytest.mark.parametrize("env, args, named", [
    ({}, (), "WORKDIR"),
    ({"WORKDIR": "/w", "NODES": "two"}, (), "NODES"),
    ({"WORKDIR": "/w"}, ("--bogus",), "--bogus"),
])
def test_gpu_slurm_refuses_bad_arguments(tmp_path, env, args, named):
  proc = launch("gpu_slurm.sh", "--dry-run", *args, env=env, tmp_path=tmp_path)
  assert proc.returncode != 0 and proc.stdout == ""
  assert named in proc.stderr and "usage:" in proc.stderr


@pytest.mark.parametrize("script", ["tpu_pod.sh", "gpu_slurm.sh"])
def test_launch_help_documents_dry_run(tmp_path, script):
  proc = launch(script, "--help", tmp_path=tmp_path)
  assert proc.returncode == 0 and "--dry-run" in proc.stdout and "#" not in proc.stdout[:1]


def test_curriculum_distributed_initializes_before_anything(monkeypatch, tmp_path):
  """--distributed exists (default off) and calls jax.distributed.initialize() first."""
  assert flags.FLAGS["distributed"].default is False
  assert "jax.distributed.initialize()" in flags.FLAGS["distributed"].help
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append("initialize"))
  monkeypatch.setattr(curriculum, "run", lambda *a, **k: calls.append(("run", a)) or {})
  # Every flag main reads, parsed as on a command line (this process never parsed FLAGS).
  argv = dict(workdir=str(tmp_path), stages="3,9", preset="tiny", config_dir="configs",
              storyboard="", verbosity=str(flags.FLAGS["verbosity"].value))
  with flagsaver.as_parsed(distributed="false", **argv):
    curriculum.main(["curriculum"])
  assert calls == [("run", ("tiny", str(tmp_path), [3, 9], "configs", ""))]
  calls.clear()
  with flagsaver.as_parsed(distributed="true", **argv):
    curriculum.main(["curriculum"])
  assert calls == ["initialize", ("run", ("tiny", str(tmp_path), [3, 9], "configs", ""))]
