"""Ablations of the tiny BEiT on the random-palette toy set, scored by linear probing.

    python beitfast/ablate.py --out runs/ablate                 # every arm, seeds 0 1 2
    python beitfast/ablate.py --out runs/ablate --arms k4 random_init pixels_probe --seeds 0

Arms (configs/tiny.yaml, equal budgets: the same pretraining steps and batch for each):
  k1, k4, k16    targets from a token cache of K = 1, 4 (the demo's), 16 views an image
  online         targets made every step from a fresh view (the original recipe: no cache)
  random_mask    K = 4, random instead of blockwise masking (same 40% budget)
  pixel_target   K = 4, regress the masked patches' pixels instead of predicting tokens
  random_init    no pretraining (the floor an encoder must clear)
  pixels_probe   the probe on raw 16x16 pixels (seed-independent)
The data is the toy ImageNet with a random palette per image (data_prep/make_toy_imagenet.py
--random-palette), so only texture and shape tell the classes apart; the tokenizer is the
tiny dVAE trained on it. Every run is a directory under --out and resumes where it stopped;
finished (arm, seed) pairs are read back from results.jsonl, so a re-run only adds what is
missing. The k4 (demo) and random_init encoders are also fine-tuned for --ft-epochs on the
palette toy set (configs/finetune_tiny.yaml), the demo's second comparison. Outputs: results.jsonl (one row per run), ablation.md (table: mean +- std of the
best-block top-1 over seeds), ablation.png; the last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
ROOT = Path(__file__).resolve().parent.parent

ARMS = {  # name -> (cache views K or None, pretraining overrides, label)
    "k1": (1, [], "cache, K=1"),
    "k4": (4, [], "cache, K=4 (demo)"),
    "k16": (16, [], "cache, K=16"),
    "online": (None, ["data.targets=online", "data.backend=reference"], "online tokenization"),
    "random_mask": (4, ["mask.mode=random"], "K=4, random masking"),
    "pixel_target": (4, ["model.target=pixels"], "K=4, pixel targets"),
    "random_init": (None, None, "random init (no pretraining)"),
    "pixels_probe": (None, None, "raw pixels (16x16)"),
}


FT_ARMS = ("k4", "random_init")  # also fine-tuned (the demo's pretrained-vs-random comparison)


def prepare_data(root: Path, dvae_dir: Path, progress: bool) -> Path:
    """The random-palette toy set and the tiny dVAE trained on it; returns the tokenizer path."""
    from data_prep.make_toy_imagenet import make

    if not (root / "train").is_dir():
        make(root, classes=10, per_class=100, val_per_class=20, seed=0, corrupt=True, progress=progress,
             random_palette=True)
    tok = dvae_dir if dvae_dir.is_file() else dvae_dir / "tokenizer.pt"
    if not tok.exists():
        from data_prep.train_dvae import main as train_dvae

        print(f"[ablate] training the tiny dVAE on {root} -> {dvae_dir}")
        if train_dvae(["--cfg", "dvae_tiny.yaml", f"data.root={root}", f"log.out_dir={dvae_dir}",
                       f"log.progress={str(progress).lower()}"]) != 0:
            raise RuntimeError("dVAE training failed")
    return tok


def make_cache(root: Path, out: Path, k: int, seed: int, tok: Path, progress: bool) -> Path:
    """The token cache of K views an image for `seed` (the views are drawn from the run's seed,
    so each seed has its own cache)."""
    from data_prep.tokenize_imagenet import main as tokenize

    cache = out / (f"cache_k{k}" if seed == 0 else f"cache_k{k}_s{seed}")
    args = ["--data", str(root), "--out", str(cache), "--cfg", "tiny.yaml", "--views", str(k), "--shard-size", "256",
            "--max-reject", "0.1", f"tokenizer.path={tok}", f"data.views={k}", f"train.seed={seed}"]
    if tokenize(args + ([] if progress else ["--no-progress"])) != 0:
        raise RuntimeError(f"tokenizing {root} with K={k} failed")
    return cache


def pretrain(run: Path, overrides: list[str]) -> Path:
    from beitfast.train import main as train

    if train(["--cfg", "tiny.yaml", f"log.out_dir={run}", *overrides]) != 0:
        raise RuntimeError(f"pretraining {run} failed")
    return run / "ckpt.pt"


def probe(root: Path, out: Path, what: list[str], seed: int, progress: bool) -> dict:
    from beitfast.linprobe import main as linprobe

    args = ["--data", str(root), "--out", str(out), "--seed", str(seed), *what]
    if linprobe(args + ([] if progress else ["--no-progress"])) != 0:
        raise RuntimeError(f"probing {out} failed")
    return json.loads((out / "probe.json").read_text())


def finetune(ckpt: str, out: Path, a, seed: int) -> dict:
    """The demo's short fine-tune (configs/finetune_tiny.yaml, --ft-epochs) on the palette toy set."""
    from beitfast.finetune import main as ft

    args = ["--cfg", "finetune_tiny.yaml", f"data.root={a.ft_data}", f"train.epochs={a.ft_epochs}",
            f"train.seed={seed}", f"model.pretrained={ckpt}", f"log.out_dir={out}",
            f"log.progress={str(a.progress).lower()}"]
    if ft(args) != 0:
        raise RuntimeError(f"fine-tuning {out} failed")
    return json.loads((out / "eval.json").read_text())


