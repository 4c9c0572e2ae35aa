#!/usr/bin/env bash
# Train the curriculum on a Cloud TPU VM pod slice (v5p, v6e, ...), every worker at once.
#
#   launch/tpu_pod.sh [OPTIONS] TPU_NAME ZONE WORKDIR [STAGES [PRESET]] [-- CURRICULUM_FLAGS...]
#
#   launch/tpu_pod.sh my-v5p-256 us-east5-a /gcs/my-bucket/ttt
#   launch/tpu_pod.sh --create --accelerator-type=v5p-256 my-v5p-256 us-east5-a /gcs/my-bucket/ttt
#   launch/tpu_pod.sh --dry-run --stages=3,9 my-v6e-64 us-east1-d /gcs/my-bucket/ttt \
#       -- --storyboard=held_out.jsonl
#
# Positional arguments:
#   TPU_NAME   the TPU VM (pod slice) name
#   ZONE       its zone (e.g. us-east5-a for v5p, us-east1-d for v6e)
#   WORKDIR    root of the run, one sub-directory per stage, at a path every worker
#              mounts identically (a gcsfuse-mounted bucket such as /gcs/my-bucket/run, or
#              Filestore/NFS), so that all hosts share the Orbax checkpoints. Not gs://.
#   STAGES     (optional, same as --stages) comma-separated stage seconds
#   PRESET     (optional, same as --preset) config preset of every stage
# Options:
#   --create                 create the slice first (gcloud compute tpus tpu-vm create)
#   --accelerator-type=TYPE  slice to create, e.g. v5p-256, v6e-64 (required with --create)
#   --version=RUNTIME        TPU VM software version for --create; default by generation:
#                            v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e,
#                            v5litepod v2-alpha-tpuv5-lite, v4 tpu-ubuntu2204-base
#   --spot                   with --create: a Spot slice
#   --project=PROJECT        passed to every gcloud command (default: gcloud's own)
#   --stages=LIST            stages to train, default 3,9,18,30,63
#   --preset=NAME            config preset, default paper
#   --skip-setup             do not copy and install the repository (already on every worker)
#   --dry-run                print the commands, one per line, fully expanded and shell-quoted,
#                            and exit 0; runs nothing and needs no gcloud
#   -h, --help               this text
#   -- ARGS                  passed on to `python3 -m ttt_jax.curriculum` on every worker
#
# Steps (each printed as `+ command` on stderr before it runs):
#   1. with --create: create the slice;
#   2. pack this repository (without .git, workdirs/, caches) into a tarball, copy it to
#      every worker (--worker=all), unpack it to ~/ttt-jax and install it there:
#      pip install -U "jax[tpu]", pip install -e . ;
#   3. run `python3 -m ttt_jax.curriculum --distributed --preset=... --workdir=...
#      --stages=...` on all workers at once: --distributed makes it call
#      jax.distributed.initialize(), which on Cloud TPU finds the coordinator and the
#      process ids by itself; the mesh spans every chip of the slice, the data pipeline
#      shards examples by process, the curriculum chains the stages (each initialised
#      from the previous one; finished stages are skipped, an interrupted one resumes,
#      so the same command restarts a preempted run), and process 0 alone writes
#      config.json, metrics, plots, samples and summary.json.
# data/ and weights/ (the paper preset's data.dir and model.pretrained, relative to the
# repository on each worker) travel in the tarball: make them symlinks into shared storage
# to avoid copying them to every worker.
set -euo pipefail

usage() {
  local line
  while IFS= read -r line; do
    [[ $line == '#!'* ]] && continue
    [[ $line == '#'* ]] || break
    line=${line#\#}
    printf '%s\n' "${line# }"
  done < "${BASH_SOURCE[0]}"
}

die() {  # message -> stderr with a usage hint, exit 2
  printf 'tpu_pod.sh: %s\n' "$1" >&2
  printf 'usage: launch/tpu_pod.sh [OPTIONS] TPU_NAME ZONE WORKDIR [STAGES [PRESET]] [-- CURRICULUM_FLAGS...]\n' >&2
  printf '(launch/tpu_pod.sh --help for the options)\n' >&2
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

create=0 dry_run=0 skip_setup=0 spot=0
accelerator_type="" version="" project="" stages="" preset=""
positional=() curriculum_args=()
while (($#)); do
  case $1 in
    --create) create=1 ;;
    --accelerator-type=*) accelerator_type=${1#*=} ;;
    --version=*) version=${1#*=} ;;
    --spot) spot=1 ;;
    --project=*) project=${1#*=} ;;
    --stages=*) stages=${1#*=} ;;
    --preset=*) preset=${1#*=} ;;
    --skip-setup) skip_setup=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; curriculum_args=("$@"); break ;;
    -*) die "unknown option $1" ;;
    *) positional+=("$1") ;;
  esac
  shift
