#!/usr/bin/env bash
# The benchmark suite on a lent GPU machine, in one call of the device tool.
#
# That machine has jax, flax, optax, orbax-checkpoint and torch but not tensorflow-datasets, grain,
# array_record or ml-collections, no TensorFlow to prepare MNIST, and no network. So, here first:
#
#   bash benchmarks/stage_device.sh          # wheels and a prepared MNIST into .device/
#
# then run this there with carry [".device"] and a timeout_s above the budget by the longest
# measurement (ResNet-50 with torch.compile, a few minutes): the default 360 s with timeout_s 600
# fits one call into a session's 15 minutes of device time, the machine's start included.
#
#   bash benchmarks/on_device.sh [BUDGET_SECONDS [RUN_PY_FLAGS...]]     # default 360 s
#
# It writes the results JSON (rewritten after every measurement, so a run cut off by the timeout
# still brings back what it measured), the suite's log and the GPU's description to $OUT (to
# benchmarks/results outside the device tool). Copy the JSON into benchmarks/results/ and run
# `python benchmarks/report.py` to put it in the README. The measurements run in the order of
# benchmarks/run.py's plan: the first seed of each MNIST recipe (configs/mnist.py and its
# :speedrun variant), the fast CIFAR network and ResNet-50 in bfloat16, the other MNIST seeds, then
# the other throughputs; what the budget leaves out is listed under 'skipped'. A later call with
# `--update --sections throughput` measures that section again, whole (an update replaces the
# sections it names), keeping the MNIST ones.
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-360}
shift $(( $# > 0 ? 1 : 0 ))
out=${OUT:-benchmarks/results}
mkdir -p "$out"

# shellcheck source=/dev/null
source .device/env.sh || { echo "error: .device/env.sh failed; run benchmarks/stage_device.sh here first and carry .device" >&2; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv \
  > "$out/nvidia-smi.csv" 2>&1 || true
# The budget is the whole call's: what installing the wheels took comes off the suite's.
budget=$(( budget > SECONDS + 60 ? budget - SECONDS : 60 ))
echo "suite budget: ${budget} s (set-up took ${SECONDS} s)"

python3 benchmarks/run.py --sections mnist,mnist_speedrun,throughput --seeds 5 --repeats 3 \
  --budget_seconds "$budget" --output_dir "$out" "$@" 2>&1 | tee "$out/suite.log"
