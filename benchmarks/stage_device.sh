#!/usr/bin/env bash
# Stages, here, everything benchmarks/on_device.sh needs on the lent GPU machine, into .device/
# (git-ignored; carry it to the machine):
#
#   bash benchmarks/stage_device.sh [PYTHON]        # default .venv/bin/python
#
# ../shared/device/stage.sh brings wheels of tensorflow-datasets, grain, array_record and
# ml-collections and an already prepared MNIST. In a stand-in for that machine (Python 3.12 with
# only jax, flax, optax, orbax-checkpoint, chex and torchvision's dependencies installed) those
# wheels still left TFDS, Grain and jaxcnn's metric writer unable to import: TFDS needs six, wrapt
# and tqdm, Grain cloudpickle, and the TensorBoard event writer the tensorboard package. This adds
# Python 3.12 wheels of those (pure Python but wrapt), which the machine's env.sh installs with the
# rest.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv/bin/python}
../shared/device/stage.sh "$py"
"$py" -m pip download --quiet --dest .device/wheels --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any \
  six wrapt tqdm cloudpickle tensorboard
ls .device/wheels
