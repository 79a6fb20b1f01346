#!/usr/bin/env bash
# Packs DALI for a GPU machine without network into as few parts as its per-call limit allows:
# only what the training graph loads, for one Python version. From the project root:
#
#   bash scripts/pack_dali.sh [PYVER] [PART_MIB]     # default 312 (the GPU machine's 3.12), 60 MiB
#
# Takes nvidia-dali-cuda130 2.4.0, nvidia-nvimgcodec-cu13 (DALI dlopens it for its decoders) and
# nvidia-nvjpeg 13 (nvImageCodec's GPU JPEG backend), DALI's Python imports (astunparse, gast,
# optree, nvtx, makefun, libcst; the GPU machine's image lacks them); leaves out nvidia-libnvcomp-cu13 (dlopened
# by DALI's decompression operators only; the graph has none) and the 9 other Python versions'
# extension modules; the CUDA 12 wheel (424 MB) is twice the CUDA 13 one (199 MB). Unpacked,
# tarred and xz-compressed into .gpuwheels/dali-<PYVER>.tar.xz.part-NN, with SHA256SUMS
# (.gpuwheels/ is git-ignored). On the GPU machine, once the parts are under DIR:
#
#   bash scripts/gpu_dali_install.sh DIR /tmp/site && export PYTHONPATH=/tmp/site:$PYTHONPATH
set -euo pipefail
case "${1:-}" in -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; echo "usage: $0 [PYVER] [PART_MIB]"; exit 0;; esac
PYVER=${1:-312} PART=${2:-60}
cd "$(dirname "$0")/.."
out=.gpuwheels
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
grep -qx '/.gpuwheels/' .git/info/exclude 2>/dev/null || echo '/.gpuwheels/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:0:1}.${PYVER:1}" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$tmp/whl" nvidia-dali-cuda130==2.4.0 \
  "nvidia-nvimgcodec-cu13>=0.9.0,<0.10.0" "nvidia-nvjpeg>=13,<14" \
  astunparse gast optree nvtx makefun "libcst~=1.8" 2>&1 | grep -v "is ignored" || true
mkdir -p "$tmp/site"
for w in "$tmp"/whl/*.whl; do python3 -m zipfile -e "$w" "$tmp/site"; done
# other Python versions' extension modules (cpython-3XY-...so): not loaded by this interpreter
find "$tmp/site" -name "*.cpython-3*-x86_64-linux-gnu.so" ! -name "*.cpython-${PYVER}-x86_64-linux-gnu.so" -delete
rm -f "$out"/dali-"$PYVER".tar.xz.part-* "$out/SHA256SUMS"
tar cf - -C "$tmp/site" . | xz -T0 -6 | split -b "${PART}M" -d - "$out/dali-$PYVER.tar.xz.part-"
( cd "$out" && sha256sum dali-"$PYVER".tar.xz.part-* > SHA256SUMS )
du -sb "$tmp/site" | awk '{printf "[pack] unpacked %.0f MiB\n", $1 / 1048576}'
ls -la "$out"
