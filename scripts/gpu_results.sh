#!/usr/bin/env bash
# Files what a GPU run of scripts/gpu_check.sh brought back (its $OUT: summary.jsonl and
# logs.tar.gz) under benchmarks/results/gpu-<date>-<device>/, with the device, driver and
# versions the run's doctor stage reported in device.json.
#
#   bash scripts/gpu_results.sh DIR [DEST_ROOT]     # DEST_ROOT defaults to benchmarks/results
set -euo pipefail
case "${1:-}" in -h|--help|"") sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; echo "usage: $0 DIR [DEST_ROOT]"
  [ -n "${1:-}" ]; exit $?;; esac
SRC=$1
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST_ROOT=${2:-$ROOT/benchmarks/results}
for f in summary.jsonl logs.tar.gz; do
  [ -f "$SRC/$f" ] || { echo "gpu_results: $SRC/$f is missing (the run's \$OUT holds summary.jsonl and logs.tar.gz)" >&2; exit 2; }
done
PY=${PYTHON:-python3}
dest=$("$PY" - "$SRC/summary.jsonl" "$DEST_ROOT" <<'PY'
import json, os, re, sys, time
rows = []
for n, line in enumerate(open(sys.argv[1]), 1):
    try:
        rows.append(json.loads(line))
    except ValueError:
        sys.exit(f"gpu_results: {sys.argv[1]} line {n} is not JSON: {line[:80]!r}")
doc = next((r.get("result") or {} for r in rows if r.get("stage") == "doctor"), {})
gpus = doc.get("gpus", {})
name = (gpus.get("devices") or [{"name": "cpu-dry-run"}])[0]["name"]
info = {"device": name, "gpus": gpus, "driver": gpus.get("driver"), "cuda": gpus.get("cuda"),
        "packages": {k: v.get("version") for k, v in doc.get("packages", {}).items()},
        "python": doc.get("python"), "filed": time.strftime("%Y-%m-%d %H:%M"),
        "stages": {r["stage"]: r["status"] for r in rows}}
d = os.path.join(sys.argv[2], f"gpu-{time.strftime('%Y-%m-%d')}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}")
os.makedirs(d, exist_ok=True)
json.dump(info, open(os.path.join(d, "device.json"), "w"), indent=1)
print(d)
PY
)
cp "$SRC/summary.jsonl" "$dest/summary.jsonl"
mkdir -p "$dest/logs"
tar xzf "$SRC/logs.tar.gz" -C "$dest/logs"
echo "gpu_results: filed in $dest ($(ls "$dest/logs" | wc -l) log entries; device.json, summary.jsonl)"
