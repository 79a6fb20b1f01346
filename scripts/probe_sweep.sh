#!/bin/bash
# The linear-probe lr x epochs sweep of the README (issue 23 item 4): a 200-epoch micro encoder
# of the K study, a random one and raw pixels, on the 64 px random-palette toy set; rows -> runs/probesweep/results.jsonl
cd "$(dirname "$0")/.."  # the project root; needs runs/kstudy (beitfast/kstudy.py) for the pretrained encoder
P=.venv/bin/python
D=data/toy_imagenet_rp64
out=runs/probesweep/results.jsonl
mkdir -p runs/probesweep
failed=0
for enc in k2_e200 random pixels; do
  case $enc in
    k2_e200) src="--ckpt runs/kstudy/runs/k2_e200_s0/pretrain/ckpt.pt";;
    random) src="--ckpt random";;
    pixels) src="--pixels";;
  esac
  for ep in 100 300; do for lr in 1e-3 3e-3 1e-2 3e-2 1e-1; do
    if ! $P beitfast/linprobe.py $src --cfg micro.yaml --data $D --out runs/probesweep/$enc --epochs $ep --lr $lr --no-progress data.root=$D > runs/probesweep/last.log 2>&1; then
      echo "FAIL $enc epochs $ep lr $lr"; tail -5 runs/probesweep/last.log; failed=1; continue  # no row from a stale probe.json
    fi
    $P -c "import json,sys; r=json.load(open('runs/probesweep/$enc/probe.json')); print(json.dumps({'encoder':'$enc','epochs':$ep,'lr':$lr,'acc':r['acc'],'best_block':r['best_block'],'per_block':r['per_block'],'knn':r['knn']['acc']}))" >> $out
  done; done
done
echo SWEEP DONE
exit $failed
