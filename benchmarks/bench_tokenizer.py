"""Tokenizer throughput (images/s) in fp32 and bf16, FLOPs per image, and how often bf16's
tokens agree with fp32's on real-looking images, for the DALL-E encoder and our dVAE.

    python benchmarks/bench_tokenizer.py [--tiny] [--device cpu|cuda] [--dvae-tiny PATH]

Speed: random weights (speed does not depend on them), channels_last on CUDA; FLOPs counted
by torch's FlopCounterMode (2 per multiply-add) for one image. Baseline in the same run: the
dall_e package's own Encoder forward (fp32) where it is installed.

Agreement (the cost of `tokenizer.precision: bf16`): tokenizer views (RandomResizedCrop box
and flip, Lanczos, as the cache samples them) of real-looking images, a photograph
(matplotlib's grace_hopper.jpg) and the toy ImageNet, tokenized in fp32 and in bf16 autocast;
the fraction of identical tokens. The argmax over thousands of logits flips where two
logits are closer than bf16's rounding. DALL-E's weights cannot be downloaded here: its rows
use the full-size architecture with random weights; our dVAE's use the trained tiny
tokenizer of `make demo` when it exists (--dvae-tiny), else random weights (said in the row).
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import emit, time_median  # noqa: E402
from beitfast.config import DVAEConfig, load_config  # noqa: E402
from beitfast.tokenizers.dalle import DalleEncoder, DalleTokenizer, map_pixels  # noqa: E402
from beitfast.tokenizers.dvae import DVAE, DVAEArch, DVAETokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def flops_per_image(net: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 3, size, size, device=next(net.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        net(x)
    return fc.get_total_flops()


def measure(tok, batch: int, reps: int) -> float:
    x = torch.randint(0, 256, (batch, 3, tok.input_size, tok.input_size), dtype=torch.uint8, device=tok.device)

    def run():
        tok.encode(x)
        if tok.device.type == "cuda":
            torch.cuda.synchronize()

    return batch / time_median(run, reps, warmup=1)


def dvae_model(cfg_name: str) -> tuple[DVAE, int]:
    m = load_config(cfg_name, schema=DVAEConfig).model
    arch = DVAEArch(vocab_size=m.vocab_size, n_hid=m.n_hid, n_init=m.n_init, n_blk_per_group=m.n_blk_per_group,
                    downsample=m.downsample, likelihood=m.likelihood)
    return DVAE(arch), m.img_size


def photo_views(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n tokenizer views (uint8 (n, 3, size, size)) of real-looking images: random crop boxes
    and flips (the cache's sampler, Pillow's Lanczos) of a photograph and of toy ImageNet images."""
    from matplotlib import cbook
    from PIL import Image

    from beitfast.data.views import AugSpec, sample_views
    from data_prep.make_toy_imagenet import make

    images = [Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")]
    with tempfile.TemporaryDirectory() as d:
        make(Path(d) / "toy", classes=4, per_class=4, val_per_class=0, seed=seed, corrupt=False, progress=False)
        images += [Image.open(p).convert("RGB") for p in sorted((Path(d) / "toy" / "train").rglob("*.JPEG"))
                   if Image.open(p).format == "JPEG"]
    # half the views from the photograph, the rest spread over the toy images
    counts = [n - n // 2] + [n // 2 // (len(images) - 1) + (i < n // 2 % (len(images) - 1)) for i in range(len(images) - 1)]
    out = []
    for i, (im, k) in enumerate(zip(images, counts)):
        for v in sample_views(seed, i, im.height, im.width, k, AugSpec()) if k else []:
            crop = im.crop((int(v["x"]), int(v["y"]), int(v["x"] + v["w"]), int(v["y"] + v["h"])))
            crop = crop.resize((size, size), Image.LANCZOS)
            if v["flip"]:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(torch.from_numpy(np.array(crop)).permute(2, 0, 1))
    return torch.stack(out)


def precision_rows(name: str, make_tok, views: torch.Tensor, batch: int, reps: int) -> dict:
    """images/s in fp32 and bf16, and the fraction of bf16 tokens equal to fp32's on `views`."""
    res = {}
    tokens = {}
    for p in ("fp32", "bf16"):
        tok = make_tok(p)
        res[f"{name}_{p}_images_per_s"] = round(measure(tok, batch, reps), 2)
        tokens[p] = tok.encode(views)
    res[f"{name}_bf16_speedup"] = round(res[f"{name}_bf16_images_per_s"] / res[f"{name}_fp32_images_per_s"], 3)
    res[f"{name}_bf16_agreement"] = round(float((tokens["bf16"] == tokens["fp32"]).float().mean()), 5)
    return res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="seconds, for the test suite")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--views", type=int, default=None, help="views for the agreement (default 256 GPU, 64 CPU)")
    ap.add_argument("--dvae-tiny", type=Path, default=ROOT / "runs" / "demo" / "dvae_tiny" / "tokenizer.pt",
                    help="a trained tiny dVAE export (make demo writes one); random weights when absent")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    gpu = dev.type == "cuda"
    batch, reps = (256, 10) if gpu else ((2, 1) if a.tiny else (8, 3))
    n_views = a.views or (256 if gpu else (4 if a.tiny else 64))
    torch.manual_seed(0)
    res = {"bench": "tokenizer", "device": str(dev), "batch": batch, "tiny": a.tiny, "agreement_views": n_views}

    if a.tiny:  # a scaled-down DALL-E encoder keeps the tiny mode in seconds
        dalle_net, dalle_size = DalleEncoder(n_hid=64, vocab_size=512), 64
    else:
        dalle_net, dalle_size = DalleEncoder(), 112
    res["dalle_gflop_per_image"] = round(flops_per_image(dalle_net, dalle_size) / 1e9, 2)
    res.update(precision_rows("dalle", lambda p: DalleTokenizer(dalle_net, dalle_size, device=dev, precision=p),
                              photo_views(n_views, dalle_size), batch, reps))
    res["dalle_images_per_s"] = res["dalle_fp32_images_per_s"]
    try:
        import dall_e

        ref = dall_e.Encoder(n_hid=dalle_net.arch["n_hid"], vocab_size=dalle_net.arch["vocab_size"], device=dev)
        ref.load_state_dict(dalle_net.state_dict())
        x = torch.rand(batch, 3, dalle_size, dalle_size, device=dev)

        def run_ref():
            with torch.no_grad():
                ref(map_pixels(x)).argmax(1)
            if gpu:
                torch.cuda.synchronize()

        res["dall_e_package_images_per_s"] = round(batch / time_median(run_ref, reps, warmup=1), 2)
        res["speedup_vs_dall_e_package"] = round(res["dalle_fp32_images_per_s"] / res["dall_e_package_images_per_s"], 3)
    except ImportError:
        print("dall_e package not installed: no baseline row against its forward")

    for name, cfg_name in (("dvae_tiny", "dvae_tiny.yaml"), ("dvae", "dvae.yaml")):
        if a.tiny and name == "dvae":  # the same code path as dvae_tiny with bigger weights: minutes on 2 cores
            continue
        model, size = dvae_model(cfg_name)
        if name == "dvae_tiny" and a.dvae_tiny.exists():
            from beitfast.tokenizers.dvae import load_export

            model, size = load_export(a.dvae_tiny)
            res["dvae_tiny_weights"] = f"trained: {a.dvae_tiny}"
        else:
            res[f"{name}_weights"] = "random"
        res[f"{name}_gflop_per_image"] = round(flops_per_image(model.encoder, size) / 1e9, 3)
        res.update(precision_rows(name, lambda p: DVAETokenizer(model, size, 256, dev, p), photo_views(n_views, size),
                                  batch if name == "dvae" else max(batch, 256), reps))
        res[f"{name}_images_per_s"] = res[f"{name}_fp32_images_per_s"]
    emit(res, show=True)
    return res


if __name__ == "__main__":
    main()
