"""Training throughput with the cached-view loader synchronous vs prefetched in a thread.

    python benchmarks/bench_loader.py [--tiny] [--batch 32] [--steps 12]

Builds a toy ImageNet and its token cache (tiny dVAE, random weights, K = 2), then measures
on the tiny config: the loader alone (images/s), the train step alone on one fixed batch
(forward, backward, AdamW), and the two together with `data.prefetch` 0 (baseline: load, then
step) and 2 (the next batches made in a background thread while the step runs). Rounds are
interleaved; medians. Ideal overlap reaches the slower of the two parts alone. Last line: one
JSON object.
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
from beitfast.data.loader import CachedViewLoader  # noqa: E402
from beitfast.data.prefetch import prefetch  # noqa: E402
from beitfast.model import Beit, BeitArgs  # noqa: E402
from beitfast.tokenizers.dvae import DVAE, DVAEArch  # noqa: E402
from data_prep.make_toy_imagenet import make  # noqa: E402
from data_prep.tokenize_imagenet import main as tokenize  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="seconds, for the test suite")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    a = ap.parse_args(argv)
    batch = a.batch or (8 if a.tiny else 32)
    steps = a.steps or (2 if a.tiny else 12)
    rounds = a.rounds or (1 if a.tiny else 3)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = {"bench": "loader", "device": dev.type, "batch": batch, "steps": steps, "tiny": a.tiny}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make(tmp / "toy", classes=4, per_class=max(8, batch * steps // 4 + 1), val_per_class=0, seed=0, progress=False)
        torch.manual_seed(0)
        torch.save(DVAE(DVAEArch(vocab_size=512, n_hid=16, n_init=16, n_blk_per_group=1, downsample=4)).export(32),
                   tmp / "tok.pt")
        over = [f"tokenizer.path={tmp / 'tok.pt'}", "data.views=2", f"data.cache={tmp / 'cache'}",
                f"data.batch_size={batch}", f"train.global_batch={batch}"]
        assert tokenize(["--data", str(tmp / "toy"), "--out", str(tmp / "cache"), "--cfg", "tiny.yaml", "--no-progress",
                         "--max-reject", "0.05", *over[:2]]) == 0
        cfg = load_config("tiny", over)
        loader = CachedViewLoader(TokenCache(tmp / "cache"), cfg, device=dev)
        steps = min(steps, loader.steps_per_epoch)
        model = Beit(BeitArgs.from_config(cfg.model)).to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def train_step(b):
            model(b["images"], b["mask"], b["tokens"], cfg.mask.num_patches)["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()

        def timed(fn) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        def loader_only():
            for _ in loader.epoch(0, 0):
                pass

        fixed = next(loader.epoch(0, 0))
        train_step(fixed)  # warm-up

        def step_only():
            for _ in range(steps):
                train_step(fixed)

        def together(depth):
            def run():
                it = prefetch(loader.epoch(0, loader.steps_per_epoch - steps), depth)
                for b in it:
                    train_step(b)
            return run

        times = {k: [] for k in ("loader", "step", "sync", "prefetch")}
        for _ in range(rounds):
            times["loader"].append(timed(loader_only) * steps / loader.steps_per_epoch)
            times["step"].append(timed(step_only))
            times["sync"].append(timed(together(0)))
            times["prefetch"].append(timed(together(2)))
        for k, v in times.items():
            res[f"{k}_images_per_s"] = round(steps * batch / statistics.median(v), 2)
        res["speedup_prefetch_vs_sync"] = round(res["prefetch_images_per_s"] / res["sync_images_per_s"], 3)
        res["ideal_images_per_s"] = min(res["loader_images_per_s"], res["step_images_per_s"])
    emit(res, show=True)
    return res


if __name__ == "__main__":
    main()
