#!/bin/bash
# Why does a pretrained backbone segment the toy set worse than a random one? (issue 23 item 3)
# The micro BEiT (configs/seg_micro.yaml: UperNet or SETR-PUP at the pretraining size, 32 px crops)
# from K-study encoders against random init: layer decay x lr, the head, the pretraining length,
# the fine-tuning budget. Rows -> runs/segsweep/results.jsonl, one per finished run; a run whose
# row is there is not run again, a failed run writes no row and the script exits 1 after the rest.
#   bash scripts/seg_sweep.sh ENCODER...   # ENCODER: random, or NAME=path/to/ckpt.pt (K-study runs)
#   SWEEP_SETTINGS=2 bash scripts/seg_sweep.sh ...   # the first 2 settings only
#   bash scripts/seg_sweep.sh --report [ROWS.jsonl]     # the table (mIoU / pixel accuracy) of the rows there
#   bash scripts/seg_sweep.sh --tiny ENCODER...    # seconds (tests/test_kstudy.py): 6 toy images, one setting of 2 iterations
# SWEEP_OUT=DIR: rows and runs under DIR (default runs/segsweep); PYTHON: the interpreter (default .venv/bin/python).
# The README's runs (2026-12-02), encoders of the K study (beitfast/kstudy.py, runs/kstudy):
#   bash scripts/seg_sweep.sh pre200=runs/kstudy/runs/k10_e200_s1/pretrain/ckpt.pt random   # K=10, 200 epochs, seed 1
#   SWEEP_SETTINGS=2 bash scripts/seg_sweep.sh pre50=runs/kstudy/runs/k1_e50_s0/pretrain/ckpt.pt   # K=1, 50 epochs
#   SWEEP_SETTINGS=3 bash scripts/seg_sweep.sh pre50k10=runs/segsweep/enc/k10_e50_s0/ckpt.pt    # K=10, 50 epochs, seed 0:
#     the K study's k10 50-epoch seed-0 run again (its cache with make_cache(..., 10, 0, ...), then beitfast/train.py
#     --cfg micro.yaml train.epochs=50 train.seed=0 mask.seed=0 data.cache=... data.views=10), no memorisation probe
cd "$(dirname "$0")/.."
P=${PYTHON:-.venv/bin/python}
D=data/toy_ade20k
OUTD=${SWEEP_OUT:-runs/segsweep}
out=$OUTD/results.jsonl
TINY=0 TOYSET="train=300, val=60" EXTRA=()  # --tiny: a 6-image set, one setting of 2 iterations at batch 2
if [ "${1:-}" = --tiny ]; then
  TINY=1 D=$OUTD/toy_ade20k_tiny TOYSET="train=4, val=2, sides=(40, 64)"
  EXTRA=(data.batch_size=2 train.global_batch=2 log.every=1); shift
fi
if [ "${1:-}" = --report ]; then
  exec $P - "${2:-$out}" <<'PY'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
order = {"pre200": 0, "pre50k10": 1, "pre50": 2, "random": 9}  # the README's; any other encoder between
encs = sorted(dict.fromkeys(r["encoder"] for r in rows), key=lambda e: order.get(e, 5))
keys = []
for r in rows:
    k = (r["head"], r["layer_decay"], r["lr"], r["iters"], r["seed"])
    if k not in keys:
        keys.append(k)
print("| head | layer decay | lr | iterations | seed | " + " | ".join(f"{e}: mIoU / pixel acc." for e in encs) + " |")
print("|---|---|---|---|---|" + "---|" * len(encs))
for k in keys:
    by = {r["encoder"]: r for r in rows if (r["head"], r["layer_decay"], r["lr"], r["iters"], r["seed"]) == k}
    cells = [f"{by[e]['miou']:.1f} / {by[e]['aacc']:.1f}%" if e in by else "-" for e in encs]
    print(f"| {k[0]} | {k[1]} | {k[2]:g} | {k[3]} | {k[4]} | " + " | ".join(cells) + " |")
PY
fi
mkdir -p $OUTD
touch $out
$P -c "from data_prep.make_toy_imagenet import make_segmentation as m; m('$D', $TOYSET, progress=False)"
failed=0
one() {  # ENC_NAME CKPT HEAD LAYER_DECAY LR ITERS SEED
  local name=$1 ck=$2 head=$3 ld=$4 lr=$5 it=$6 seed=$7
  local key="$name|$head|$ld|$lr|$it|$seed" dir=$OUTD/$name-$head-ld$ld-lr$lr-it$it-s$seed
  grep -qF "\"key\": \"$key\"" $out && return
  if ! $P beitfast/segment.py --cfg seg_micro.yaml data.root=$D log.out_dir=$dir log.progress=false \
       model.pretrained=$ck model.head=$head optim.layer_decay=$ld optim.lr=$lr train.iters=$it \
       train.eval_every=$it log.ckpt_every=$it optim.warmup_iters=$(( it / 10 )) train.seed=$seed \
       "${EXTRA[@]}" > $dir.log 2>&1; then
    echo "FAIL $key"; tail -5 $dir.log; failed=1; return  # no row from a stale eval.json
  fi
  $P -c "import json; r=json.load(open('$dir/eval.json')); print(json.dumps({'key':'$key','encoder':'$name','ckpt':'$ck','head':'$head','layer_decay':$ld,'lr':$lr,'iters':$it,'seed':$seed,'miou':r['miou'],'aacc':r['aacc'],'iou':r['iou']}))" >> $out
  tail -n 1 $out | cut -c1-160
  rm -f $dir/ckpt.pt
}
# settings outer, encoders inner: the first hour compares every encoder at the reference recipe
SETTINGS=("upernet 0.65 1e-3 200 0" "upernet 1.0 1e-3 200 0" "upernet 0.9 1e-3 200 0" "setr_pup 0.65 1e-3 200 0"
          "upernet 1.0 3e-3 200 0" "upernet 0.65 1e-3 200 1" "upernet 0.65 1e-3 600 0" "upernet 1.0 3e-4 200 0")
SETTINGS=("${SETTINGS[@]:0:${SWEEP_SETTINGS:-${#SETTINGS[@]}}}")  # SWEEP_SETTINGS=N: the first N only
[ $TINY = 1 ] && SETTINGS=("upernet 0.65 1e-3 2 0")
for setting in "${SETTINGS[@]}"; do
  for enc in "$@"; do
    if [ "$enc" = random ]; then name=random ck=""; else name=${enc%%=*} ck=${enc#*=}; fi
    [ -z "$ck" ] || [ -f "$ck" ] || { echo "no $ck (yet): $name skipped"; failed=1; continue; }
    one "$name" "$ck" $setting
  done
done
echo SWEEP DONE
exit $failed
