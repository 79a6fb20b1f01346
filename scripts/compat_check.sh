#!/usr/bin/env bash
# The compatibility run: a second environment with the OLDEST versions beitfast promises
# (pyproject.toml, environment.yml), and the CPU test suite in it. Not part of `make test`
# (about 5 GB and 20-25 minutes on 2 cores).
#
#   bash scripts/compat_check.sh [pytest args]      # e.g. -x, or tests/test_model.py
#
# Versions (override with the variables): TORCH=2.8.0 TORCHVISION=0.23.0 (the CUDA 12 / V100
# environment's), TRANSFORMERS=4.57.6 (the last 4.x; 5.x is what requirements/constraints.txt
# pins), TIMM=1.0.15; everything else as requirements/constraints.txt pins it. FFCV is not
# built there (its tests skip). The log goes to benchmarks/results/compat-torch<TORCH>.log;
# the last line says what passed.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; echo "usage: $0 [pytest args]"; exit 0;; esac
VENV=${VENV:-.venv-compat}
PY=${PYTHON:-python3}
TORCH=${TORCH:-2.8.0} TORCHVISION=${TORCHVISION:-0.23.0} TRANSFORMERS=${TRANSFORMERS:-4.57.6} TIMM=${TIMM:-1.0.15}
LOG=benchmarks/results/compat-torch$TORCH.log
C=$(mktemp)
# the pinned constraints with the promised floors swapped in (torch picks its own triton)
grep -vE '^(torch|torchvision|triton|transformers|timm|huggingface-hub)[=<>]' requirements/constraints.txt > "$C"
printf 'torch==%s\ntorchvision==%s\ntransformers==%s\ntimm==%s\nhuggingface-hub<1.0\n' \
  "$TORCH" "$TORCHVISION" "$TRANSFORMERS" "$TIMM" >> "$C"
pip_quiet() { "$VENV/bin/pip" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
if [ ! -x "$VENV/bin/python" ]; then
  echo "[compat] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
  pip_quiet install -q --upgrade pip
fi
echo "[compat] installing torch $TORCH, torchvision $TORCHVISION, transformers $TRANSFORMERS, timm $TIMM"
pip_quiet install -q --disable-pip-version-check -c "$C" -r requirements/base.txt
pip_quiet install -q --disable-pip-version-check -c "$C" --no-deps dall-e
pip_quiet install -q --disable-pip-version-check -c "$C" --no-deps --no-build-isolation -e .
echo "FFCV is not built in the compatibility environment" > "$VENV/ffcv-unavailable.txt"
versions=$("$VENV/bin/python" -c "
import torch, torchvision, triton, transformers, timm, numba, nvidia.dali as d
print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, triton {triton.__version__}, '
      f'transformers {transformers.__version__}, timm {timm.__version__}, numba {numba.__version__}, DALI {d.__version__}')")
echo "[compat] $versions"
mkdir -p "$(dirname "$LOG")"
{ echo "# $(date -u +%F) $(uname -m), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
  echo "# $versions"; } > "$LOG"
set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "[compat] $versions: pytest exit $rc ($(tail -n 1 "$LOG" | tr -d '='))" | tee -a "$LOG"
exit "$rc"
