#!/usr/bin/env bash
# One run on a GPU machine that fits its limits: stages in order of value, each under its own
# timeout, each appending one JSON line to $OUT/summary.jsonl as it finishes (a run killed at
# its limit keeps what it did). Logs and per-stage outputs (no checkpoints) go into ONE tarball,
# $OUT/logs.tar.gz (under 16 MiB); nothing else is written under $OUT. Uses the machine's own
# python3 and this checkout: no .venv, no install (PYTHON to choose another interpreter).
#
#   bash scripts/gpu_check.sh [--budget SECONDS] [--out DIR]   # on the GPU machine (default budget 540 s)
#   bash scripts/gpu_check.sh --dry-run [--out DIR]            # the rehearsal on a CPU: every stage's
#                                                              # code path at tiny sizes (make test runs it)
#   bash scripts/gpu_results.sh DIR                            # here: DIR's results -> benchmarks/results/
#
# Stages (estimated GPU seconds / limit): doctor (60/150: environment, self-checks, throughput
# probe) | model (150/240: BEiT-B/16 step bf16 batch 128, compiled fused vs unfused, SDPA vs
# Flex) | gpu_tests (120/240: tests/test_gpu.py) | dali_loader (120/240: the loader alone and with
# the step, needs DALI) | train
# (180/300: bench_train.py, the original recipe vs beitfast end to end, needs DALI) | tokenizer
# (45/120) | kernels (30/90) | masking (20/60) | finetune (60/150) | segment (60/150). A stage
# whose estimate no longer fits the budget is skipped and its line says so. The limits of the
# machine this is planned for: README, "The GPU check".
set -uo pipefail
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; echo "usage: $0 [--dry-run] [--budget SECONDS] [--out DIR]"; }
DRY=0 BUDGET=540 BUDGET_SET=0 OUT=${OUT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0;;
    --dry-run) DRY=1;;
    --budget) BUDGET=$2; BUDGET_SET=1; shift;;
    --out) OUT=$2; shift;;
    *) echo "gpu_check: unknown argument $1" >&2; usage >&2; exit 2;;
  esac
  shift
