#!/usr/bin/env bash
# TensorRT for RTX on a lent GPU with no network: carry its wheels in two device calls, then build and run.
#
# The libs wheel (tensorrt_rtx_cu13_libs, ~95 MB) is over the 64 MiB one device call carries, so `prepare` (here,
# with network) splits it into two parts in two git-ignored folders; call 1 leaves part 1 in /tmp/trtrtx on the
# device machine (files outside the repository survive there while it stays warm, 30 s after a call); call 2
# brings part 2 and the bindings, reassembles and checks the wheel against its sha256, installs into
# /tmp/trtrtx/site and runs bench/trt_rtx_gpu.py (build, run on the GPU, time against the PyTorch backend).
#
#   bash bench/trt_rtx_gpu.sh prepare                     # here: download + split into .trtrtx-a/ .trtrtx-b/
#   device run, carry [".trtrtx-a"]:  bash bench/trt_rtx_gpu.sh stage1
#   device run, carry [".trtrtx-b"], at once after:  bash bench/trt_rtx_gpu.sh run
# `prepare` uses $PYTHON (default python3) with pip and network. The GPU image's python3 is 3.12 with a CUDA 13 torch, hence the cp312 / cu13 wheels.
set -euo pipefail
VERSION=1.7.1.116
SCRATCH=/tmp/trtrtx

case "${1:-}" in
prepare)
  dl=$(mktemp -d)
  "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$dl" "tensorrt-rtx-cu13-libs==$VERSION" "tensorrt-rtx-cu13-bindings==$VERSION"
  "${PYTHON:-python3}" -m pip download -q --no-deps --no-binary=:all: -d "$dl" "tensorrt-rtx-cu13==$VERSION"  # tensorrt_rtx/
  rm -rf .trtrtx-a .trtrtx-b && mkdir -p .trtrtx-a .trtrtx-b
  grep -qx '/.trtrtx-a/' .git/info/exclude 2>/dev/null || printf '/.trtrtx-a/\n/.trtrtx-b/\n' >> "$(git rev-parse --git-path info/exclude)"
  libs=$(ls "$dl"/tensorrt_rtx_cu13_libs-*.whl)
  (cd "$dl" && sha256sum "$(basename "$libs")" > libs.sha256)
  split -n 2 -d "$libs" "$dl/libs.part-"
  mv "$dl/libs.part-00" "$dl/libs.sha256" .trtrtx-a/
  mv "$dl/libs.part-01" "$dl"/tensorrt_rtx_cu13_bindings-*.whl "$dl"/tensorrt_rtx_cu13-*.tar.gz .trtrtx-b/
  rm -rf "$dl"
  du -sh .trtrtx-a .trtrtx-b
  ;;
stage1)
  mkdir -p "$SCRATCH" && cp .trtrtx-a/* "$SCRATCH"/ && ls -la "$SCRATCH"
  nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv
  ;;
run)
  [ -f "$SCRATCH/libs.part-00" ] || { echo "no $SCRATCH/libs.part-00: run 'stage1' on this machine first (it went back?)"; exit 3; }
  cp .trtrtx-b/* "$SCRATCH"/
  cd "$SCRATCH"
  wheel=$(cut -d' ' -f3 libs.sha256)
  cat libs.part-00 libs.part-01 > "$wheel" && sha256sum -c libs.sha256
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SCRATCH/site" "$wheel" tensorrt_rtx_cu13_bindings-*.whl
  tar xzf tensorrt_rtx_cu13-*.tar.gz && cp -r tensorrt_rtx_cu13-*/tensorrt_rtx "$SCRATCH/site/"
  cd - >/dev/null
  export PYTHONPATH="$SCRATCH/site:$PWD" PIPELINE_HOME=/tmp/trt-home PYTHONUNBUFFERED=1
  python3 -c "import tensorrt_rtx, torch; print('tensorrt_rtx', tensorrt_rtx.__version__, 'on', torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
  out="${OUT:-/tmp/trt-out}" && mkdir -p "$out"
  python3 bench/trt_rtx_gpu.py --shape gpt2 --new-tokens 64 --out "$out" 2>&1 | tee "$out/log.txt"
  ;;
*)
  echo "usage: bash bench/trt_rtx_gpu.sh prepare | stage1 | run"; exit 2 ;;
esac
