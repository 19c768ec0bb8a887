#!/usr/bin/env bash
# The paper's CIFAR-10 BadNets setting (benchmarks/paper_setting.py: ResNet-18, 40 epochs, 500 poisons, the audit and
# a retrain) on one GPU, in one command of at most ten minutes, on a machine that has PyTorch, Lightning and
# torchvision but no network.
#
#   bash benchmarks/gpu_setting.sh prepare [cifar10-jpeg.tar.gz]   # here, with network: fills gpu/ (git-ignored)
#   bash benchmarks/gpu_setting.sh run                             # there, with gpu/ beside the checkout
#
# `prepare` downloads the wheels the GPU machine lacks (kronfluence, jsonargparse, omegaconf and the packages they
# need that are not there; for Python 3.12), and copies the CIFAR-10 image-folder archive (19 MB; default: the shared
# data beside this checkout). `run` installs them and the project without network, extracts the images and runs
# paper_setting.py with W&B off, bf16 mixed precision, one corrective round and no second opinion (so that the
# victim's training, the audit and the retrain fit in the call); it prints the table and leaves paper_setting.json
# and the log in $OUT when set (else in gpu/out).
set -euo pipefail
cd "$(dirname "$0")/.."
HERE=gpu
WHEELS=(kronfluence einconv jsonargparse docstring-parser typeshed-client importlib-resources omegaconf)

case "${1:-}" in
prepare)
    archive="${2:-../shared/data/cifar10-jpeg.tar.gz}"
    mkdir -p "$HERE/wheels"
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
        -d "$HERE/wheels" "${WHEELS[@]}"
    cp "$archive" "$HERE/cifar10-jpeg.tar.gz"
    du -sh "$HERE"
    ;;
run)
    out="${OUT:-$HERE/out}"
    mkdir -p "$out" "$HERE/data"
    python3 -m pip install --no-index --no-deps --find-links "$HERE/wheels" "${WHEELS[@]}" -q
    python3 -m pip install --no-index --no-deps --no-build-isolation -e . -q
    [ -d "$HERE/data/cifar10/train" ] || tar xzf "$HERE/cifar10-jpeg.tar.gz" -C "$HERE/data"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
    timeout 560 python3 benchmarks/paper_setting.py \
        --data.dataset folder --data.root "$HERE/data/cifar10" --data.download false \
        --trainer.logger false --trainer.precision bf16-mixed --trainer.default_root_dir "$HERE/runs" \
        --data.num_workers 8 --detector.num_workers 8 \
        --delta_influence.corrective_rounds 1 --delta_influence.second_opinion null 2>&1 | tee "$out/paper_setting.log"
    find "$HERE/runs" -name paper_setting.json -newer "$out/gpu.txt" -exec cp {} "$out/" \;
    ;;
*)
    echo "usage: bash benchmarks/gpu_setting.sh prepare [cifar10-jpeg.tar.gz] | run" >&2
    exit 2
    ;;
esac
