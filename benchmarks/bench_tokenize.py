"""Offline tokenization throughput (views/s, images/s) next to the online cost it removes.

    python benchmarks/bench_tokenize.py [--tiny] [--views K]

Runs the real stage (data_prep/tokenize_imagenet.py: decode, view rendering through DALI,
tokenizer, shard writing) on a generated toy ImageNet, for two tokenizers with random
weights: our tiny dVAE (configs/tiny.yaml) and the DALL-E encoder at full size (112 px ->
14x14 of 8192; a scaled-down one with --tiny). Baseline measured in the same run: the same
tokenizer run online, as the reference does, i.e. its forward on a training batch every
step; reported as ms per step at 128 images per GPU and as the total over 800 epochs against
the one-off offline cost of K views. GPU when present (DALI mixed decoder, bf16). Also the
peak resident memory of the stage (a fresh process each) on a dataset and on one 4x larger:
`rss_growth_4x_data` near 1.0 means memory does not grow with the dataset. Last line: one
JSON object.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import emit, time_median  # noqa: E402
from beitfast.tokenizers.dalle import DalleEncoder, DalleTokenizer  # noqa: E402
from beitfast.tokenizers.dvae import DVAE, DVAEArch  # noqa: E402
from data_prep.make_toy_imagenet import make  # noqa: E402
from data_prep.tokenize_imagenet import main as tokenize  # noqa: E402

EPOCHS, STEP_BATCH = 800, 128
ROOT = Path(__file__).resolve().parent.parent
# VmHWM is the peak RSS of the process's own address space; getrusage's ru_maxrss is not
# usable here: Linux carries it over from the parent through fork and exec.
_RSS_PROBE = ("import re, sys; sys.path.insert(0, sys.argv.pop(1)); "
              "from data_prep.tokenize_imagenet import main; rc = main(sys.argv[1:]); "
              "print('peak_rss_kb', re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1)); "
              "sys.exit(rc)")


def peak_rss_mb(args: list[str]) -> float:
    """Peak resident memory (MiB) of one tokenize_imagenet run in a fresh process."""
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(ROOT), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"tokenize_imagenet {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("peak_rss_kb")][-1]
    return int(line.split()[1]) / 1024


def memory_growth(tmp: Path, tokenizer_args: list[str], views: int, per_class: int) -> dict:
    """Peak RSS of the stage on 4 x per_class images and on 4x as many (same shard size)."""
    res = {}
    for name, n in (("small", per_class), ("large", 4 * per_class)):
        make(tmp / f"mem_{name}", classes=4, per_class=n, val_per_class=0, seed=1, progress=False)
        res[f"rss_mb_{name}_{4 * n}_images"] = round(peak_rss_mb(
            ["--data", str(tmp / f"mem_{name}"), "--out", str(tmp / f"mem_cache_{name}"), "--views", str(views),
             "--no-progress", "--shard-size", "32", *tokenizer_args]), 1)
    small, large = res.values()
    res["rss_growth_4x_data"] = round(large / small, 3)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="seconds, for the test suite")
    ap.add_argument("--views", type=int, default=2)
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    res = {"bench": "tokenize", "device": dev, "views": a.views, "tiny": a.tiny}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # images per class for each tokenizer: enough that start-up (DALI build, loading) is
        # small against the work, except DALL-E on CPU (about 0.5 s a view)
        per_class = {"dvae_tiny": 4 if a.tiny else 64, "dalle": 4 if a.tiny else (64 if cuda else 6)}
        for name, n in per_class.items():
            make(tmp / f"toy_{name}", classes=4, per_class=n, val_per_class=0, seed=0, progress=False)
        torch.manual_seed(0)
        dvae = DVAE(DVAEArch(vocab_size=512, n_hid=32, n_init=32, n_blk_per_group=1, downsample=4))
        torch.save(dvae.export(32), tmp / "dvae.pt")
        enc = DalleEncoder(n_hid=64, vocab_size=512) if a.tiny else DalleEncoder()
        torch.save(enc.state_dict(), tmp / "dalle.pt")
        cases = {"dvae_tiny": ["--cfg", "tiny.yaml", f"tokenizer.path={tmp / 'dvae.pt'}"],
                 "dalle": ["--cfg", "tiny.yaml", "tokenizer.kind=dalle", f"tokenizer.path={tmp / 'dalle.pt'}",
                           "data.tokenizer_img_size=" + ("64" if a.tiny else "112"), "model.img_size=224",
                           "model.patch_size=16", "mask.num_patches=75", "mask.min_patches=16"]}
        for name, args in cases.items():
            n_img = 4 * per_class[name]
            t = time.perf_counter()
            rc = tokenize(["--data", str(tmp / f"toy_{name}"), "--out", str(tmp / f"cache_{name}"), "--views", str(a.views),
                           "--no-progress", "--shard-size", "64", *args])
            dt = time.perf_counter() - t
            assert rc == 0, f"tokenization failed for {name}"
            res[f"{name}_views_per_s"] = round(n_img * a.views / dt, 2)
            res[f"{name}_images_per_s"] = round(n_img / dt, 2)
        res.update(memory_growth(tmp, cases["dvae_tiny"], a.views, 8 if a.tiny else 128))
        # online baseline: the DALL-E tokenizer's forward on every training batch
        tok = DalleTokenizer(enc, 64 if a.tiny else 112, device=dev)
        b = 256 if cuda else 4
        x = torch.randint(0, 256, (b, 3, tok.input_size, tok.input_size), dtype=torch.uint8, device=dev)

        def run():
            tok.encode(x)
            if cuda:
                torch.cuda.synchronize()

        per_img = time_median(run, 1 if a.tiny else 3, warmup=1) / b
    res["online_dalle_ms_per_step_b128"] = round(per_img * STEP_BATCH * 1e3, 1)
    res["online_dalle_s_per_image_800_epochs"] = round(per_img * EPOCHS, 3)
    offline = 1 / res["dalle_views_per_s"] * a.views
    res["offline_dalle_s_per_image_once"] = round(offline, 3)
    res["online_over_offline_cost"] = round(per_img * EPOCHS / offline, 1)
    emit(res, show=True)
    return res


if __name__ == "__main__":
    main()
