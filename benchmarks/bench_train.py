"""End-to-end pretraining throughput of named recipes, from the original recipe to beitfast,
one change at a time, measured in one run on one machine.

    python benchmarks/bench_train.py [--tiny] [--images N] [--batch B] [--steps S]

Each recipe is a real run of the trainer (`beitfast.train.pretrain`, one process) on
ImageNet-sized toy JPEGs (about 500 x 375) with the paper's 224 px views, 14 x 14 tokens and
an 8192-entry vocabulary:

    reference   the original code: Pillow DataLoader, online tokenization every step (DALL-E
                architecture in fp32), unfused LayerNorm and head, torch AdamW without
                fusion, fp16 autocast with a GradScaler on a GPU, `.item()` every step
    +cache      the targets from the token cache (same Pillow loader, rendering stored views)
    +dali       the pipelined DALI loader
    +kernels    fused kernels (Triton / Apex on a GPU; on a CPU the torch twins) and fused AdamW
    +nosync     no host synchronisation per step; bf16 on a GPU (fp32 on a CPU: CPU autocast
                is slower than fp32 there)
    beitfast    + torch.compile: the project's recipe

On a GPU: BEiT-B/16 and the full-size DALL-E encoder (random weights; the cost is what is
measured). On a CPU: the tiny ViT and a DALL-E encoder of width 64 instead of 256, which keeps
the paper's proportion of tokenizer to ViT cost (52 vs 108 GFLOP an image on BEiT-B/16; here
about 4.7 vs 8.2, both counted and printed). For each recipe: images/s and step time (medians over
report windows after warm-up and compilation), data wait (the share of the step's host time
spent waiting for the next batch; on a GPU an upper bound of the GPU's idle share, since the
host may run ahead), MFU (model FLOPs of the ViT step counted by torch's FlopCounterMode, over
a matmul peak measured in the same run), peak memory, and the ratio to `reference`.
Rows are appended to benchmarks/results/<machine>.jsonl; `benchmarks/plot.py` draws them.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_model import matmul_peak, step_flops  # noqa: E402
from benchmarks.common import emit, machine_info  # noqa: E402
from beitfast.config import load_config  # noqa: E402
from beitfast.masking import MaskGenerator, MaskSpec  # noqa: E402
from beitfast.model import Beit, BeitArgs  # noqa: E402
from beitfast.tokenizers.dalle import DalleEncoder  # noqa: E402
from data_prep.make_toy_imagenet import make  # noqa: E402
from data_prep.tokenize_imagenet import main as tokenize  # noqa: E402

# one change at a time: (name, overrides on top of the previous recipe's)
STEPS = [
    ("reference", ["data.targets=online", "data.backend=reference", "model.kernels=torch", "optim.fused=none",
                   "train.compile=false", "train.sync_each_step=true"]),
    ("+cache", ["data.targets=cache"]),
    ("+dali", ["data.backend=dali"]),
    ("+kernels", ["model.kernels=auto", "optim.fused=auto"]),
    ("+nosync", ["train.sync_each_step=false"]),
    ("beitfast", ["train.compile=true"]),
]


def recipes(cuda: bool) -> list[tuple[str, list[str]]]:
    """Each recipe's full list of overrides (a later value of a key replaces the earlier)."""
    out, acc = [], {}
    for name, over in STEPS:
        acc.update(o.split("=", 1) for o in over)
        if cuda:  # fp16 + GradScaler as the reference until the row that drops the per-step sync
            acc["train.precision"] = "fp16" if name in ("reference", "+cache", "+dali", "+kernels") else "bf16"
        else:
            acc["train.precision"] = "fp32"
        out.append((name, [f"{k}={v}" for k, v in acc.items()]))
    return out


def vit_gflop_per_image(cfg, dev) -> float:
    model = Beit(BeitArgs.from_config(cfg.model)).to(dev)
    g = cfg.model.img_size // cfg.model.patch_size
    x = torch.randn(1, 3, cfg.model.img_size, cfg.model.img_size, device=dev)
    mask = torch.from_numpy(MaskGenerator(MaskSpec.from_config(cfg.mask, g))([0])).to(dev)
    tgt = torch.randint(0, cfg.model.vocab_size, (1, g, g), device=dev)
    return step_flops(model, x, mask, tgt) / 1e9