def run_arm(arm: str, seed: int, a, tok: Path) -> dict:
    k, over, label = ARMS[arm]
    run = a.out / "runs" / f"{arm}_s{seed}"
    t0 = time.time()
    row = {"arm": arm, "label": label, "seed": seed}
    ckpt = ""
    if arm == "pixels_probe":
        res = probe(a.data, run, ["--pixels"], seed, a.progress)
    elif arm == "random_init":
        res = probe(a.data, run, ["--ckpt", "random"], seed, a.progress)
    else:
        base = [f"tokenizer.path={tok}", f"train.epochs={a.epochs}", f"train.seed={seed}", f"mask.seed={seed}",
                f"data.root={a.data}", f"log.progress={str(a.progress).lower()}"]
        if k is not None:
            base += [f"data.cache={make_cache(a.data, a.out, k, seed, tok, a.progress)}", f"data.views={k}"]
        ckpt = pretrain(run / "pretrain", base + over)
        rows = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
        row.update(steps=rows[-1]["step"], last_loss=rows[-1]["loss"], mim_acc=rows[-1]["mim_acc"])
        res = probe(a.data, run / "probe", ["--ckpt", str(ckpt)], seed, a.progress)
    row.update(acc=res["acc"], best_block=res["best_block"], per_block=res["per_block"])
    if a.ft_epochs and arm in FT_ARMS:
        row["ft_acc1"] = finetune(str(ckpt), run / "finetune", a, seed)["acc1"] / 100
    row["seconds"] = round(time.time() - t0, 1)
    return row


def _stats(vals: list[float]) -> dict:
    return {"mean": round(statistics.mean(vals), 4), "std": round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0,
            "n": len(vals)}


def summarize(rows: list[dict]) -> dict:
    out = {}
    for arm in ARMS:
        accs = [r["acc"] for r in rows if r["arm"] == arm]
        if accs:
            out[arm] = {"label": ARMS[arm][2], **_stats(accs), "accs": accs}
            ft = [r["ft_acc1"] for r in rows if r["arm"] == arm and "ft_acc1" in r]
            if ft:
                out[arm]["finetune"] = {**_stats(ft), "accs": ft}
    return out


