#!/usr/bin/env bash
# GPU checks, run from the repository root on a CUDA machine:  bash bench/gpu.sh
# Needs only what such a machine has (torch with CUDA, onnxruntime, click, safetensors, numpy);
# nothing is installed: the package is imported through a PYTHONPATH shim. Reports go to
# ${OUT:-bench/reports}. Sections (SECTIONS="bench export" by default, in that order):
# - bench: the swssl-bench suite on CUDA (wide_resnet50_2 and resnet18; torch eager fp32/bf16/fp16
#   channels_last, AOTInductor fp16, ONNX Runtime only with a CUDA provider, TensorRT only when
#   installed; each in exact and dense mode (one trunk pass per slice);
#   batches 1..512; the runner end to end on generated DBT-sized slices, since pydicom is
#   not there to build the demo data, unless data/demo was carried along; an 8192 x 8192 native
#   slide; the official batch-1 loop). Steps stop starting after BENCH_BUDGET seconds (default 200)
#   and the section is killed at BENCH_BUDGET + 90 s, so it ends within 5 minutes; its report,
#   cuda-<date>.md / .json / .png, is rewritten after every step. BENCH_ARGS replaces its arguments
#   (BENCH_ARGS="--device cpu --smoke" is a CPU smoke test of this section).
# - export: the export stage (AOTInductor fp32/fp16/bf16 on CUDA, parity with PyTorch, ONNX Runtime,
#   auto's choice, throughput). About 3-4 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-bench/reports}
PY=${PYTHON:-$(command -v python || command -v python3)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)  # absolute: Python runs from $WORK (below)
if [[ "$PY" == */* ]]; then PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"; fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/swssl-gpu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# swssl.export and swssl.bench live in export/ and bench/ (pyproject's package-dir). Without
# installing anything, link them into a shim package next to swssl's own modules.
mkdir -p "$WORK/shim/swssl"
for entry in "$ROOT"/swssl/*; do ln -s "$entry" "$WORK/shim/swssl/"; done
ln -s "$ROOT/export" "$WORK/shim/swssl/export"
ln -s "$ROOT/bench" "$WORK/shim/swssl/bench"
export PYTHONPATH="$WORK/shim${PYTHONPATH:+:$PYTHONPATH}"
# Python puts the current folder first on sys.path; from the repository root the real swssl/ (without
# export/ and bench/) would shadow the shim, so every Python command runs from $WORK.
cd "$WORK"

"$PY" - <<'PY'
import importlib.util, sys
missing = [m for m in ("torch", "torchvision", "numpy", "click", "onnx", "onnxruntime", "safetensors",
                        "matplotlib", "tqdm") if importlib.util.find_spec(m) is None]
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
if missing:
    print("missing (checks that need them will fail): " + ", ".join(missing))
PY

SECTIONS=${SECTIONS:-bench export}
status=0

# The benchmark suite (swssl.bench; matplotlib and tqdm are optional there: without them no plot,
# no progress bars).
if [[ " $SECTIONS " == *" bench "* ]]; then
  BENCH_BUDGET=${BENCH_BUDGET:-200}
  DEFAULT_BENCH_ARGS="--device cuda --backbone wide_resnet50_2 --backbone resnet18 --backends torch,aoti,tensorrt,onnxruntime
    --precisions fp32,bf16,fp16 --export-precisions fp16 --batches 1,8,32,128,512"
  bench_status=0
  # shellcheck disable=SC2086  # word splitting of the argument lists is intended
  timeout $((BENCH_BUDGET + 90)) "$PY" -m swssl.bench.cli ${BENCH_ARGS:-$DEFAULT_BENCH_ARGS} \
    --budget "$BENCH_BUDGET" --out "$OUT" --work "$WORK/bench" || bench_status=$?
  echo "bench report: $OUT/ (cuda-<date>.md / .json / .png; exit status $bench_status)"
  [ "$bench_status" -eq 0 ] || status=$bench_status
fi

# The export stage (swssl.export.gpu_check writes gpu-export.md / .json as it goes).
if [[ " $SECTIONS " == *" export "* ]]; then
  export_status=0
  # EXPORT_CHECK_ARGS="--device cpu --precisions fp32" makes it a CPU smoke test.
  timeout 300 "$PY" -m swssl.export.gpu_check --out "$OUT" --work "$WORK/export-check" ${EXPORT_CHECK_ARGS:-} || export_status=$?
  echo "export report: $OUT/gpu-export.md (exit status $export_status)"
  [ "$export_status" -eq 0 ] || status=$export_status
fi
exit $status