def tokenizer_gflop_per_image(enc, size: int, dev) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        enc.to(dev)(torch.rand(1, 3, size, size, device=dev))
    return fc.get_total_flops() / 1e9


def run_recipe(base_over: list[str], over: list[str], out: Path, warm: int, windows: int, every: int) -> dict:
    """Train warm + windows x every steps; the report rows after the warm-up ones."""
    from beitfast.train import main as train

    steps = warm + windows * every
    args = ["--cfg", "base.yaml", f"log.out_dir={out}", *base_over, *over, f"train.max_steps={steps}",
            f"log.every={every}", "log.progress=false"]
    t = time.perf_counter()
    rc = train(args)
    if rc != 0:
        raise RuntimeError(f"recipe {over} failed with exit code {rc} (see its output above)")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > warm]
    if len(timed) < windows:
        raise RuntimeError(f"recipe {over}: {len(timed)} report rows after warm-up, expected {windows}")
    return {"rows": timed, "wall_s": time.perf_counter() - t}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="minutes, for the test suite: every recipe runs (on a CPU "
                    "without torch.compile), figures mean little")
    ap.add_argument("--images", type=int, default=None, help="toy images (default 256; 2048 on a GPU; tiny 32)")
    ap.add_argument("--batch", type=int, default=None, help="per-step batch (default 16 on a CPU, 128 on a GPU)")
    ap.add_argument("--every", type=int, default=None, help="steps per report window (timed unit)")
    ap.add_argument("--windows", type=int, default=None, help="timed report windows after the warm-up")
    ap.add_argument("--recipes", default=None, help="comma-separated subset (default: all, in order)")
    ap.add_argument("--results", default=None, help="jsonl to append rows to (default benchmarks/results/<machine>.jsonl)")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    batch = a.batch or (128 if cuda else (4 if a.tiny else 16))
    n_images = a.images or (2048 if cuda else (32 if a.tiny else 256))
    every = a.every or (10 if cuda else (1 if a.tiny else 3))
    windows = a.windows or (5 if cuda else (1 if a.tiny else 2))
    warm = every * (2 if cuda else 1)  # compilation and the loaders' start inside the first windows
    size, tok_size = (64, 32) if a.tiny else (224, 112)
    model_size = "base" if cuda else "tiny"
    todo = recipes(cuda)
    if a.recipes:
        want = a.recipes.split(",")
        unknown = [w for w in want if w not in dict(todo)]
        if unknown:
            ap.error(f"unknown recipe(s) {unknown}; known: {[n for n, _ in todo]}")
        todo = [(n, o) for n, o in todo if n in want]
    if a.tiny and not cuda:  # inductor on 2 CPU cores costs minutes and checks nothing the tests do not
        # (test_train: the compiled step against eager; test_selfcheck: the compile self-check)
        todo = [(n, o + ["train.compile=false"]) for n, o in todo]
    res = {"bench": "train", "device": dev.type, "model": model_size, "batch": batch, "images": n_images,
           "img_size": size, "tiny": a.tiny, "every": every, "windows": windows, "warm_steps": warm}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make(tmp / "toy", classes=4, per_class=max(2, n_images // 4), val_per_class=0, seed=0, progress=False,
             sides=(160, 240) if a.tiny else (380, 480))
        torch.manual_seed(0)
        # the tokenizer: the DALL-E architecture (random weights; the cost is what is measured)
        enc = DalleEncoder(n_hid=16, vocab_size=512) if a.tiny else DalleEncoder(n_hid=256 if cuda else 64)
        torch.save(enc.state_dict(), tmp / "dalle.pt")
        base_over = [f"data.root={tmp / 'toy'}", f"data.cache={tmp / 'cache'}", "data.views=2",
                     f"data.batch_size={batch}", f"train.global_batch={batch}", f"model.size={model_size}",
                     f"model.img_size={size}", f"data.tokenizer_img_size={tok_size}", "tokenizer.kind=dalle",
                     f"tokenizer.path={tmp / 'dalle.pt'}", f"model.vocab_size={512 if a.tiny else 8192}",
                     "train.epochs=1000", "optim.warmup_epochs=0", "log.ckpt_every_epochs=1000"]
        if a.tiny:
            base_over += ["mask.num_patches=6", "mask.min_patches=2", "model.patch_size=16"]
        print(f"bench_train: tokenizing {n_images} images x 2 views for the cached recipes", flush=True)
        assert tokenize(["--data", str(tmp / "toy"), "--out", str(tmp / "cache"), "--cfg", "base.yaml",
                         "--no-progress", "--max-reject", "0.05", *base_over]) == 0
        cfg = load_config("base", base_over)
        res["vit_gflop_per_image"] = round(vit_gflop_per_image(cfg, dev), 2)
        res["tokenizer_gflop_per_image"] = round(tokenizer_gflop_per_image(enc, tok_size, dev), 2)
        peak = matmul_peak(dev.type, torch.bfloat16 if cuda else torch.float32)
        res["matmul_peak_tflops"] = round(peak / 1e12, 3)
        rows = {}
        for name, over in todo:
            print(f"bench_train: recipe {name}: {' '.join(over)}", flush=True)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            r = run_recipe(base_over, over, tmp / "runs" / re.sub(r"\W", "_", name), warm, windows, every)
            ips = statistics.median(x["images_per_s"] for x in r["rows"])
            row = {"recipe": name, "images_per_s": round(ips, 2),
                   "step_time_ms": round(statistics.median(x["step_time_ms"] for x in r["rows"]), 2),
                   "data_wait": round(statistics.median(x["data_wait"] for x in r["rows"]), 4),
                   "mfu": round(ips * res["vit_gflop_per_image"] * 1e9 / peak, 4),
                   # on a CPU the trainer reports the process's resident high-water mark, which
                   # recipes run in one process share: only a GPU's (reset per recipe) is per recipe
                   "peak_mem_mib": max(x["peak_mem_mib"] for x in r["rows"]) if cuda else None,
                   "overrides": over}
            rows[name] = row
            print(f"bench_train: {name}: {row['images_per_s']} images/s, step {row['step_time_ms']} ms, "
                  f"data wait {row['data_wait']:.1%}, MFU {row['mfu']:.1%}", flush=True)
        ref = rows.get("reference")
        for name, row in rows.items():
            if ref:
                row["ratio_vs_reference"] = round(row["images_per_s"] / ref["images_per_s"], 3)
            res[f"images_per_s_{name}"] = row["images_per_s"]
        if ref and "beitfast" in rows:
            res["ratio_beitfast_vs_reference"] = rows["beitfast"]["ratio_vs_reference"]
        res["recipes"] = rows
    info = machine_info()
    machine = re.sub(r"[^a-z0-9]+", "-", (info.get("gpu") or f"cpu-{info['cores']}core-{info['cpu']}").lower()).strip("-")
    path = Path(a.results) if a.results else Path(__file__).parent / "results" / f"{machine}.jsonl"
    if not a.tiny or a.results:  # the test suite's tiny runs leave the committed results alone
        path.parent.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d")
        with open(path, "a") as f:
            for row in rows.values():
                f.write(json.dumps({"bench": "train", "date": stamp, "device": dev.type, "model": model_size,
                                    "batch": batch, "img_size": size, **row, "machine": info,
                                    "vit_gflop_per_image": res["vit_gflop_per_image"],
                                    "tokenizer_gflop_per_image": res["tokenizer_gflop_per_image"],
                                    "matmul_peak_tflops": res["matmul_peak_tflops"]}) + "\n")
        print(f"bench_train: {len(rows)} rows appended to {path}")
    emit(res, show=True)
    return res


if __name__ == "__main__":
    main()
