"""Draw bench_train.py's results: images/s of each recipe, one panel per machine and model.

    python benchmarks/plot.py [RESULTS.jsonl ...] [--out docs/bench_train.png]

Reads the rows bench_train.py appends to benchmarks/results/<machine>.jsonl (every such file
when none is named) and draws, for the latest run of each (machine, model), the recipes in
the order they were run, from the original recipe to beitfast, each bar labelled with its
images/s and its ratio to the original recipe. The machine (GPU, or CPU model and cores) is
in each panel's title.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def latest_runs(paths) -> dict:
    """(machine name, model) -> the rows of the latest run (rows sharing the last date seen)."""
    runs = {}
    for p in paths:
        for n, line in enumerate(Path(p).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{p}:{n}: not a JSON row ({e})")
            if row.get("bench") != "train":
                continue
            m = row["machine"]
            name = m.get("gpu") or f"{m.get('cpu', 'CPU')} ({m.get('cores')} cores)"
            key = (name, row["model"])
            if row["recipe"] == "reference" or key not in runs:  # a new run starts with its first recipe
                runs[key] = []
            runs[key].append(row)
    return runs


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", help="jsonl files (default: benchmarks/results/*.jsonl)")
    ap.add_argument("--out", default=str(HERE.parent / "docs" / "bench_train.png"))
    a = ap.parse_args(argv)
    paths = a.results or sorted((HERE / "results").glob("*.jsonl"))
    runs = latest_runs(paths)
    if not runs:
        raise SystemExit(f"no bench_train rows in {[str(p) for p in paths]}: run benchmarks/bench_train.py first")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 3.2 * len(runs)), squeeze=False)
    for ax, ((machine, model), rows) in zip(axes[:, 0], sorted(runs.items())):
        names = [r["recipe"] for r in rows]
        ips = [r["images_per_s"] for r in rows]
        bars = ax.barh(names[::-1], ips[::-1], color=["#4c72b0" if n != "beitfast" else "#dd8452" for n in names[::-1]])
        for bar, r in zip(bars, rows[::-1]):
            label = f"{r['images_per_s']:,.1f}/s"
            if "ratio_vs_reference" in r:
                label += f"  {r['ratio_vs_reference']:.2f}x"
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center", fontsize=8)
        ax.set_xlim(0, max(ips) * 1.35)
        ax.set_xlabel("images/s, end to end (one process)")
        ax.set_title(f"{model} on {machine}, batch {rows[0]['batch']}, {rows[0].get('date', '')}", fontsize=9)
    fig.tight_layout()
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    print(f"plot: {sum(len(r) for r in runs.values())} rows from {len(paths)} file(s) -> {out}")
    return out


if __name__ == "__main__":
    main()