done

((${#positional[@]} <= 5)) || die "too many arguments: ${positional[*]:5}"
TPU_NAME=${positional[0]:-}
ZONE=${positional[1]:-}
WORKDIR=${positional[2]:-}
[[ -n $TPU_NAME ]] || die "missing TPU_NAME (the TPU VM name)"
[[ -n $ZONE ]] || die "missing ZONE (e.g. us-east5-a)"
[[ -n $WORKDIR ]] || die "missing WORKDIR (a path every worker mounts, e.g. /gcs/my-bucket/ttt)"
[[ $WORKDIR != gs://* ]] || die "WORKDIR $WORKDIR: mount the bucket on every worker (gcsfuse) and pass the mounted path"
stages=${stages:-${positional[3]:-3,9,18,30,63}}
preset=${preset:-${positional[4]:-paper}}
[[ $stages =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--stages=$stages: expected comma-separated seconds, e.g. 3,9,18,30,63"

if ((create)); then
  [[ -n $accelerator_type ]] || die "--create needs --accelerator-type (e.g. --accelerator-type=v5p-256)"
  if [[ -z $version ]]; then
    case $accelerator_type in
      v5p-*) version=v2-alpha-tpuv5 ;;
      v6e-*) version=v2-alpha-tpuv6e ;;
      v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
      v4-*) version=tpu-ubuntu2204-base ;;
      *) die "--version: no default for --accelerator-type=$accelerator_type; pass --version=RUNTIME" ;;
    esac
  fi
elif [[ -n $accelerator_type || -n $version ]] || ((spot)); then
  die "--accelerator-type, --version and --spot go with --create"
fi

repo_dir=${BASH_SOURCE[0]%/*}
[[ $repo_dir == "${BASH_SOURCE[0]}" ]] && repo_dir=.
repo_dir=$(cd "$repo_dir/.." && pwd)
tarball=${TMPDIR:-/tmp}/ttt-jax-$TPU_NAME.tgz
# shellcheck disable=SC2088  # the tilde is meant literally: the workers' shells expand it
remote_dir='~/ttt-jax'
gcloud_tail=(--zone="$ZONE")
[[ -n $project ]] && gcloud_tail+=(--project="$project")

run() {  # command words: printed (--dry-run) or echoed to stderr and run
  join_quoted "$@"
  if ((dry_run)); then
    printf '%s\n' "$REPLY"
  else
    printf '+ %s\n' "$REPLY" >&2
    "$@"
  fi
}

on_all_workers() {  # remote command line -> ssh to every worker at once
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${gcloud_tail[@]}" --worker=all \
    --command="$1"
}

if ((create)); then
  create_cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${gcloud_tail[@]}"
              --accelerator-type="$accelerator_type" --version="$version")
  ((spot)) && create_cmd+=(--spot)
  run "${create_cmd[@]}"
fi

if ((!skip_setup)); then
  run tar -C "$repo_dir" --exclude=.git --exclude=workdirs --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=.venv --exclude=.pytest_cache -czf "$tarball" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:$remote_dir.tgz" "${gcloud_tail[@]}" \
    --worker=all
  on_all_workers "mkdir -p $remote_dir && tar -xzf $remote_dir.tgz -C $remote_dir && cd $remote_dir && pip install -U \"jax[tpu]\" && pip install -e ."
fi

join_quoted python3 -m ttt_jax.curriculum --distributed --preset="$preset" --workdir="$WORKDIR" \
  --stages="$stages" ${curriculum_args[@]+"${curriculum_args[@]}"}
on_all_workers "cd $remote_dir && $REPLY"
