#!/usr/bin/env bash
# Create or update .venv for beitfast. Called by `make` when the requirement files change
# (the Makefile keys a stamp file by their hash), so a second run costs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP=$1
C=requirements/constraints.txt

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PY --version)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
PIP=(pip_quiet install -q --disable-pip-version-check -c "$C")
# The machine's pip config lists local wheel folders; pip warns for every package they lack.
pip_quiet() { "$VENV/bin/pip" "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

echo "[setup] installing requirements (torch, DALI, numba, timm, ...)"
"${PIP[@]}" -r requirements/base.txt
# dall-e declares an unpinned torch among its deps: install it alone, its imports by hand.
"${PIP[@]}" --no-deps dall-e
"${PIP[@]}" --no-deps --no-build-isolation -e .

# FFCV is built from source against libturbojpeg and OpenCV from apt. Optional: where it
# cannot be installed, the FFCV backend and its tests are skipped with this reason.
rm -f "$VENV/ffcv-unavailable.txt"
if ! "$VENV/bin/python" -c "import ffcv" 2>/dev/null; then
  reason=""
  if ! pkg-config --exists libturbojpeg opencv4 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "[setup] installing FFCV's system packages (pkg-config libturbojpeg0-dev libopencv-dev)"
      export DEBIAN_FRONTEND=noninteractive
      pkgs="pkg-config libturbojpeg0-dev libopencv-dev"
      apt-get install -y -q --no-install-recommends $pkgs >/tmp/beitfast-apt.log 2>&1 \
        || { apt-get update -q >>/tmp/beitfast-apt.log 2>&1 && \
             apt-get install -y -q --no-install-recommends $pkgs >>/tmp/beitfast-apt.log 2>&1; } \
        || reason="apt-get install of $pkgs failed (log: /tmp/beitfast-apt.log)"
    else
      reason="needs apt packages pkg-config libturbojpeg0-dev libopencv-dev; run as root with apt-get, or install them yourself"
    fi
  fi
  if [ -z "$reason" ]; then
    echo "[setup] building ffcv from source (about a minute)"
    "${PIP[@]}" ffcv pillow >/tmp/beitfast-ffcv.log 2>&1 \
      || reason="pip install ffcv failed (log: /tmp/beitfast-ffcv.log)"
  fi
  if [ -n "$reason" ]; then
    echo "$reason" > "$VENV/ffcv-unavailable.txt"
    echo "[setup] FFCV unavailable: $reason; the FFCV backend and its tests are skipped."
  fi
fi

# Reject a silently swapped torch: the constraints pin it, this proves it.
"$VENV/bin/python" - <<'PY'
import torch, nvidia.dali, numba, timm
want = "2.14.1"
assert torch.__version__.startswith(want), f"torch {torch.__version__} installed, constraints pin {want}"
print(f"[setup] torch {torch.__version__}, DALI {nvidia.dali.__version__}, numba {numba.__version__}, timm {timm.__version__}")
PY
rm -f "$VENV"/.installed-*
touch "$STAMP"
