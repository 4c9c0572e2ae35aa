#!/usr/bin/env bash
# The one prepared check for a lent NVIDIA GPU machine: finishes in well under 10 minutes.
#
#   benchmarks/gpu_check.sh [--install] [--budget=SECONDS]
#
#   --install         first pip install -U "jax[cuda12]" and pip install -e . (default: assume
#                     the repository is installed with a CUDA jax)
#   --budget=SECONDS  wall-clock budget of all steps together (default 500): each step's
#                     `timeout` is its own limit or what is left of the budget, the smaller
#   OUT               environment: where results go (default benchmarks/out): one JSON file and
#                     one log per step
#
# Steps (a failing or hanging step is reported and the next one runs):
#   info         nvidia-smi, jax.devices()
#   kernels_k64  benchmarks/ttt_kernels.py: XLA scan vs fused Pallas GPU kernels, fwd and
#                fwd+bwd, TTT-Linear and TTT-MLP, d=64, K=64, 48 heads x 16,384 tokens
#   kernels_k1k  the same for TTT-MLP at K=1024 (large-chunk TTT)
#   attention    benchmarks/attention.py: dense XLA, chunked and cuDNN attention at 4,096 and
#                the paper window of 18,008 tokens, 48 heads of 64, bf16 (dense runs where
#                it fits in 40 GiB, else compiles only)
#   train_step   benchmarks/train_step.py: one full training step (fwd, bwd, AdamW) of a
#                1024-wide, 8-block DiT with TTT-MLP on a 9 s 480x720 clip, bf16, full remat
#   train_pallas the same with the fused Pallas TTT kernels, if the budget has room left
# A summary of which steps passed closes the output; the exit status is the number of
# steps that failed or timed out (one skipped for want of budget does not count).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
out=${OUT:-benchmarks/out}
mkdir -p "$out"
budget=500
install=0
for arg in "$@"; do
  case $arg in
    --install) install=1 ;;
    --budget=*) budget=${arg#*=} ;;
    -h | --help) sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (--install, --budget=SECONDS)" >&2; exit 2 ;;
  esac
done
deadline=$((SECONDS + budget))
names=() results=()

step() {  # step NAME LIMIT_SECONDS COMMAND...: run under timeout, log to $out/NAME.log
  local name=$1 limit=$2 left rc start
  shift 2
  left=$((deadline - SECONDS))
  ((left < limit)) && limit=$left
  names+=("$name")
  if ((limit < 20)); then
    echo "== $name: skipped, ${left}s of the budget left"
    results+=("SKIPPED (budget)")
    return
  fi
  echo "== $name (timeout ${limit}s): $*"
  start=$SECONDS
  timeout --kill-after=15 "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  if ((rc == 0)); then
    results+=("PASSED in $((SECONDS - start))s")
  elif ((rc == 124 || rc == 137)); then
    results+=("TIMED OUT after $((SECONDS - start))s")
  else
    results+=("FAILED (exit $rc) after $((SECONDS - start))s")
  fi
  echo "   ${results[-1]}; last lines of $out/$name.log:"
  tail -n 4 "$out/$name.log" | cut -c1-300 | sed 's/^/   | /'
}

if ((install)); then
  step install 240 bash -c 'pip install -U "jax[cuda12]" && pip install -e .'
fi
step info 60 bash -c 'nvidia-smi; python -c "import jax; print(jax.__version__, jax.devices())"'
cat "$out/info.log"

# Fused kernels vs XLA: a few seconds of compute each, mostly compile time.
step kernels_k64 90 python benchmarks/ttt_kernels.py --impls=xla,pallas --kinds=linear,mlp \
  --d=64 --K=64 --H=48 --seq_lens=16384 --repeats=3 --out="$out/kernels_k64.json"
step kernels_k1k 75 python benchmarks/ttt_kernels.py --impls=xla,pallas --kinds=mlp \
  --d=64 --K=1024 --H=48 --seq_lens=16384 --repeats=3 --out="$out/kernels_k1k.json"
step attention 90 python benchmarks/attention.py --impls=xla,chunked,cudnn \
  --seq_lens=4096,18008 --H=48 --d=64 --dtype=bfloat16 --repeats=3 --max_run_gib=40 \
  --nopaper --out="$out/attention.json"
step train_step 180 python benchmarks/train_step.py --width=1024 --depth=8 --heads=16 \
  --seconds=9 --latent_h=60 --latent_w=90 --dtype=bfloat16 --remat=full --ttt_impl=xla \
  --repeats=3 --out="$out/train_step.json"
# Only if budget is left: the same step with the fused Pallas TTT kernels.
step train_pallas 120 python benchmarks/train_step.py --width=1024 --depth=8 --heads=16 \
  --seconds=9 --latent_h=60 --latent_w=90 --dtype=bfloat16 --remat=full --ttt_impl=pallas \
  --repeats=3 --out="$out/train_pallas.json"

echo "== summary (results in $out/)"
failed=0
for i in "${!names[@]}"; do
  printf '   %-12s %s\n' "${names[$i]}" "${results[$i]}"
  [[ ${results[$i]} == PASSED* || ${results[$i]} == SKIPPED* ]] || failed=$((failed + 1))
done
exit "$failed"
