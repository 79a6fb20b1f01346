"""`make demo`: run every stage that exists end to end on the toy ImageNet, on CPU.

    python -m beitfast.demo --out runs/demo

Stages run in data-flow order and each prints where its outputs are: the toy datasets, the
masks, the tiny dVAE, the token cache, pretraining, then the evidence (linear probes of the
pretrained encoder, a random one and raw pixels; a short fine-tune of the pretrained and the
random encoder; attention maps; segmentation fine-tuning of both). A stage whose output is already there is reused, so a
second run is quick. Everything measured goes to <out>/summary.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # beitfast/ and data_prep/ import from the repo root, installed or not
from beitfast.config import load_config  # noqa: E402
from beitfast.masking import MaskGenerator, MaskSpec  # noqa: E402


PRETRAIN_EPOCHS = 6  # the ablation's budget (beitfast/ablate.py --epochs), so the demo is its k4 arm, seed 0
FT_EPOCHS = 2


def stage_dataset(out: Path) -> tuple[Path, Path]:
    """Two toy ImageNets of the same classes: with a random palette per image (pretraining and
    the linear probe: only texture and shape tell the classes apart) and with the class
    palettes (the short fine-tune, a labelled downstream set)."""
    from data_prep.make_toy_imagenet import make

    roots = []
    for name, rp in (("toy_imagenet_rp", True), ("toy_imagenet", False)):
        root = ROOT / "data" / name
        m = make(root, classes=10, per_class=100, val_per_class=20, seed=0, corrupt=True, random_palette=rp)
        print(f"[demo] toy ImageNet ({'random palette per image' if rp else 'class palettes'}): {m['counts']} "
              f"images, {len(m['odd'])} odd files -> {root}")
        roots.append(root)
    return roots[0], roots[1]


def stage_config(out: Path, data_root: Path):
    cfg = load_config("tiny", [f"data.root={data_root}", f"log.out_dir={out}", f"train.epochs={PRETRAIN_EPOCHS}"])
    cfg.dump(out / "config.yaml")
    print(f"[demo] resolved config (configs/tiny.yaml) -> {out / 'config.yaml'}")
    return cfg


def stage_masks(out: Path, cfg) -> dict:
    """Blockwise masks for the tiny grid and the paper's 14x14 grid, drawn as a picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = cfg.model.img_size // cfg.model.patch_size
    specs = {"tiny": MaskSpec.from_config(cfg.mask, grid), "paper 14x14/75": MaskSpec()}
    stats = {}
    fig, axes = plt.subplots(len(specs), 9, figsize=(14, 2.1 * len(specs)))
    for row, (name, spec) in zip(axes, specs.items()):
        gen = MaskGenerator(spec, seed=cfg.mask.seed)
        gen(np.arange(8))  # load the compiled code outside the clock
        t = time.perf_counter()
        many = gen(np.arange(20000), epoch=0)
        dt = time.perf_counter() - t
        counts = many.sum((1, 2))
        stats[name] = {"grid": [spec.height, spec.width], "budget": spec.num_patches,
                       "mean_masked": round(float(counts.mean()), 3),
                       "p_exact_budget": round(float((counts == spec.num_patches).mean()), 3),
                       "masks_per_s": round(20000 / dt)}
        for k, ax in enumerate(row[:8]):
            ax.imshow(many[k], cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(f"{name}\n{int(counts[k])} masked" if k == 0 else f"{int(counts[k])} masked", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        im = row[8].imshow(many.mean(0), cmap="viridis", vmin=0, vmax=1)
        row[8].set_title("P(masked) per patch", fontsize=8)
        row[8].set_xticks([])
        row[8].set_yticks([])
        fig.colorbar(im, ax=row[8], fraction=0.046)
    fig.tight_layout()
    fig.savefig(out / "masks.png", dpi=80)
    plt.close(fig)
    print(f"[demo] masks: {json.dumps(stats)} -> {out / 'masks.png'}")
    return stats


def stage_dvae(out: Path, data_root: Path) -> dict:
    """Train the tiny dVAE tokenizer (configs/dvae_tiny.yaml) and tokenize a few images with it."""
    import torch

    from beitfast.tokenizers.dvae import DVAETokenizer

    run = out / "dvae_tiny"
    tok_path = run / "tokenizer.pt"
    if (run / "config.yaml").exists():
        import shutil

        import yaml

        if yaml.safe_load((run / "config.yaml").read_text())["data"]["root"] != str(data_root):
            print(f"[demo] {run} was trained on another dataset (an older version of the demo): training again")
            shutil.rmtree(run)
    if not tok_path.exists():
        from data_prep.train_dvae import main as train_dvae

        print("[demo] training the tiny dVAE tokenizer (configs/dvae_tiny.yaml; about 4 minutes on 2 cores)")
        if train_dvae(["--cfg", "dvae_tiny.yaml", f"data.root={data_root}", f"log.out_dir={run}"]) != 0:
            raise SystemExit("[demo] dVAE training failed")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r["kind"] == "eval"][-1]
    tok = DVAETokenizer.from_file(tok_path)
    x = torch.rand(4, 3, tok.input_size, tok.input_size)
    codes = tok.encode(x)
    res = {"tokenizer": str(tok_path), "identity": tok.identity, "eval_psnr_db": last["psnr"],
           "mean_image_psnr_db": last["baseline_psnr"], "codebook_used_fraction": last["used_fraction"],
           "tokens_shape": list(codes.shape)}
    print(f"[demo] dVAE: eval PSNR {last['psnr']} dB (mean image {last['baseline_psnr']} dB), "
          f"{100 * last['used_fraction']:.0f}% of {tok.vocab_size} codes used -> {run} (recon.png, curves.png)")
    return res


def stage_cache(out: Path, data_root: Path, tok_path: Path) -> dict:
    """Pre-tokenize the toy ImageNet (K views an image) with the tiny dVAE, verify the cache,
    and draw some cached views beside their stored tokens decoded back to pixels."""
    from data_prep.tokenize_imagenet import main as tokenize
    from data_prep.verify_cache import main as verify

    cache = out / "cache"
    over = [f"tokenizer.path={tok_path}"]
    print(f"[demo] pre-tokenizing {data_root} -> {cache}")
    args = ["--data", str(data_root), "--out", str(cache), "--cfg", "tiny.yaml", "--shard-size", "256",
            "--max-reject", "0.01", *over]
    code, rebuilt = tokenize(args), False
    if code == 2 and (cache / "plan.json").exists():  # the demo's own cache, made by an older version
        import shutil

        print(f"[demo] {cache} was built with other settings (an older version of the demo): rebuilding it")
        shutil.rmtree(cache)
        code = tokenize(args)
        rebuilt = True
    if code != 0:
        raise SystemExit("[demo] tokenization failed")
    if verify(["--cache", str(cache), "--cfg", "tiny.yaml", "--sample", "256", *over]) != 0:
        raise SystemExit("[demo] cache verification failed")
    draw_cached_views(cache, tok_path, out / "cache_views.png")
    m = json.loads((cache / "manifest.json").read_text())
    print(f"[demo] cached views drawn -> {out / 'cache_views.png'}")
    return {"cache": str(cache), "rebuilt": rebuilt, **m["counts"]}


def draw_cached_views(cache_dir: Path, tok_path: Path, png: Path, n_images: int = 4) -> None:
    """Per image: the source with its K crop boxes, then for each view the rendered
    tokenizer input and its stored tokens decoded by the dVAE decoder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from beitfast.data.cache import TokenCache
    from beitfast.data.images import decode_rgb
    from beitfast.data.views import ViewRenderer
    from beitfast.tokenizers.dvae import decode_tokens, load_export

    c = TokenCache(cache_dir)
    model, size = load_export(tok_path)
    k = c.views_per_image
    renderer = ViewRenderer(size, "lanczos", k)
    picks = np.linspace(0, len(c) - 1, n_images).round().astype(int)
    fig, axes = plt.subplots(n_images, 1 + 2 * k, figsize=(2 * (1 + 2 * k), 2.1 * n_images))
    for row, j in zip(axes, picks):
        data, label, views, toks = c.item(int(j))
        img = decode_rgb(bytes(data))
        row[0].imshow(img)
        for v in views:
            row[0].add_patch(matplotlib.patches.Rectangle((v["x"], v["y"]), v["w"], v["h"], fill=False, lw=1.2,
                                                          ec="yellow"))
        row[0].set_title(f"class {label}, {k} views", fontsize=8)
        rendered = renderer.render([np.asarray(data)] * k, np.asarray(views)).float() / 255
        grid = c.settings["tokenizer"]["grid"]
        codes = torch.from_numpy(np.asarray(toks, np.int64)).reshape(k, *grid)
        dec = decode_tokens(model, codes)
        for v in range(k):
            row[1 + 2 * v].imshow(rendered[v].permute(1, 2, 0).clamp(0, 1).numpy())
            row[1 + 2 * v].set_title(f"view {v}", fontsize=8)
            row[2 + 2 * v].imshow(dec[v].permute(1, 2, 0).numpy())
            row[2 + 2 * v].set_title("its tokens, decoded", fontsize=8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)


def stage_pretrain(out: Path, cache: Path, tok_path: Path, fresh: bool = False) -> dict:
    """Pretrain the tiny BEiT (configs/tiny.yaml) on the cache; plot its loss and MIM accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from beitfast.train import main as train

    run = out / "pretrain"
    if fresh and run.exists():
        import shutil

        print(f"[demo] the cache was rebuilt: pretraining again from scratch ({run} removed)")
        shutil.rmtree(run)
    print(f"[demo] pretraining tiny BEiT on {cache} (configs/tiny.yaml, {PRETRAIN_EPOCHS} epochs; about 2 minutes "
          f"on 2 cores)")
    args = ["--cfg", "tiny.yaml", f"data.cache={cache}", f"tokenizer.path={tok_path}", f"log.out_dir={run}",
            f"train.epochs={PRETRAIN_EPOCHS}"]
    code = train(args)
    if code == 2 and (run / "ckpt.pt").exists():  # the demo's own run, from an older version
        import shutil

        print(f"[demo] {run} holds a run of an older version: pretraining again from scratch")
        shutil.rmtree(run)
        code = train(args)
    if code != 0:
        raise SystemExit("[demo] pretraining failed")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3))
    ax[0].plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax[0].set_title("MIM loss (masked tokens)")
    ax[1].plot([r["step"] for r in rows], [r["mim_acc"] for r in rows])
    ax[1].set_title("MIM accuracy")
    for a in ax:
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "pretrain_curves.png", dpi=80)
    plt.close(fig)
    # the last reports, weighted by the steps each covers: the final one may cover a single
    # step (the run's length is not a multiple of log.every), too few to read an accuracy off
    last = rows[-4:]
    acc = sum(r["mim_acc"] * r["steps"] for r in last) / sum(r["steps"] for r in last)
    loss = sum(r["loss"] * r["steps"] for r in last) / sum(r["steps"] for r in last)
    span = f"steps {last[0]['step'] - last[0]['steps'] + 1}-{last[-1]['step']}"
    print(f"[demo] pretraining: loss {rows[0]['loss']} (first report) -> {loss:.4f}, MIM accuracy {acc:.4f} "
          f"(means over {span}) after {rows[-1]['step']} steps -> {run} (ckpt.pt), {out / 'pretrain_curves.png'}")
    return {"run": str(run), "first_loss": rows[0]["loss"], "last_loss": round(loss, 5), "mim_acc": round(acc, 5),
            "mim_acc_steps": span, "steps": rows[-1]["step"]}


