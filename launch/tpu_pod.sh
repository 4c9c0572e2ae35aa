#!/usr/bin/env bash
# Run the curriculum (or one stage) on a Cloud TPU VM pod slice, every host at once.
#
#   launch/tpu_pod.sh TPU_NAME ZONE WORKDIR [STAGES] [PRESET]
#   launch/tpu_pod.sh my-v5p-256 us-east5-a /gcs/my-bucket/ttt 3,9,18,30,63 paper
#
# Each host clones nothing: it needs this repository at ~/ttt-jax (copied by
# the first step below) and installs it. Every host runs the same command;
# `--distributed` makes train.py call jax.distributed.initialize(), which on
# Cloud TPU discovers the coordinator and process ids by itself. The data
# pipeline shards examples by jax.process_index(), the mesh spans all chips.
# WORKDIR must be a path every host sees (a gcsfuse-mounted bucket such as
# /gcs/my-bucket/run, or Filestore/NFS) so all hosts share the Orbax
# checkpoints; process 0 alone writes config.json, metrics and plots.
set -euo pipefail
TPU_NAME=${1:?TPU name}
ZONE=${2:?zone}
WORKDIR=${3:?workdir on storage all hosts mount, e.g. /gcs/bucket/run}
STAGES=${4:-3,9,18,30,63}
PRESET=${5:-paper}
REPO_DIR=$(cd "$(dirname "$0")/.." && pwd)

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"
}

gcloud compute tpus tpu-vm scp --recurse --zone "$ZONE" --worker=all \
  "$REPO_DIR" "$TPU_NAME":~/ttt-jax
ssh_all 'cd ~/ttt-jax && pip install -q -U "jax[tpu]" && pip install -q -e .'

previous=""
IFS=, read -ra stage_list <<< "$STAGES"
for s in "${stage_list[@]}"; do
  ssh_all "cd ~/ttt-jax && python -m ttt_jax.train --distributed \
    --config=configs/tom_jerry_${s}s.py:${PRESET} --workdir=${WORKDIR}/${s}s \
    --config.init_from=${previous}"
  previous="${WORKDIR}/${s}s"
done
