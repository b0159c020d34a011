#!/usr/bin/env bash
# The CUDA run of issue 19, from a bare machine with an NVIDIA GPU and Python 3.10+ (target: under 8
# minutes on one large GPU): installs what it needs into .venv-gpu, then
#   1. the kernel tests natively on CUDA (and the interpreted ones),
#   2. the kernel workbench (python -m minidiff.kernels.bench: per op / shape of SD 1.5 and SDXL, fp16),
#   3. SD 1.5 / SDXL UNet steps at fp16: eager, compiled, with kernels, kernels + compiled, peak memory,
#   4. SD 1.5 (512x512) / SDXL (1024x1024) whole images at fp16 (bench/gpu_images.py): eager, compiled, with
#      kernels, model offload, sequential offload, peak memory (IMAGE_STEPS Euler steps, default 4).
# Everything is printed as Markdown tables and kept in bench/gpu-results.md.
#   bench/gpu.sh            # on the CUDA machine
#   DRY_RUN=1 bench/gpu.sh  # anywhere: the existing venv (PYTHON=...), CPU, small shapes, no install
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/gpu-results.md
if [ "${DRY_RUN:-0}" = 1 ]; then
    PY=${PYTHON:-python3}
    SMALL="--small --repeat 2 --no-compile" STEP="--tiny --repeat 2 --no-compile" IMAGES="--tiny --steps 2 --no-compile"
else
    command -v nvidia-smi >/dev/null && nvidia-smi -L || { echo "bench/gpu.sh: no NVIDIA GPU here (nvidia-smi missing); DRY_RUN=1 runs the CPU dry run" >&2; exit 1; }
    [ -d .venv-gpu ] || python3 -m venv .venv-gpu
    PY=.venv-gpu/bin/python
    $PY -m pip install -q --upgrade pip
    $PY -m pip install -q torch triton  # PyPI's Linux torch wheel is the CUDA build
    $PY -m pip install -q -e ".[test]"
    $PY -m pip install -q --no-deps open-clip-torch k-diffusion==0.1.1.post1
    SMALL="" STEP="" IMAGES="--steps ${IMAGE_STEPS:-4}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
    echo "# bench/gpu.sh, $(date -u +%Y-%m-%dT%H:%MZ)"
    $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} | tee "$OUT"
START=$SECONDS
echo "## 1. kernel tests" | tee -a "$OUT"
$PY -m pytest -q tests/test_kernels.py -k "triton_kernels" -p no:cacheprovider 2>&1 | tail -5 | tee -a "$OUT"
echo "## 2. kernel workbench ($((SECONDS - START)) s in)" | tee -a "$OUT"
$PY -m minidiff.kernels.bench $SMALL 2>&1 | tee -a "$OUT"
echo "## 3. UNet steps ($((SECONDS - START)) s in)" | tee -a "$OUT"
$PY bench/unet_step.py $STEP 2>&1 | tee -a "$OUT"
echo "## 4. whole images ($((SECONDS - START)) s in)" | tee -a "$OUT"
$PY bench/gpu_images.py $IMAGES 2>&1 | tee -a "$OUT"
echo "done in $((SECONDS - START)) s (after the install); results in $OUT" | tee -a "$OUT"