def stage_evaluate(out: Path, rp_root: Path, palette_root: Path, ckpt: Path, tok_path: Path) -> dict:
    """The evidence that pretraining works: the linear probe of the pretrained encoder, of a
    randomly initialised one and of raw pixels on the random-palette validation split; a short
    fine-tune of the pretrained and the random encoder on the palette toy set; attention maps."""
    from beitfast.finetune import main as finetune
    from beitfast.linprobe import main as linprobe
    from beitfast.visualize import main as visualize

    res = {"linear_probe": {}, "knn": {}, "finetune": {}, "attention": {}}
    print(f"[demo] linear probes on {rp_root} (frozen encoders, one head per block, best block reported)")
    for name, what in (("pretrained", ["--ckpt", str(ckpt)]), ("random", ["--ckpt", "random"]), ("pixels", ["--pixels"])):
        d = out / "probe" / name
        if linprobe(["--data", str(rp_root), "--out", str(d), "--no-progress", *what]) != 0:
            raise SystemExit(f"[demo] the {name} linear probe failed")
        p = json.loads((d / "probe.json").read_text())
        res["linear_probe"][name] = {"acc": p["acc"], "best_block": p["best_block"], "val_images": p["val_images"]}
        res["knn"][name] = {k: p["knn"][k] for k in ("acc", "best_block", "k", "temperature")}  # the same features
    for name, weights in (("pretrained", str(ckpt)), ("random", "")):
        d = out / "finetune" / name
        print(f"[demo] fine-tuning the {name} encoder on {palette_root} (configs/finetune_tiny.yaml, {FT_EPOCHS} "
              f"epochs; about a minute)")
        if finetune(["--cfg", "finetune_tiny.yaml", f"data.root={palette_root}", f"log.out_dir={d}",
                     f"model.pretrained={weights}", f"train.epochs={FT_EPOCHS}"]) != 0:
            raise SystemExit(f"[demo] fine-tuning the {name} encoder failed")
        e = json.loads((d / "eval.json").read_text())
        res["finetune"][name] = {"acc1": e["acc1"], "acc5": e["acc5"], "epochs": FT_EPOCHS}
    for name, weights in (("pretrained", str(ckpt)), ("random", "random")):
        d = out / "attention" / name
        if visualize(["--ckpt", weights, "--data", str(rp_root), "--out", str(d), "--images", "4", "--no-progress"]) != 0:
            raise SystemExit("[demo] drawing the attention maps failed")
        res["attention"][name] = json.loads((d / "attention.json").read_text())["mean_entropy"]
    d = out / "predictions"
    if visualize(["--predictions", "--ckpt", str(ckpt), "--data", str(rp_root), "--out", str(d), "--images", "4",
                  "--tokenizer", str(tok_path), "--no-progress"]) != 0:
        raise SystemExit("[demo] drawing the predictions failed")
    res["predictions"] = {"token_acc": json.loads((d / "predictions.json").read_text())["token_acc"],
                          "png": str(d / "predictions.png")}
    lp, ft = res["linear_probe"], res["finetune"]
    res["margin"] = {"linear_probe": round(lp["pretrained"]["acc"] - lp["random"]["acc"], 4),
                     "finetune": round((ft["pretrained"]["acc1"] - ft["random"]["acc1"]) / 100, 4)}
    print(f"[demo] linear probe, random-palette val ({lp['pretrained']['val_images']} images, chance 10%): "
          f"pretrained {100 * lp['pretrained']['acc']:.1f}% (block {lp['pretrained']['best_block']}) vs random init "
          f"{100 * lp['random']['acc']:.1f}% vs raw pixels {100 * lp['pixels']['acc']:.1f}%")
    kn = res["knn"]
    print(f"[demo] kNN (k={kn['pretrained']['k']}, T={kn['pretrained']['temperature']}) on the same features: pretrained "
          f"{100 * kn['pretrained']['acc']:.1f}% vs random init {100 * kn['random']['acc']:.1f}% vs raw pixels "
          f"{100 * kn['pixels']['acc']:.1f}%")
    print(f"[demo] fine-tune, {FT_EPOCHS} epochs, palette toy val: pretrained {ft['pretrained']['acc1']:.1f}% vs "
          f"random init {ft['random']['acc1']:.1f}% top-1")
    print(f"[demo] attention maps -> {out / 'attention'} (pretrained/, random/: attention.png); what the pretrained "
          f"model predicts at the masked patches, decoded -> {res['predictions']['png']} "
          f"({100 * res['predictions']['token_acc']:.1f}% of the masked tokens of 4 images right)")
    if min(res["margin"].values()) <= 0:
        print("[demo] WARNING: the pretrained encoder did not beat the random one on every measure")
    return res


