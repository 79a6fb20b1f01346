#!/usr/bin/env bash
# On the GPU machine: checks and unpacks the parts scripts/pack_dali.sh made into SITE (no pip,
# no network), then proves the import. Afterwards: export PYTHONPATH=SITE:$PYTHONPATH
#
#   bash scripts/gpu_dali_install.sh DIR SITE      # DIR holds dali-*.tar.xz.part-* and SHA256SUMS
set -euo pipefail
case "${1:-}" in -h|--help|"") sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; echo "usage: $0 DIR SITE"; [ -n "${1:-}" ]; exit $?;; esac
DIR=$1 SITE=$2
( cd "$DIR" && sha256sum -c --quiet SHA256SUMS ) || { echo "gpu_dali_install: a part is damaged or missing" >&2; exit 2; }
mkdir -p "$SITE"
cat "$DIR"/dali-*.tar.xz.part-* | xz -d | tar xf - -C "$SITE"
PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" ${PYTHON:-python3} -c \
  "import nvidia.dali as d, nvidia.dali.fn; print(f'gpu_dali_install: DALI {d.__version__} imports from {d.__file__}')"
