#!/usr/bin/env bash
# Downloads, into DIR, the wheels bmask_jax needs beyond what the GPU machine has, so that they
# travel with the checkout to a machine with no network (issue 11, item 5).
#
#   experiments/device_wheels.sh build/wheels            # build/ is git-ignored: carry it
#   experiments/device_wheels.sh --core-only build/wheels
#
# The GPU machine has CPython 3.12 with jax (CUDA plugin), flax, optax, orbax-checkpoint, chex,
# torch, torchvision, numpy, pillow, matplotlib, tqdm, absl-py and tensorboard, and with them
# PyYAML (flax), etils and psutil (orbax), protobuf and packaging (tensorboard); not six
# (python-dateutil 4 dropped it; promise needs it). What is still missing, pinned to setup.py's
# lower bounds and this environment's versions:
#   core: what importing bmask_jax.train / evaluate / experiments needs (ml_collections for the
#         configs, pycocotools for the mask ops) and the training loop's tensorboardX;
#   tfds: tensorflow-datasets and what data.dataset=tfds loads at import and when reading
#         (measured: the modules loaded by tests/test_tfds_coco.py). Left out as never loaded
#         there: pyarrow (~40 MiB), requests, simple_parsing, psutil.
# promise has no wheel on PyPI (sdist only); it is pure Python and is built into one here.
# On the GPU machine (see experiments/device_check.py):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site build/wheels/*.whl
set -euo pipefail

core_only=0
if [[ "${1:-}" == "--core-only" ]]; then core_only=1; shift; fi
dir="${1:?usage: $0 [--core-only] DIR}"
mkdir -p "$dir"

core=(ml-collections==1.1.0 pycocotools==2.0.11 tensorboardX==2.6.5)
tfds=(tensorflow-datasets==4.9.10 array_record==0.8.6 dm-tree==0.1.10 immutabledict==4.3.1
      importlib_resources==7.1.0 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0
      termcolor==3.3.0 toml==0.10.2 wrapt==2.1.2 six==1.17.0)
wanted=("${core[@]}")
if (( ! core_only )); then wanted+=("${tfds[@]}"); fi

for spec in "${wanted[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$dir" "$spec"
done
if (( ! core_only )); then
  python3 -m pip wheel -q --no-deps -w "$dir" promise==2.3
fi

ls -l "$dir"/*.whl
total=$(du -cb "$dir"/*.whl | tail -1 | cut -f1)
echo "$(ls "$dir"/*.whl | wc -l) wheels, $((total / 1024)) KiB in all"
if (( total > 40 * 1024 * 1024 )); then
  echo "over 40 MiB: with the checkout it would not fit the 64 MiB the GPU machine takes" >&2
  exit 1
fi
