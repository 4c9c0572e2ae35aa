#!/usr/bin/env bash
#SBATCH --job-name=ttt-jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --output=slurm-%x-%j.out
#
# Train the curriculum on a multi-node NVIDIA GPU cluster under SLURM, one process per node.
#
#   launch/gpu_slurm.sh [OPTIONS] [-- CURRICULUM_FLAGS...]
#
#   WORKDIR=/shared/ttt NODES=4 launch/gpu_slurm.sh                  # submits itself (sbatch)
#   sbatch --nodes=4 launch/gpu_slurm.sh --workdir=/shared/ttt       # the same, by hand
#   launch/gpu_slurm.sh --workdir=/shared/ttt                        # inside salloc: runs srun
#   launch/gpu_slurm.sh --dry-run --workdir=/shared/ttt -- --storyboard=held_out.jsonl
#
# Outside a SLURM job (no SLURM_JOB_ID) the script submits itself with sbatch (the options
# below override the #SBATCH lines above); inside one (the batch job, or an salloc shell) it
# runs, on every node at once,
#   srun --nodes=N --ntasks-per-node=1 --gpus-per-node=G ... \
#     python -m ttt_jax.curriculum --distributed --preset=P --workdir=W --stages=S
# --distributed makes the curriculum call jax.distributed.initialize(), which reads the
# coordinator, process count and process id from SLURM's environment. JAX would bind each
# process to the single GPU SLURM_LOCALID names (it assumes one process per GPU), so the
# step sets JAX_LOCAL_DEVICE_IDS=0,...,G-1: one process drives all GPUs of its node. The
# curriculum chains the stages (finished ones are skipped, an interrupted one resumes:
# resubmitting the same command continues a run); process 0 alone writes config.json,
# metrics, plots, samples and summary.json.
#
# Environment knobs (each also an option; the option wins):
#   WORKDIR        --workdir=DIR        run root on a filesystem every node mounts (required)
#   NODES          --nodes=N            nodes (default 2; in a job: SLURM_JOB_NUM_NODES)
#   GPUS_PER_NODE  --gpus-per-node=G    GPUs per node (default 8; in a job: SLURM_GPUS_ON_NODE)
#   PRESET         --preset=NAME        config preset of every stage (default paper)
#   STAGES         --stages=LIST        stage seconds (default 3,9,18,30,63)
#   PARTITION      --partition=NAME     sbatch --partition (default: the cluster's)
#   ACCOUNT        --account=NAME       sbatch --account (default: none)
#   TIME           --time=D-HH:MM:SS    sbatch --time limit (default: the partition's)
#   JOB_NAME       --job-name=NAME      sbatch --job-name (default ttt-jax)
#   PYTHON         --python=EXE         interpreter on the nodes (default python)
# Other options:
#   --dry-run      print the commands, one per line, fully expanded and shell-quoted (outside
#                  a job: the sbatch submission, then the srun line the job runs), exit 0;
#                  runs nothing and needs no SLURM
#   -h, --help     this text
#   -- ARGS        passed on to `python -m ttt_jax.curriculum` (e.g. --storyboard=...)
# Every node needs this repository installed (pip install -U "jax[cuda12]"; pip install -e .)
# at the same path, e.g. on the shared filesystem; the job runs from that directory.
set -euo pipefail

