"""Tokenizer throughput (images/s) and FLOPs per image, for the DALL-E encoder and our dVAE.

    python benchmarks/bench_tokenizer.py [--tiny] [--device cpu|cuda]

Weights are random (speed does not depend on them). On CUDA the tokenizers run in bf16
autocast with channels_last; on CPU in fp32. FLOPs are counted by torch's FlopCounterMode
(2 per multiply-add) for one image. Baseline in the same run: the dall_e package's own
Encoder forward where it is installed (fp16 on CUDA, fp32 on CPU). Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import emit, time_median  # noqa: E402
from beitfast.config import DVAEConfig, load_config  # noqa: E402
from beitfast.tokenizers.dalle import DalleEncoder, DalleTokenizer, map_pixels  # noqa: E402
from beitfast.tokenizers.dvae import DVAE, DVAEArch, DVAETokenizer  # noqa: E402


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


def dvae_tokenizer(cfg_name: str, device) -> DVAETokenizer:
    m = load_config(cfg_name, schema=DVAEConfig).model
    arch = DVAEArch(vocab_size=m.vocab_size, n_hid=m.n_hid, n_init=m.n_init, n_blk_per_group=m.n_blk_per_group,
                    downsample=m.downsample, likelihood=m.likelihood)
    return DVAETokenizer(DVAE(arch), m.img_size, batch_size=256, device=device)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="seconds, for the test suite")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    gpu = dev.type == "cuda"
    batch, reps = (256, 10) if gpu else ((2, 1) if a.tiny else (8, 3))
    torch.manual_seed(0)
    res = {"bench": "tokenizer", "device": str(dev), "batch": batch, "tiny": a.tiny}

    if a.tiny:  # a scaled-down DALL-E encoder keeps the tiny mode in seconds
        dalle = DalleTokenizer(DalleEncoder(n_hid=64, vocab_size=512), 64, device=dev)
    else:
        dalle = DalleTokenizer(DalleEncoder(), 112, device=dev)
    res["dalle_gflop_per_image"] = round(flops_per_image(dalle.net, dalle.input_size) / 1e9, 2)
    res["dalle_images_per_s"] = round(measure(dalle, batch, reps), 2)
    try:
        import dall_e

        ref = dall_e.Encoder(n_hid=dalle.net.arch["n_hid"], vocab_size=dalle.vocab_size, device=dev)
        ref.load_state_dict(dalle.net.state_dict())
        x = torch.rand(batch, 3, dalle.input_size, dalle.input_size, device=dev)

        def run_ref():
            with torch.no_grad():
                ref(map_pixels(x)).argmax(1)
            if gpu:
                torch.cuda.synchronize()

        res["dall_e_package_images_per_s"] = round(batch / time_median(run_ref, reps, warmup=1), 2)
        res["speedup_vs_dall_e_package"] = round(res["dalle_images_per_s"] / res["dall_e_package_images_per_s"], 3)
    except ImportError:
        pass

    for name, cfg_name in (("dvae_tiny", "dvae_tiny.yaml"), ("dvae", "dvae.yaml")):
        if a.tiny and name == "dvae":
            continue
        tok = dvae_tokenizer(cfg_name, dev)
        res[f"{name}_gflop_per_image"] = round(flops_per_image(tok.net, tok.input_size) / 1e9, 3)
        res[f"{name}_images_per_s"] = round(measure(tok, batch if name == "dvae" else max(batch, 256), reps), 2)
    emit(res, show=True)
    return res


if __name__ == "__main__":
    main()