def write_report(out: Path, summary: dict, epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def cell(s):
        return f"{100 * s['mean']:.1f} +- {100 * s['std']:.1f} % (" + ", ".join(f"{100 * a:.1f}" for a in s["accs"]) + ")"

    lines = ["| arm | linear probe, random-palette val: top-1 mean +- std (per seed) | short fine-tune, palette "
             "toy val: top-1 | seeds |", "|---|---|---|---|"]
    for s in summary.values():
        lines.append(f"| {s['label']} | {cell(s)} | {cell(s['finetune']) if 'finetune' in s else '-'} | {s['n']} |")
    tmp = out / "ablation.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "ablation.md")
    fig, ax = plt.subplots(figsize=(8, 3.4))
    names = list(summary)
    for i, n in enumerate(names):
        s = summary[n]
        ax.bar(i, 100 * s["mean"], yerr=100 * s["std"], color="C0" if n not in ("random_init", "pixels_probe") else "C7",
               alpha=0.8, capsize=3)
        ax.plot([i] * len(s["accs"]), [100 * a for a in s["accs"]], "k.", ms=4)
    ax.axhline(10, color="r", lw=0.8, ls="--", label="chance (10 classes)")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([summary[n]["label"] for n in names], rotation=25, ha="right", fontsize=7)
    ax.set_ylabel("linear-probe top-1 (%)")
    ax.set_title(f"tiny BEiT, random-palette toy set, {epochs} pretraining epochs, mean of seeds (dots: seeds)",
                 fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ablation.png.tmp.png", dpi=90)
    plt.close(fig)
    (out / "ablation.png.tmp.png").replace(out / "ablation.png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="ablate.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "toy_imagenet_rp",
                    help="random-palette toy set (made here when missing; an existing tree is used as it is)")
    ap.add_argument("--dvae", type=Path, default=None,
                    help="the tokenizer: a tokenizer.pt or a dVAE run directory (default <out>/dvae, trained when missing)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=6, help="pretraining epochs of every arm (equal budgets)")
    ap.add_argument("--ft-data", type=Path, default=ROOT / "data" / "toy_imagenet",
                    help="the palette toy set the k4 and random_init encoders are fine-tuned on (made when missing)")
    ap.add_argument("--ft-epochs", type=int, default=2, help="fine-tuning epochs (0: no fine-tuning)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    try:
        if a.ft_epochs and not (a.ft_data / "train").is_dir():
            from data_prep.make_toy_imagenet import make

            make(a.ft_data, classes=10, per_class=100, val_per_class=20, seed=0, corrupt=True, progress=a.progress)
        tok = prepare_data(a.data, a.dvae or a.out / "dvae", a.progress)
    except (RuntimeError, FileExistsError, ValueError) as e:
        print(f"ablate: {e}", file=sys.stderr)
        return 2
    results = a.out / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    rows = [r for r in rows if r.get("epochs") == a.epochs and r.get("ft_epochs") == a.ft_epochs]
    done = {(r["arm"], r["seed"]) for r in rows}
    todo = [(arm, s) for s in a.seeds for arm in a.arms if (arm, s) not in done]  # seed by seed: early rows span every arm
    from beitfast.progress import progress_bar

    for arm, seed in progress_bar(todo, desc="ablation runs", unit="run", disable=not a.progress):
        try:
            row = dict(run_arm(arm, seed, a, tok), epochs=a.epochs, ft_epochs=a.ft_epochs)
        except RuntimeError as e:
            print(f"ablate: {arm} seed {seed}: {e}; finished runs are kept in {results}", file=sys.stderr)
            return 1
        rows.append(row)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[ablate] {arm} seed {seed}: top-1 {100 * row['acc']:.1f}% (block {row['best_block']}) "
              f"in {row['seconds']:.0f} s")
    summary = summarize([r for r in rows if r["arm"] in a.arms and r["seed"] in a.seeds])
    write_report(a.out, summary, a.epochs)
    print(f"[ablate] table -> {a.out / 'ablation.md'}, plot -> {a.out / 'ablation.png'}")
    print(json.dumps({k: {"mean": v["mean"], "std": v["std"], "n": v["n"],
                          **({"finetune_mean": v["finetune"]["mean"]} if "finetune" in v else {})}
                      for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