usage() {
  local line started=""
  while IFS= read -r line; do
    [[ $line == '#!'* || $line == '#SBATCH'* || $line == '#' && -z ${started:-} ]] && continue
    [[ $line == '#'* ]] || break
    started=1
    line=${line#\#}
    printf '%s\n' "${line# }"
  done < "${BASH_SOURCE[0]}"
}

die() {  # message -> stderr with a usage hint, exit 2
  printf 'gpu_slurm.sh: %s\n' "$1" >&2
  printf 'usage: [WORKDIR=DIR] [NODES=N] [GPUS_PER_NODE=G] launch/gpu_slurm.sh [--workdir=DIR] [OPTIONS] [-- CURRICULUM_FLAGS...]\n' >&2
  printf '(launch/gpu_slurm.sh --help for the options)\n' >&2
  exit 2
}

quote() {  # word -> REPLY, shell-quoted the way Python's shlex.quote does it
  if [[ -z $1 ]]; then
    REPLY="''"
  elif [[ $1 =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    REPLY=$1
  else
    REPLY="'${1//\'/\'\\\'\'}'"
  fi
}

join_quoted() {  # words -> REPLY, one shell-quoted command line
  local out="" word
  for word in "$@"; do
    quote "$word"
    out+="${out:+ }$REPLY"
  done
  REPLY=$out
}

in_job=0
[[ -n ${SLURM_JOB_ID:-} ]] && in_job=1
workdir=${WORKDIR:-}
nodes=${NODES:-}
gpus=${GPUS_PER_NODE:-}
preset=${PRESET:-paper}
stages=${STAGES:-3,9,18,30,63}
partition=${PARTITION:-}
account=${ACCOUNT:-}
time_limit=${TIME:-}
job_name=${JOB_NAME:-ttt-jax}
python=${PYTHON:-python}
dry_run=0
curriculum_args=()
while (($#)); do
  case $1 in
    --workdir=*) workdir=${1#*=} ;;
    --nodes=*) nodes=${1#*=} ;;
    --gpus-per-node=*) gpus=${1#*=} ;;
    --preset=*) preset=${1#*=} ;;
    --stages=*) stages=${1#*=} ;;
    --partition=*) partition=${1#*=} ;;
    --account=*) account=${1#*=} ;;
    --time=*) time_limit=${1#*=} ;;
    --job-name=*) job_name=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; curriculum_args=("$@"); break ;;
    *) die "unknown argument $1" ;;
  esac
  shift
done

[[ -n $workdir ]] || die "missing WORKDIR: set WORKDIR=DIR or pass --workdir=DIR (a path every node mounts)"
if ((in_job)); then  # the allocation decides
  nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${nodes:-2}}}
  gpus=${SLURM_GPUS_ON_NODE:-${gpus:-8}}
fi
nodes=${nodes:-2}
gpus=${gpus:-8}
[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "NODES=$nodes: expected a positive integer"
[[ $gpus =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE=$gpus: expected a positive integer"
[[ $stages =~ ^[0-9]+(,[0-9]+)*$ ]] || die "STAGES=$stages: expected comma-separated seconds, e.g. 3,9,18,30,63"

# The repository: this script's parent, unless this is sbatch's spool copy of it.
repo_dir=${BASH_SOURCE[0]%/*}
[[ $repo_dir == "${BASH_SOURCE[0]}" ]] && repo_dir=.
repo_dir=$(cd "$repo_dir/.." && pwd)
if [[ ! -d $repo_dir/ttt_jax ]]; then  # the job's directory (sbatch --chdir), else the submit one
  repo_dir=$PWD
  [[ -d $repo_dir/ttt_jax ]] || repo_dir=${SLURM_SUBMIT_DIR:-$PWD}
  [[ -d $repo_dir/ttt_jax ]] || die "cannot find the repository (no ttt_jax/ in $repo_dir): submit from its root"
fi

run() {  # command words: printed (--dry-run) or echoed to stderr and run
  join_quoted "$@"
  if ((dry_run)); then
    printf '%s\n' "$REPLY"
  else
    printf '+ %s\n' "$REPLY" >&2
    "$@"
  fi
}

if ((!in_job)); then
  submit=(sbatch --job-name="$job_name" --nodes="$nodes" --ntasks-per-node=1
          --gpus-per-node="$gpus" --exclusive --chdir="$repo_dir"
          --output="$repo_dir/slurm-%x-%j.out")
  [[ -n $partition ]] && submit+=(--partition="$partition")
  [[ -n $account ]] && submit+=(--account="$account")
  [[ -n $time_limit ]] && submit+=(--time="$time_limit")
  # The job gets every setting as an argument: it does not depend on the environment.
  submit+=("$repo_dir/launch/gpu_slurm.sh" --workdir="$workdir" --preset="$preset"
           --stages="$stages" --python="$python" --
           ${curriculum_args[@]+"${curriculum_args[@]}"})
  run "${submit[@]}"
  ((dry_run)) || exit 0  # the job runs the srun step below
  printf '# the job then runs:\n' >&2
fi

device_ids=0
for ((i = 1; i < gpus; i++)); do device_ids+=",$i"; done
run env JAX_LOCAL_DEVICE_IDS="$device_ids" \
  srun --nodes="$nodes" --ntasks-per-node=1 --gpus-per-node="$gpus" --kill-on-bad-exit=1 \
  --chdir="$repo_dir" \
  "$python" -m ttt_jax.curriculum --distributed --preset="$preset" --workdir="$workdir" \
  --stages="$stages" ${curriculum_args[@]+"${curriculum_args[@]}"}
