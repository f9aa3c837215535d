#!/usr/bin/env bash
# The benchmark suite on a lent GPU machine, in one call of the device tool.
#
# That machine has jax, flax, optax, orbax-checkpoint and torch but not tensorflow-datasets, grain,
# array_record or ml-collections, no TensorFlow to prepare MNIST, and no network. So, here first:
#
#   bash benchmarks/stage_device.sh          # wheels and a prepared MNIST into .device/
#
# then run this there with carry [".device"] and a timeout_s above the budget by the longest
# measurement. On an H200 (2026-12-04) the machine started in 30 s and `on_device.sh 300` took
# 316 s with timeout_s 480: both MNIST sections (5 seeds each) and all but three throughputs,
# ResNet-50 bfloat16 (both frameworks, compiles included) in 104 s. ResNet-50 float32 did not
# finish in 296 s: give it a call of its own, or leave it out with --throughputs. The levers'
# A/B runs (benchmarks/levers.py) are not part of this script: run them first in the same call,
#   source .device/env.sh; python3 benchmarks/levers.py --output $OUT/levers.json; bash ...
#
#   bash benchmarks/on_device.sh [BUDGET_SECONDS [RUN_PY_FLAGS...]]     # default 360 s
#
# It first checks in seconds that JAX computes on the GPU (and says what stands in PyTorch's way,
# if anything: benchmarks/preflight.py). It writes the results JSON (rewritten after every
# measurement, so a run cut off by the timeout still brings back what it measured), the suite's
# log and the GPU's description to $OUT (to benchmarks/results outside the device tool). Copy
# the JSON into benchmarks/results/ and run `python benchmarks/report.py` to put it in the
# README. The measurements run in the order of
# benchmarks/run.py's plan: the first seed of each MNIST recipe (configs/mnist.py and its
# :speedrun variant), the fast CIFAR network and ResNet-50 in bfloat16, the other MNIST seeds, then
# the other throughputs; what the budget leaves out is listed under 'skipped'. A later call with
# `--update --sections throughput --throughputs KEY,...` measures the named throughputs again
# and keeps the others (copy the day's JSON into $OUT first: the update reads it there).
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-360}
shift $(( $# > 0 ? 1 : 0 ))
out=${OUT:-benchmarks/results}
mkdir -p "$out"

# env.sh installs the staged wheels and points TFDS at .device/tfds; a command that began with
# `source .device/env.sh;`, as the device tool's notes suggest, has done so already.
if [[ "${TFDS_DATA_DIR:-}" != "$PWD/.device/tfds" ]]; then
  # shellcheck source=/dev/null
  source .device/env.sh || { echo "error: .device/env.sh failed; run benchmarks/stage_device.sh here first and carry .device" >&2; exit 1; }
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
  > "$out/nvidia-smi.csv" 2>&1 || true
# Seconds, not the budget, to learn that JAX has no GPU (it would measure the CPU for ten minutes)
# or what stands in PyTorch's way. EXPECTED_PLATFORM=cpu runs this script in a CPU stand-in.
python3 benchmarks/preflight.py --platform "${EXPECTED_PLATFORM:-gpu}" 2>&1 \
  | tee "$out/preflight.log"
[[ ${PIPESTATUS[0]} -eq 0 ]] \
  || { echo "error: preflight failed (above; $out/preflight.log)" >&2; exit 1; }
# The budget is the whole call's: what installing the wheels took comes off the suite's.
budget=$(( budget > SECONDS + 60 ? budget - SECONDS : 60 ))
echo "suite budget: ${budget} s (set-up took ${SECONDS} s)"

python3 benchmarks/run.py --sections mnist,mnist_speedrun,throughput --seeds 5 --repeats 3 \
  --budget_seconds "$budget" --output_dir "$out" "$@" 2>&1 | tee "$out/suite.log"
