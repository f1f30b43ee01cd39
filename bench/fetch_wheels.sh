#!/usr/bin/env bash
# Download the wheels bench/gpu_check.sh installs on the GPU machine (no internet there). Its image has
# torch, torchaudio, timm, accelerate, numpy, scipy, pandas, pyarrow, scikit-learn, onnx, onnxruntime,
# onnxscript, matplotlib, tqdm, numba, msgpack, lazy-loader, requests, pyyaml; this fetches the rest of what
# `import birdrounds` and the training loop need (audiomentations imports librosa at import time).
# wandb is left out: gpu_check runs logger=none (WITH_WANDB=1 adds it, without its dependencies).
#
#   bench/fetch_wheels.sh [DIR]     # default bench/wheels (git-ignored); then carry DIR to the device
set -euo pipefail
DIR=${1:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/wheels}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
printf '*\n' >"$DIR/.gitignore"
# Versions: what the project's venv resolved (pyproject.toml ranges), for CPython 3.12 on x86-64 Linux.
PKGS=(hydra-core==1.3.8 omegaconf==2.3.1 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 soxr==0.5.0.post1
      audiomentations==0.43.1 numpy-minmax==0.6.0 numpy-rms==0.7.0 python-stretch==0.3.1
      librosa==0.11.0 audioread==3.1.0 decorator==5.3.1 pooch==1.9.0 platformdirs)
[[ "${WITH_WANDB:-0}" == 1 ]] && PKGS+=(wandb)
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d "$DIR" "${PKGS[@]}"
# antlr4-python3-runtime 4.9.3 (hydra's parser) is published as an sdist only: build its pure-Python wheel.
"$PY" -m pip wheel -q --no-deps -w "$DIR" antlr4-python3-runtime==4.9.3
ls -1 "$DIR"/*.whl
du -sh "$DIR"