done
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
read -r -a PY <<< "${PYTHON:-python3}"
OUT=${OUT:-$ROOT/benchmarks/results/gpu-run-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SUMMARY="$OUT/summary.jsonl"
: > "$SUMMARY"
T0=$(date +%s)
status=0
if [ "$DRY" = 0 ]; then
  "${PY[@]}" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check: ${PY[*]}'s torch sees no CUDA device (use --dry-run on a CPU)" >&2; exit 2; }
  nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1
else
  export BEITFAST_GPU_TEST_DEVICE=cpu TRITON_INTERPRET=1
fi
HAVE_DALI=0
"${PY[@]}" -c "import nvidia.dali" 2>/dev/null && HAVE_DALI=1

# line NAME STATUS SECONDS RC LOG [REASON]: one JSON line for the stage (its log's last line when it is JSON)
line() {
  "${PY[@]}" - "$@" >> "$SUMMARY" <<'PY'
import json, sys
name, status, secs, rc, log = sys.argv[1:6]
row = {"stage": name, "status": status, "seconds": float(secs), "rc": int(rc)}
if len(sys.argv) > 6:
    row["reason"] = sys.argv[6]
try:
    tail = [x for x in open(log).read().splitlines() if x.strip()][-3:]
except OSError:
    tail = []
if tail:
    try:
        row["result"] = json.loads(tail[-1])
    except ValueError:
        row["tail"] = tail
print(json.dumps(row))
PY
}

# stage NAME EST LIMIT NEEDS_DALI command...
stage() {
  local name=$1 est=$2 limit=$3 dali=$4; shift 4
  local now=$(( $(date +%s) - T0 )) log="$WORK/$name.log"
  if [ "$dali" = 1 ] && [ "$HAVE_DALI" = 0 ]; then
    line "$name" skipped 0 0 /dev/null "DALI not importable (README: carrying DALI to the GPU machine)"; return
  fi
  if { [ "$DRY" = 0 ] || [ "$BUDGET_SET" = 1 ]; } && [ $(( now + est )) -gt "$BUDGET" ]; then
    line "$name" skipped 0 0 /dev/null "budget: ${now}s used, estimate ${est}s, budget ${BUDGET}s"
    echo "gpu_check: $name skipped (budget)"; return
  fi
  [ "$DRY" = 1 ] && limit=$(( limit * 3 ))  # a shared 2-core CPU: slower and noisier than the GPU machine
  echo "gpu_check: $name (estimate ${est}s, limit ${limit}s) ..."
  local t=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  local rc=$? secs=$(( $(date +%s) - t )) st=ok
  [ $rc -eq 0 ] || { st=failed; status=1; }
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && st=timeout
  line "$name" "$st" "$secs" "$rc" "$log"
  echo "gpu_check: $name $st in ${secs}s"; [ "$st" = ok ] || tail -n 5 "$log"
}

if [ "$DRY" = 1 ]; then  # tiny sizes: the same code paths in seconds to minutes on a CPU
  TINY=(--tiny)
  DOCTOR=(--cfg tiny.yaml --steps 1 data.batch_size=2 model.img_size=32 mask.num_patches=4 mask.min_patches=2)
  DEV=(train.device=cpu train.precision=fp32)
  TOY=(--per-class 8 --val-per-class 2)
else
  TINY=()
  DOCTOR=(--cfg base.yaml)
  DEV=(train.device=cuda train.precision=auto data.workers=4)
  TOY=(--per-class 40 --val-per-class 10)
fi
stage doctor 60 150 0 "${PY[@]}" -m beitfast.doctor "${DOCTOR[@]}"
stage model 150 240 0 "${PY[@]}" benchmarks/bench_model.py "${TINY[@]}"
# the dry run takes the kernel tests only (the whole file on a CPU costs minutes of make test)
[ "$DRY" = 1 ] && GPU_TESTS=(-k "layer_norm or residual") || GPU_TESTS=()
stage gpu_tests 120 240 0 env -u TRITON_INTERPRET ${BEITFAST_GPU_TEST_DEVICE:+TRITON_INTERPRET=1} \
  "${PY[@]}" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py "${GPU_TESTS[@]}"
stage dali_loader 120 240 1 "${PY[@]}" benchmarks/bench_loader.py "${TINY[@]}"
stage train 180 300 1 "${PY[@]}" benchmarks/bench_train.py "${TINY[@]}" --results "$WORK/bench_train_rows.jsonl"
stage tokenizer 45 120 0 "${PY[@]}" benchmarks/bench_tokenizer.py "${TINY[@]}"
stage kernels 30 90 0 "${PY[@]}" benchmarks/bench_kernels.py "${TINY[@]}"
stage masking 20 60 0 "${PY[@]}" benchmarks/bench_masking.py "${TINY[@]}"
"${PY[@]}" data_prep/make_toy_imagenet.py --out "$WORK/toy" "${TOY[@]}" --no-progress > "$WORK/toy.log" 2>&1
"${PY[@]}" data_prep/make_toy_imagenet.py --segmentation --out "$WORK/seg" "${TOY[@]}" --no-progress >> "$WORK/toy.log" 2>&1
FT=(data.root="$WORK/toy" log.out_dir="$WORK/finetune" log.progress=false "${DEV[@]}")
SEG=(data.root="$WORK/seg" log.out_dir="$WORK/segment" log.progress=false "${DEV[@]}")
[ "$DRY" = 1 ] && FT+=(train.epochs=1 optim.warmup_epochs=0 data.batch_size=8 train.global_batch=8) \
  && SEG+=(train.iters=4 train.eval_every=4 log.ckpt_every=4 optim.warmup_iters=1 data.batch_size=2 train.global_batch=2)
stage finetune 60 150 0 "${PY[@]}" beitfast/finetune.py --cfg finetune_tiny.yaml "${FT[@]}"
stage segment 60 150 0 "${PY[@]}" beitfast/segment.py --cfg seg_tiny.yaml "${SEG[@]}"

# one tarball of the logs and small outputs (no checkpoints, no data); the limits checked
find "$WORK" \( -name '*.pt' -o -name '*.beton' -o -name '*.JPEG' -o -name '*.png' -path '*/toy*' \) -delete 2>/dev/null
rm -rf "$WORK/toy" "$WORK/seg"
tar czf "$OUT/logs.tar.gz" -C "$WORK" .
"${PY[@]}" - "$OUT" <<'PY' || status=1
import os, sys
out = sys.argv[1]
files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
depth = max(os.path.relpath(f, out).count(os.sep) for f in files)
big = [f for f in files if os.path.getsize(f) > 16 * 2**20]
print(f"gpu_check: {len(files)} file(s) under {out} (at most 8), depth {depth} (at most 2), "
      f"largest {max(os.path.getsize(f) for f in files) / 2**20:.2f} MiB (at most 16)")
sys.exit(1 if len(files) > 8 or depth > 2 or big else 0)
PY
echo "gpu_check: done in $(( $(date +%s) - T0 ))s (exit $status); $SUMMARY and $OUT/logs.tar.gz"
exit $status
