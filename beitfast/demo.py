"""`make demo`: run every stage that exists end to end on the toy ImageNet, on CPU.

    python -m beitfast.demo --out runs/demo

Stages run in data-flow order and each prints where its outputs are. A stage whose output
is already there is reused, so a second run is quick.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from beitfast.config import load_config
from beitfast.masking import MaskGenerator, MaskSpec

ROOT = Path(__file__).resolve().parent.parent


def stage_dataset(out: Path) -> Path:
    from data_prep.make_toy_imagenet import make

    root = ROOT / "data" / "toy_imagenet"
    m = make(root, classes=10, per_class=100, val_per_class=20, seed=0, corrupt=True)
    print(f"[demo] toy ImageNet: {m['counts']} images, {len(m['odd'])} odd files -> {root}")
    return root


def stage_config(out: Path, data_root: Path):
    cfg = load_config("tiny", [f"data.root={data_root}", f"log.out_dir={out}"])
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # data_prep/ holds scripts, importable from the repo root
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data_root = stage_dataset(out)
    cfg = stage_config(out, data_root)
    summary = {"dataset": str(data_root), "config": str(out / "config.yaml"),
               "masks": stage_masks(out, cfg), "dvae": stage_dvae(out, data_root), "outputs": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[demo] done in {time.time() - t0:.0f} s; outputs in {out} "
          f"(summary.json, config.yaml, masks.png, dvae_tiny/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
