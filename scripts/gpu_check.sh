#!/usr/bin/env bash
# One call on a GPU machine: the GPU correctness tests, then the benchmarks whose GPU figures
# the README still lacks. Uses the machine's own Python (PYTHON, default python3): GPU
# machines carry torch/triton/numba/timm/pyyaml/tqdm but may lack DALI and dall_e, whose
# parts skip. Results: $OUT (default benchmarks/results/gpu-<date>) holds pytest_gpu.log, pytest_cpu.log and one
# <bench>.json per benchmark (its last line), plus nvidia-smi.txt. With DALI installed (see
# ../shared/gpu/pack_dali.sh) the GPU tests also cover the DALI GPU pipeline (nvJPEG decoder vs
# CPU, the stream handoff, no host sync per batch), and bench_loader.py / bench_tokenize.py /
# bench_train.py (the original recipe vs beitfast, BEiT-B/16, end to end) run.
#
#   bash scripts/gpu_check.sh            # everything (about 10 minutes on an H100)
#   QUICK=1 bash scripts/gpu_check.sh    # tests and kernel benchmark only
set -uo pipefail
case "${1:-}" in -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; echo "usage: [QUICK=1] [PYTHON=python3] [OUT=dir] $0"; exit 0;; esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M)}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "gpu_check: $PY's torch sees no CUDA device; run this on a GPU machine" >&2; exit 2; }
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

status=0
# first: the environment and every start-up self-check on this GPU (beitfast/doctor.py)
"$PY" -m beitfast.doctor --cfg base.yaml 2>&1 | tee "$OUT/doctor.log" | tail -4
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
tail -n 1 "$OUT/doctor.log" > "$OUT/doctor.json"
# GPU tests with the kernels compiled for real (TRITON_INTERPRET must be unset at import)
env -u TRITON_INTERPRET "$PY" -m pytest -q -rs tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# the CPU kernel and model tests (twins, interpreter, timm/HF parity) under this machine's torch
TRITON_INTERPRET=1 "$PY" -m pytest -q tests/test_kernels.py tests/test_model.py 2>&1 | tee "$OUT/pytest_cpu.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# the evaluation jobs on the GPU in bf16 at toy scale: fine-tuning and segmentation end to end
T=$(mktemp -d)
"$PY" data_prep/make_toy_imagenet.py --out "$T/toy" --per-class 40 --val-per-class 10 --no-progress > /dev/null \
  && "$PY" data_prep/make_toy_imagenet.py --segmentation --out "$T/seg" --per-class 64 --val-per-class 16 --no-progress > /dev/null \
  && "$PY" beitfast/finetune.py --cfg finetune_tiny.yaml data.root="$T/toy" train.device=cuda train.precision=bf16 \
       data.workers=4 log.out_dir="$OUT/finetune_tiny" log.progress=false > "$OUT/finetune_tiny.log" 2>&1 \
  && "$PY" beitfast/segment.py --cfg seg_tiny.yaml data.root="$T/seg" train.device=cuda train.precision=bf16 \
       data.workers=4 log.out_dir="$OUT/seg_tiny" log.progress=false > "$OUT/seg_tiny.log" 2>&1 \
  && echo "gpu_check: fine-tuning and segmentation ran in bf16: $(tail -n 1 "$OUT/finetune_tiny.log" | cut -c1-80) ..." \
  || { echo "gpu_check: an evaluation job failed (see $OUT/finetune_tiny.log, $OUT/seg_tiny.log)"; status=1; }
rm -rf "$T"

benches=(bench_kernels)
[ -n "${QUICK:-}" ] || benches+=(bench_model bench_tokenizer bench_masking)
if [ -z "${QUICK:-}" ] && "$PY" -c "import nvidia.dali" 2>/dev/null; then
  benches+=(bench_loader bench_tokenize bench_train)
else
  echo "gpu_check: DALI not importable: bench_loader, bench_tokenize and bench_train skipped"
fi
for b in "${benches[@]}"; do
  echo "== $b"
  if "$PY" "benchmarks/$b.py" > "$OUT/$b.log" 2>&1; then
    tail -n 1 "$OUT/$b.log" > "$OUT/$b.json"
    grep -v '^{' "$OUT/$b.log" | tail -8
  else
    echo "$b failed (see $OUT/$b.log)"; tail -5 "$OUT/$b.log"; status=1
  fi
done
echo "gpu_check: results in $OUT (exit $status)"
exit $status
