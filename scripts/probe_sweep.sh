#!/bin/bash
# The linear-probe lr x epochs sweep of the README (issue 23 item 4): a 200-epoch micro encoder
# of the K study, a random one and raw pixels, on the 64 px random-palette toy set. Rows ->
# runs/probesweep/results.jsonl, one per finished run; a run whose row is there is not run again,
# a failed run writes no row and the script exits 1 after the rest.
#   bash scripts/probe_sweep.sh                 # needs runs/kstudy (beitfast/kstudy.py) for the pretrained encoder
#   bash scripts/probe_sweep.sh --tiny CKPT DATA   # seconds (tests/test_kstudy.py): CKPT's encoder, random and
#                                                  # pixels on DATA, 1 epoch at one lr
# PROBE_OUT=DIR: rows and runs under DIR (default runs/probesweep); PYTHON: the interpreter (default .venv/bin/python).
cd "$(dirname "$0")/.."  # the project root
P=${PYTHON:-.venv/bin/python}
D=data/toy_imagenet_rp64
CKPT=runs/kstudy/runs/k2_e200_s0/pretrain/ckpt.pt
OUTD=${PROBE_OUT:-runs/probesweep}
EPOCHS=(100 300)
LRS=(1e-3 3e-3 1e-2 3e-2 1e-1)
if [ "${1:-}" = --tiny ]; then CKPT=$2 D=$3 EPOCHS=(1) LRS=(1e-2); fi
out=$OUTD/results.jsonl
mkdir -p "$OUTD"
touch "$out"
failed=0
for enc in k2_e200 random pixels; do
  case $enc in
    k2_e200) src=(--ckpt "$CKPT");;
    random) src=(--ckpt random);;
    pixels) src=(--pixels);;
  esac
  for ep in "${EPOCHS[@]}"; do for lr in "${LRS[@]}"; do
    key="$enc|$ep|$lr"
    grep -qF "\"key\": \"$key\"" "$out" && continue
    if ! $P beitfast/linprobe.py "${src[@]}" --cfg micro.yaml --data "$D" --out "$OUTD/$enc" --epochs $ep --lr $lr \
         --no-progress data.root="$D" > "$OUTD/last.log" 2>&1; then
      echo "FAIL $key"; tail -5 "$OUTD/last.log"; failed=1; continue  # no row from a stale probe.json
    fi
    $P -c "import json,sys; r=json.load(open('$OUTD/$enc/probe.json')); print(json.dumps({'key':'$key','encoder':'$enc','epochs':$ep,'lr':$lr,'acc':r['acc'],'best_block':r['best_block'],'per_block':r['per_block'],'knn':r['knn']['acc']}))" >> "$out"
    tail -n 1 "$out" | cut -c1-120
  done; done
done
echo SWEEP DONE
exit $failed
