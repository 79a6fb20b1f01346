"""Loader throughput of every backend at equal thread counts, and loader + step overlap.

    python benchmarks/bench_loader.py [--tiny] [--images 512] [--threads 1,2] [--batch 128]

Builds ImageNet-sized toy JPEGs (about 500 x 375) and their token cache at the paper's
settings (224 px ViT view, 112 px tokenizer view, 14 x 14 tokens; a small random dVAE, K = 2),
writes its FFCV .beton (where FFCV is installed; otherwise the FFCV rows are skipped and the
reason printed), then measures:

- loader alone, images/s, per backend and thread count: DALI (`data.num_threads` = t, the
  cache read in-process), FFCV (`num_workers` = t), reference (a DataLoader with t Pillow
  worker processes); each backend's ratio to the reference at the same t, measured in this
  run (`ratio_<backend>_vs_reference_t<t>`). Warm-up batches are excluded; medians of rounds.
  The batch is the trainer's per-GPU batch (128): DALI runs each operator over the whole
  batch and its threads wait for the slowest sample at every operator, so small batches
  under-use its threads (measured here at t = 2: 1.33x the reference at batch 16, 1.50x at
  32, 1.83x at 64).
- pixels: the mean absolute difference (0..255) of each backend's ViT views from the
  reference's, the same stored views (decoder, resampler and jitter rounding); and of the
  jitter alone (`jitter_mad_vs_whole_image`, `jitter_max_vs_whole_image`): our jitter of the
  decoded crop with the stored pivot against the reference's, Pillow's ops on the whole
  image, then the crop; every view of the first 64 images, full resolution, no resampling.
- overlap: the train step alone on one fixed batch, and loader + step together, as the trainer
  runs them (the config's precision; on a GPU one synchronisation at the end of the timed
  steps, not one a step), for each backend at the largest t. Tiny model on CPU (batch 16:
  its step is slow; --tiny: the micro model), BEiT-B/16 on a GPU. `data_wait` = 1 - (step alone / together), the share of time the step waits.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import emit  # noqa: E402
from beitfast.config import load_config  # noqa: E402
from beitfast.data.cache import TokenCache  # noqa: E402
from beitfast.data.ffcv_loader import ffcv_unavailable  # noqa: E402
from beitfast.data.loader import build_loader  # noqa: E402
from beitfast.model import Beit, BeitArgs  # noqa: E402
from beitfast.tokenizers.dvae import DVAE, DVAEArch  # noqa: E402
from data_prep.make_toy_imagenet import make  # noqa: E402
from data_prep.tokenize_imagenet import main as tokenize  # noqa: E402


def images_per_s(loader, batch: int, warmup: int, n: int, rounds: int) -> float:
    rates = []
    for _ in range(rounds):
        s = loader.stream(0)
        try:
            for _ in range(warmup):
                next(s)
            t = time.perf_counter()
            for _ in range(n):
                b = next(s)
            if b["images"].is_cuda:
                torch.cuda.synchronize()
            rates.append(n * batch / (time.perf_counter() - t))
        finally:
            s.close()
    return statistics.median(rates)


def jitter_difference(cache: TokenCache, n: int) -> dict:
    """Our jitter on the crop vs the reference's on the whole image (0..255 units)."""
    import io

    import numpy as np
    from PIL import Image

    from beitfast.data.resample import jitter_into
    from beitfast.data.views import _pil_op, jitter_matrices

    total, count, worst = 0.0, 0, 0
    for j in range(min(n, len(cache))):
        data, _, views, _ = cache.item(j)
        img = Image.open(io.BytesIO(data.tobytes())).convert("RGB")
        arr = np.asarray(img)
        for v, m in zip(views, jitter_matrices(np.asarray(views))):
            ref = img
            for op in v["order"]:
                ref = _pil_op(ref, int(op), v["jitter"][op])
            y, x, h, w = int(v["y"]), int(v["x"]), int(v["h"]), int(v["w"])
            want = np.asarray(ref)[y:y + h, x:x + w].astype(np.int16)
            crop = arr[y:y + h, x:x + w].copy()  # Pillow's array is read-only (a full-width crop was a view of it)
            jitter_into(crop, crop, m)
            d = np.abs(crop.astype(np.int16) - want)
            total, count, worst = total + float(d.sum()), count + d.size, max(worst, int(d.max()))
    return {"jitter_mad_vs_whole_image": round(total / count, 4), "jitter_max_vs_whole_image": worst}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="seconds, for the test suite")
    ap.add_argument("--images", type=int, default=None, help="toy images (default 512, 4096 on a GPU; tiny 48)")
    ap.add_argument("--batch", type=int, default=None, help="loader batch (default 128, the per-GPU batch; tiny 8)")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (default 1,2; all cores on a GPU)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--backends", default=None,
                    help="comma-separated (reference is the baseline; default all three)")
    ap.add_argument("--no-overlap", action="store_true", help="loader rows only")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    batch = a.batch or (8 if a.tiny else 128)
    n_images = a.images or (48 if a.tiny else (4096 if cuda else 512))
    threads = [int(t) for t in a.threads.split(",")] if a.threads else ([2] if a.tiny else (
        [len(os.sched_getaffinity(0))] if cuda else [1, 2]))
    rounds = a.rounds or (1 if a.tiny else 3)
    res = {"bench": "loader", "device": dev.type, "batch": batch, "images": n_images, "threads": threads,
           "tiny": a.tiny, "image_size": "about 500x375 JPEG (toy)", "view": "224 px ViT view, K=2"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        per_class = max(2, n_images // 4)
        make(tmp / "toy", classes=4, per_class=per_class, val_per_class=0, seed=0, progress=False,
             sides=(380, 480) if not a.tiny else (160, 240))
        torch.manual_seed(0)
        torch.save(DVAE(DVAEArch(vocab_size=512, n_hid=16, n_init=16, n_blk_per_group=1, downsample=8)).export(112),
                   tmp / "tok.pt")
        over = ["tokenizer.kind=dvae", f"tokenizer.path={tmp / 'tok.pt'}", "model.vocab_size=512", "data.views=2",
                f"data.cache={tmp / 'cache'}", f"data.batch_size={batch}", "data.workers=0",
                # --tiny on a CPU: the micro model, the same steps at a tenth of the tiny model's cost
                f"model.size={'base' if cuda else 'micro' if a.tiny else 'tiny'}", "train.compile=false",
                "train.precision=bf16" if cuda else "train.precision=fp32"]
        assert tokenize(["--data", str(tmp / "toy"), "--out", str(tmp / "cache"), "--cfg", "base.yaml",
                         "--no-progress", "--max-reject", "0.05", *over[:5]]) == 0
        cache = TokenCache(tmp / "cache")
        asked = (a.backends or "reference,dali,ffcv").split(",")  # tiny too: every path of the full mode runs
        backends = ["reference"] + [b for b in ("dali",) if b in asked]
        why = ffcv_unavailable()
        if "ffcv" not in asked:
            pass
        elif why:
            print(f"ffcv rows skipped: {why}")
        else:
            from data_prep.cache_to_ffcv import main as to_ffcv

            assert to_ffcv(["--cache", str(tmp / "cache"), "--workers", str(max(threads))]) == 0
            backends.append("ffcv")
        cfgs = {b: load_config("base", over + [f"data.backend={b}"]) for b in backends}
        warm, n = (1, 2) if a.tiny else (2, 24 if cuda else 6)  # the stream runs on across epochs
        res["batches_timed"] = n
        for t in threads:
            for b in backends:
                kw = {"threads": t, "workers": t if b == "reference" else 0}
                res[f"images_per_s_{b}_t{t}"] = round(images_per_s(build_loader(cfgs[b], cache, device=dev, **kw),
                                                                   batch, warm, n, rounds), 1)
                print(f"loader {b} threads={t}: {res[f'images_per_s_{b}_t{t}']} images/s", flush=True)
            for b in backends[1:]:
                res[f"ratio_{b}_vs_reference_t{t}"] = round(res[f"images_per_s_{b}_t{t}"] /
                                                            res[f"images_per_s_reference_t{t}"], 3)

        # pixels: the same stored views, each backend against the reference's rendering
        first = {}
        for b in backends:
            s = build_loader(cfgs[b], cache, device=dev, threads=max(threads), workers=0).stream(0)
            first[b] = next(s)["images"].float().cpu()
            s.close()
        std = torch.tensor(cfgs["reference"].data.std).view(1, 3, 1, 1) * 255
        for b in backends[1:]:
            res[f"pixel_mad_{b}_vs_reference"] = round(float(((first[b] - first["reference"]) * std).abs().mean()), 3)

        res.update(jitter_difference(cache, 64))

        if a.no_overlap:
            emit(res, show=True)
            return res

        # overlap: the step alone and loader + step together, at the largest thread count
        t_max = max(threads)
        ob = batch if cuda or a.tiny else 16  # the CPU step: about a second per 16 images
        res["overlap_batch"] = ob
        cfgs = {b: load_config("base", over + [f"data.backend={b}", f"data.batch_size={ob}"]) for b in backends}
        cfg = cfgs["reference"]
        model = Beit(BeitArgs.from_config(cfg.model)).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)

        def step(bt):
            with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
                loss = model(bt["images"], bt["mask"], bt["tokens"], cfg.mask.num_patches)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def timed_steps(batches, k):
            for _ in range(warm):
                step(next(batches))
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(k):
                step(next(batches))
            if cuda:
                torch.cuda.synchronize()  # once, at the end: the trainer never waits per step
            return k * ob / (time.perf_counter() - t0)

        fixed = first["reference"][:ob].to(dev)
        s = build_loader(cfg, cache, device=dev, threads=t_max, workers=t_max).stream(0)
        one = {k: v.clone() for k, v in next(s).items()}
        s.close()
        one["images"] = fixed

        def repeat():
            while True:
                yield one

        k = n if cuda else min(n, 4)  # the CPU step is slow: a few batches show the overlap
        res["step_images_per_s"] = round(statistics.median(timed_steps(repeat(), k) for _ in range(rounds)), 1)
        print(f"step alone: {res['step_images_per_s']} images/s", flush=True)
        for b in backends:
            kw = {"threads": t_max, "workers": t_max if b == "reference" else 0}
            rates = []
            for _ in range(rounds):
                s = build_loader(cfgs[b], cache, device=dev, **kw).stream(0)
                try:
                    rates.append(timed_steps(s, k))
                finally:
                    s.close()
            res[f"together_images_per_s_{b}"] = round(statistics.median(rates), 1)
            res[f"data_wait_{b}"] = round(max(0.0, 1 - res[f"together_images_per_s_{b}"] / res["step_images_per_s"]), 3)
            print(f"loader {b} + step: {res[f'together_images_per_s_{b}']} images/s", flush=True)
        res["model"] = cfg.model.size
        res["precision"] = cfg.train.precision
    emit(res, show=True)
    return res


if __name__ == "__main__":
    main()