def stage_segment(out: Path, ckpt: Path) -> dict:
    """Segmentation fine-tuning (configs/seg_tiny.yaml, UperNet) of the pretrained and a random
    encoder on the toy ADE20K-layout set: mIoU on its validation split."""
    from beitfast.segment import main as segment
    from data_prep.make_toy_imagenet import make_segmentation

    root = ROOT / "data" / "toy_ade20k"
    m = make_segmentation(root, train=300, val=60, progress=False)
    print(f"[demo] toy segmentation set ({len(m['classes'])} classes, random palettes): {m['counts']} images -> {root}")
    res = {}
    for name, weights in (("pretrained", str(ckpt)), ("random", "")):
        d = out / "segment" / name
        print(f"[demo] segmentation fine-tuning of the {name} encoder (configs/seg_tiny.yaml; about a minute)")
        if segment(["--cfg", "seg_tiny.yaml", f"data.root={root}", f"log.out_dir={d}",
                    f"model.pretrained={weights}"]) != 0:
            raise SystemExit(f"[demo] segmentation fine-tuning of the {name} encoder failed")
        e = json.loads((d / "eval.json").read_text())
        res[name] = {"miou": e["miou"], "aacc": e["aacc"], "iters": e["iters"]}
    print(f"[demo] segmentation, toy val: pretrained mIoU {res['pretrained']['miou']:.1f} vs random init "
          f"{res['random']['miou']:.1f} (pixel accuracy {res['pretrained']['aacc']:.1f}% vs {res['random']['aacc']:.1f}%) "
          f"-> {out / 'segment'} (predictions.png)")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    a = ap.parse_args(argv)
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data_root, palette_root = stage_dataset(out)
    cfg = stage_config(out, data_root)
    summary = {"dataset": str(data_root), "config": str(out / "config.yaml"), "masks": stage_masks(out, cfg)}
    summary["dvae"] = stage_dvae(out, data_root)
    summary["cache"] = stage_cache(out, data_root, Path(summary["dvae"]["tokenizer"]))
    summary["pretrain"] = stage_pretrain(out, Path(summary["cache"]["cache"]), Path(summary["dvae"]["tokenizer"]),
                                         fresh=summary["cache"]["rebuilt"])
    ckpt = Path(summary["pretrain"]["run"]) / "ckpt.pt"
    summary.update(stage_evaluate(out, data_root, palette_root, ckpt, Path(summary["dvae"]["tokenizer"])))
    summary["segmentation"] = stage_segment(out, ckpt)
    summary["outputs"] = str(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[demo] done in {time.time() - t0:.0f} s; outputs in {out} "
          f"(summary.json, config.yaml, masks.png, dvae_tiny/, cache/, cache_views.png, pretrain/, "
          f"pretrain_curves.png, probe/, finetune/, attention/, predictions/, segment/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
