"""Do K cached views cost accuracy when epochs far outnumber K? The long-schedule experiment.

    python beitfast/kstudy.py --out runs/kstudy                          # every arm, 50 and 200 epochs, seeds 0 1 2
    python beitfast/kstudy.py --out runs/kstudy --epochs 50 --seeds 0   # a part; re-runs add what is missing

The micro BEiT (configs/micro.yaml: width 96, 4 blocks, 32 px, an 8x8 token grid) pretrains on
the 1,000-image random-palette toy set shrunk to 64 px a side (made here from
data/toy_imagenet_rp) with targets from a token cache of K = 1, 2, 4 or 10 views an image, or
from a fresh view every epoch (`online`, the original recipe: the tokenizer runs every step).
Every arm of a schedule has the same steps, batch, masks and seed. At 200 epochs a K = 1 view is
replayed 200 times, more than ImageNet's 800 epochs at K = 10 replay theirs (80).

Scores of each encoder: fine-tuning (configs/finetune_micro.yaml, --ft-epochs), the linear
probe and the weighted kNN probe (beitfast/linprobe.py), and the memorisation probe during
pretraining (beitfast/mim_eval.py): MIM accuracy on the views being trained on ("cached": view 0
of the run's cache; for online, the view of its first epoch) against views of the same images
drawn with another seed and never trained on ("fresh"). A gap that grows with epochs / K is what
replaying views costs. Random init is scored the same way once per seed (the floor).

Every run is a directory under --out/runs and resumes where it stopped; finished runs are rows of
--out/results.jsonl and are not run again. Report: kstudy.md (table, mean +- std over seeds),
kstudy.png (scores against K; the cached-fresh gap against epochs); --publish DIR copies the rows,
table and plot there (docs/). The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
ROOT = Path(__file__).resolve().parent.parent

ARMS = {"k1": 1, "k2": 2, "k4": 4, "k10": 10, "online": None}  # name -> views in the cache (None: online)
# The headline's arm: the original recipe whole, not only its targets: online tokenization every step,
# the Pillow DataLoader, unfused kernels and AdamW, the loss read on the host every step.
RECIPES = {"reference": ["data.targets=online", "data.backend=reference", "model.kernels=torch", "optim.fused=none",
                         "train.sync_each_step=true"]}
HEADLINE_ARM = "k10"  # beitfast in the headline: K = 10, the cache's ImageNet default (--headline)
FRESH_SEED = 10_000  # the fresh views of seed s are drawn with seed s + FRESH_SEED


def shrink_tree(src: Path, dst: Path, max_side: int, progress: bool) -> Path:
    """A copy of an ImageNet-layout tree with every decodable image re-encoded to `max_side` (the
    cache's own re-encoding); undecodable files are copied as they are (the loaders must still
    skip them). Written to a temporary directory and renamed: a half-made tree is never used."""
    from beitfast.progress import progress_bar

    from beitfast.data.images import BadImage, prepare_for_cache

    if (dst / "train").is_dir():
        return dst
    if not (src / "train").is_dir():
        raise FileNotFoundError(f"{src}: no train/ folder (make it with data_prep/make_toy_imagenet.py "
                                f"--random-palette)")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p for split in ("train", "val") for p in (src / split).rglob("*") if p.is_file())
    for p in progress_bar(files, desc=f"shrinking to {max_side} px", unit="img", disable=not progress):
        out = tmp / p.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        data = p.read_bytes()
        try:
            data = prepare_for_cache(data, str(p), max_side)[0]
        except BadImage:
            pass
        out.write_bytes(data)
    tmp.rename(dst)
    return dst


def make_cache(data: Path, out: Path, k: int, seed: int, tok: Path, progress: bool) -> Path:
    from data_prep.tokenize_imagenet import main as tokenize

    args = ["--data", str(data), "--out", str(out), "--cfg", "micro.yaml", "--views", str(k), "--shard-size", "500",
            "--max-reject", "0.1", f"data.root={data}", f"tokenizer.path={tok}", f"data.views={k}",
            f"train.seed={seed}"]
    t0 = time.time()
    built = (out / "manifest.json").exists()
    if tokenize(args + ([] if progress else ["--no-progress"])) != 0:
        raise RuntimeError(f"tokenizing {data} with K={k}, seed {seed} failed")
    if not built:  # the one-off cost beitfast pays before training (the headline counts it)
        (out / "kstudy_seconds.json").write_text(json.dumps({"seconds": round(time.time() - t0, 1)}))
    return out


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def score(a, ckpt: str, run: Path, seed: int) -> dict:
    """Linear probe, kNN probe and fine-tuning of one encoder ('' = random init)."""
    from beitfast.finetune import main as finetune
    from beitfast.linprobe import main as linprobe

    args = ["--ckpt", ckpt or "random", "--cfg", "micro.yaml", "--data", str(a.data), "--out", str(run / "probe"),
            "--seed", str(seed), f"data.root={a.data}"]
    if linprobe(args + ([] if a.progress else ["--no-progress"])) != 0:
        raise RuntimeError(f"probing {run} failed")
    p = json.loads((run / "probe" / "probe.json").read_text())
    row = {"probe": p["acc"], "probe_block": p["best_block"], "knn": p["knn"]["acc"], "knn_block": p["knn"]["best_block"]}
    if a.ft_epochs:
        ft = ["--cfg", "finetune_micro.yaml", f"data.root={a.data}", f"train.epochs={a.ft_epochs}", f"train.seed={seed}",
              f"model.pretrained={ckpt}", f"log.out_dir={run / 'finetune'}", f"log.progress={str(a.progress).lower()}"]
        if a.batch:
            ft += [f"data.batch_size={a.batch}", f"train.global_batch={a.batch}"]
        if finetune(ft) != 0:
            raise RuntimeError(f"fine-tuning {run} failed")
        row["finetune"] = round(json.loads((run / "finetune" / "eval.json").read_text())["acc1"] / 100, 4)
    return row


def provenance(tok: Path) -> dict:
    """What a row's figures depend on beyond its arguments: the tokenizer's weights (retrained
    in a fresh checkout) and the CPU (compiled code rounds float ties by instruction set)."""
    import hashlib
    import platform

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    return {"tokenizer_sha256": hashlib.sha256(Path(tok).read_bytes()).hexdigest()[:16],
            "cpu": cpu, "avx512": "avx512f" in flags}


def run_one(a, arm: str, epochs: int, seed: int, tok: Path) -> dict:
    from beitfast.train import main as train

    run = a.out / "runs" / f"{arm}_e{epochs}_s{seed}"
    t0 = time.time()
    row = {"arm": arm, "k": ARMS.get(arm), "epochs": epochs, "seed": seed, "ft_epochs": a.ft_epochs,
           **provenance(tok)}
    if arm == "random_init":
        return {**row, **score(a, "", run, seed), "seconds": round(time.time() - t0, 1)}
    caches = a.out / "caches"
    k = ARMS.get(arm)
    fresh = make_cache(a.data, caches / f"fresh_s{seed}", 1, seed + FRESH_SEED, tok, a.progress)
    trained = make_cache(a.data, caches / f"k{k or 1}_s{seed}", k or 1, seed, tok, a.progress)  # online: its epoch-0 view
    over = ["--cfg", "micro.yaml", f"data.root={a.data}", f"tokenizer.path={tok}", f"train.epochs={epochs}",
            f"train.seed={seed}", f"mask.seed={seed}", f"log.out_dir={run / 'pretrain'}",
            f"log.progress={str(a.progress).lower()}", f"log.mim_eval=cached:{trained},fresh:{fresh}",
            f"log.mim_eval_every_epochs={max(1, epochs // 50)}", f"log.mim_eval_images={a.eval_images}"]
    if arm in RECIPES:
        over += RECIPES[arm]
    else:
        over += ["data.targets=online", "data.backend=reference"] if k is None else [f"data.cache={trained}",
                                                                                     f"data.views={k}"]
        spent = trained / "kstudy_seconds.json"
        if k is not None and spent.exists():
            row["cache_seconds"] = json.loads(spent.read_text())["seconds"]
    if a.batch:
        over += [f"data.batch_size={a.batch}", f"train.global_batch={a.batch}"]
    t_pre = time.time()
    if train(over) != 0:
        raise RuntimeError(f"pretraining {run} failed")
    metrics = _rows(run / "pretrain" / "metrics.jsonl")
    mim = _rows(run / "pretrain" / "mim_eval.jsonl")
    row.update(steps=metrics[-1]["step"], last_loss=metrics[-1]["loss"], train_mim_acc=metrics[-1]["mim_acc"],
               images_per_s=statistics.median(r["images_per_s"] for r in metrics),
               data_wait=statistics.median(r["data_wait"] for r in metrics),
               pretrain_seconds=round(time.time() - t_pre, 1),
               mim_cached=mim[-1]["cached"], mim_fresh=mim[-1]["fresh"],
               mim_gap=round(mim[-1]["cached"] - mim[-1]["fresh"], 5),
               mim_curve=[[r["epoch"], r["cached"], r["fresh"]] for r in mim])
    row.update(score(a, str(run / "pretrain" / "ckpt.pt"), run, seed))
    row["seconds"] = round(time.time() - t0, 1)
    return row


def _stats(vals: list[float]) -> str:
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{100 * statistics.mean(vals):.1f} +- {100 * sd:.1f}"


def headline(rows: list[dict], fast: str = HEADLINE_ARM) -> dict | None:
    """The original recipe against beitfast (arm `fast`) at equal steps, on the seeds both have run:
    scores and wall time (beitfast's time includes building its cache, a one-off cost). None
    without a pair."""
    ref = "reference"
    lines = ["| epochs | recipe | seeds | fine-tune top-1 | linear probe | kNN (k=20) | images/s (median) | "
             "pretraining (s) | cache build (s) | total (s) | speed-up |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for e in sorted({r["epochs"] for r in rows if r["arm"] == ref}):
        by = {n: {r["seed"]: r for r in rows if r["arm"] == n and r["epochs"] == e} for n in (ref, fast)}
        seeds = sorted(set(by[ref]) & set(by[fast]))
        if not seeds:
            continue
        total = {}
        for n in (ref, fast):
            rs = [by[n][s] for s in seeds]
            pre = statistics.mean(r["pretrain_seconds"] for r in rs)
            cache = statistics.mean(r.get("cache_seconds", 0.0) for r in rs)
            total[n] = pre + cache
            ips = statistics.median(r["images_per_s"] for r in rs)
            speed = "1.00x" if n == ref else f"**{total[ref] / total[n]:.2f}x**"
            lines.append(f"| {e} | {'original recipe' if n == ref else f'beitfast (K = {ARMS[fast]})'} | {len(seeds)} | "
                         + " | ".join(_stats([r[c] for r in rs if c in r]) for c in ("finetune", "probe", "knn"))
                         + f" | {ips:.0f} | {pre:.0f} | {cache:.0f} | {total[n]:.0f} | {speed} |")
            summary[f"{n}_e{e}"] = {c: round(statistics.mean(r[c] for r in rs), 4) for c in ("finetune", "probe", "knn")
                                    if all(c in r for r in rs)} | {"seconds": round(total[n], 1), "seeds": seeds}
        summary[f"speedup_e{e}"] = round(total[ref] / total[fast], 3)
    return {"table": "\n".join(lines) + "\n", "summary": summary} if summary else None


def write_report(out: Path, rows: list[dict], fast: str = HEADLINE_ARM) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ARMS) + list(RECIPES) + ["random_init"]
    schedules = sorted({r["epochs"] for r in rows if r["arm"] != "random_init"})
    summary, lines = {}, ["| epochs | arm | K | replays of a view | fine-tune top-1 | linear probe | kNN (k=20) | "
                          "MIM acc, cached views | MIM acc, fresh views | gap (cached - fresh) | seeds |",
                          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in schedules + [0]:
        for n in names:
            rs = [r for r in rows if r["arm"] == n and (r["epochs"] == e or (n == "random_init" and e == 0))]
            if not rs or (n == "random_init") != (e == 0):
                continue
            col = {c: [r[c] for r in rs if c in r] for c in ("finetune", "probe", "knn", "mim_cached", "mim_fresh",
                                                             "mim_gap")}
            summary[f"{n}_e{e}"] = {c: round(statistics.mean(v), 4) for c, v in col.items() if v} | {"n": len(rs)}
            k = ARMS.get(n)
            replays = "-" if n == "random_init" else (f"{e // k}" if k else "1")
            lines.append(f"| {e or '-'} | {n} | {k or ('fresh' if n in ('online', 'reference') else '-')} | {replays} | "
                         + " | ".join(_stats(col[c]) for c in ("finetune", "probe", "knn", "mim_cached", "mim_fresh",
                                                                "mim_gap"))
                         + f" | {len(rs)} |")
    tmp = out / "kstudy.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out / "kstudy.md")
    head = headline(rows, fast)
    if head:
        summary["headline"] = head["summary"]
        (out / "kstudy_headline.md.tmp").write_text(head["table"])
        (out / "kstudy_headline.md.tmp").replace(out / "kstudy_headline.md")

    fig, axes = plt.subplots(1, 1 + max(1, len(schedules)), figsize=(4.2 * (1 + max(1, len(schedules))), 3.4))
    ax = axes[0]
    for i, (c, lab) in enumerate([("finetune", "fine-tune"), ("probe", "linear probe"), ("knn", "kNN")]):
        for e, ls in zip(schedules, ("--", "-", ":")):
            xs, ys = [], []
            for j, n in enumerate(ARMS):
                v = [r[c] for r in rows if r["arm"] == n and r["epochs"] == e and c in r]
                if v:
                    xs.append(j)
                    ys.append(100 * statistics.mean(v))
            if xs:
                ax.plot(xs, ys, ls, marker="o", color=f"C{i}", label=f"{lab}, {e} ep")
        floor = [r[c] for r in rows if r["arm"] == "random_init" and c in r]
        if floor:
            ax.axhline(100 * statistics.mean(floor), color=f"C{i}", lw=0.7, alpha=0.5)
    ax.set_xticks(range(len(ARMS)))
    ax.set_xticklabels([n.replace("k", "K=") if n != "online" else "online" for n in ARMS])
    ax.set_ylabel("top-1 (%), seed mean\n(thin lines: random init)", fontsize=8)
    ax.set_title("scores against K", fontsize=9)
    ax.legend(fontsize=6)
    for ax, e in zip(axes[1:], schedules):
        for j, n in enumerate(list(ARMS) + list(RECIPES)):  # the reference: the view sets' offset, no replay
            curves = [r["mim_curve"] for r in rows if r["arm"] == n and r["epochs"] == e and r.get("mim_curve")]
            if curves:
                m = min(len(c) for c in curves)
                xs = [curves[0][i][0] for i in range(m)]
                gap = [100 * statistics.mean(c[i][1] - c[i][2] for c in curves) for i in range(m)]
                ax.plot(xs, gap, color=f"C{j}", label=n)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xlabel("epoch")
        ax.set_ylabel("MIM acc: cached - fresh views (points)")
        ax.set_title(f"memorisation, {e} epochs", fontsize=9)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "kstudy.png.tmp.png", dpi=90)
    plt.close(fig)
    (out / "kstudy.png.tmp.png").replace(out / "kstudy.png")
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="kstudy.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--source", type=Path, default=ROOT / "data" / "toy_imagenet_rp",
                    help="the random-palette toy set (made when missing)")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "toy_imagenet_rp64",
                    help="the shrunk copy the runs read (made from --source when missing)")
    ap.add_argument("--max-side", type=int, default=64)
    ap.add_argument("--dvae", type=Path, default=None, help="tokenizer.pt or a dVAE run directory (default "
                    "<out>/dvae, trained on --source when missing)")
    ap.add_argument("--arms", nargs="+", default=list(ARMS) + ["random_init"],
                    choices=list(ARMS) + list(RECIPES) + ["random_init"],
                    help="reference: the original recipe whole (the headline's arm, not in the default grid)")
    ap.add_argument("--epochs", nargs="+", type=int, default=[50, 200])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--ft-epochs", type=int, default=10, help="fine-tuning epochs (0: none)")
    ap.add_argument("--eval-images", type=int, default=256, help="images of the memorisation probe")
    ap.add_argument("--batch", type=int, default=0, help="pretraining and fine-tuning batch (0: the configs'; tests use less)")
    ap.add_argument("--headline", default=HEADLINE_ARM, choices=list(ARMS)[:4],
                    help="the cached arm the headline table sets against the reference arm")
    ap.add_argument("--publish", type=Path, default=None, help="copy results, table and plot here as kstudy_*")
    ap.add_argument("--report", action="store_true", help="only the table and plot of the finished runs (runs nothing)")
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    try:
        from beitfast.ablate import prepare_data

        if a.report:  # the report filters by the tokenizer too, when it is there
            tok = next((t for t in (a.dvae, a.out / "dvae" / "tokenizer.pt") if t and Path(t).is_file()), None)
        else:
            tok = prepare_data(a.source, a.dvae or a.out / "dvae", a.progress)
        a.data = a.data if a.report else shrink_tree(a.source, a.data, a.max_side, a.progress)
    except (RuntimeError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"kstudy: {e}", file=sys.stderr)
        return 2
    results = a.out / "results.jsonl"
    rows = [r for r in _rows(results) if r.get("ft_epochs") == a.ft_epochs]
    if tok is not None:  # rows of another tokenizer (or of none recorded) are kept in the file, not reused nor reported
        sha = provenance(tok)["tokenizer_sha256"]
        other = [r for r in rows if r.get("tokenizer_sha256") != sha]
        if other:
            print(f"[kstudy] {len(other)} finished run(s) in {results} used another tokenizer or recorded none; "
                  f"they run again")
        rows = [r for r in rows if r.get("tokenizer_sha256") == sha]
    done = {(r["arm"], r["epochs"], r["seed"]) for r in rows}
    # seed by seed, short schedule first: the first hours give every arm at every schedule
    todo = [(arm, 0 if arm == "random_init" else e, s) for s in a.seeds for e in sorted(a.epochs) for arm in a.arms
            if arm != "random_init" or e == min(a.epochs)]
    todo = [] if a.report else [t for t in todo if t not in done]
    for arm, e, seed in todo:
        print(f"[kstudy] {arm}, {e} epochs, seed {seed}")
        try:
            row = run_one(a, arm, e, seed, tok)
        except RuntimeError as err:
            print(f"kstudy: {arm} {e} epochs seed {seed}: {err}; finished runs are kept in {results}", file=sys.stderr)
            return 1
        rows.append(row)
        with open(results, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[kstudy] {arm} e{e} s{seed}: " + ", ".join(f"{c} {row[c]}" for c in
              ("finetune", "probe", "knn", "mim_cached", "mim_fresh", "seconds") if c in row))
    summary = write_report(a.out, [r for r in rows if r["seed"] in a.seeds], a.headline)
    if a.publish:
        a.publish.mkdir(parents=True, exist_ok=True)
        for src, dst in ((results, "kstudy_results.jsonl"), (a.out / "kstudy.md", "kstudy.md"),
                         (a.out / "kstudy.png", "kstudy.png"), (a.out / "kstudy_headline.md", "kstudy_headline.md")):
            if src.exists():
                shutil.copyfile(src, a.publish / dst)
    print(f"[kstudy] table -> {a.out / 'kstudy.md'}, plot -> {a.out / 'kstudy.png'}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
