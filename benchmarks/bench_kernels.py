"""Per-kernel speed (forward + backward) against torch, and Apex where installed.

    python benchmarks/bench_kernels.py [--tiny]

Shapes of BEiT-B at 128 images per GPU: LayerNorm (128*197, 768) of the fp32 stream written in
bf16, residual add (128, 197, 768) of the fp32 stream and a bf16 branch (the model's dtypes),
masked head (128*75 masked rows, 768 -> 8192). Triton kernels run compiled on CUDA only (the
interpreter is a correctness tool); on CPU the script reports the torch twins and, for the
head, the chunked path (no full logits kept) against the plain one. Each head also runs with
the static-shape gather (`_static`: padded to max_rows = m + 1%, no host sync). Peak memory
on CUDA.
Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels as K  # noqa: E402
from benchmarks.common import emit, time_median  # noqa: E402
from kernels.masked_head import masked_head_fused  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    b, n, d, v, m = (128, 197, 768, 8192, 128 * 75) if (cuda and not a.tiny) else ((2, 17, 64, 512, 20) if a.tiny
                                                                                     else (16, 197, 768, 8192, 16 * 75))
    reps = 20 if cuda else (2 if a.tiny else 5)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res = {"bench": "kernels", "device": dev, "dtype": str(dt).split(".")[-1], "shape": [b, n, d, v, m], "tiny": a.tiny}

    def bench(fn, *inputs):
        def run():
            for t in inputs:
                t.grad = None
            out = fn()
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
            sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time_median(run, reps, warmup=2)
        mem = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        return t * 1e3, mem

    impls = ["torch"] + (["triton"] if cuda and K.HAVE_TRITON else []) + (["apex"] if cuda and K.HAVE_APEX else [])
    # as the model calls them (kernels/__init__: residual-dtype policy): the stream x is fp32 and
    # the parameters too; LayerNorm writes the autocast dtype, the branch y is in it
    f32 = torch.float32
    amp = torch.autocast(dev, dtype=dt, enabled=dt != f32)
    x = torch.randn(b * n, d, device=dev, dtype=f32, requires_grad=True)
    w = torch.ones(d, device=dev, dtype=f32, requires_grad=True)
    bb = torch.zeros(d, device=dev, dtype=f32, requires_grad=True)

    def ln(impl):
        with amp:
            return K.layer_norm(x, w, bb, 1e-6, impl)

    for impl in impls:
        res[f"layernorm_{impl}_ms"] = round(bench(lambda: ln(impl), x, w, bb)[0], 3)
    x3 = torch.randn(b, n, d, device=dev, dtype=f32, requires_grad=True)
    y3 = torch.randn(b, n, d, device=dev, dtype=dt, requires_grad=True)
    g = torch.full((d,), 0.1, device=dev, dtype=f32, requires_grad=True)
    sc = torch.ones(b, device=dev)
    for impl in [i for i in impls if i != "apex"]:
        res[f"residual_{impl}_ms"] = round(bench(lambda: K.residual_add(x3, y3, g, sc, impl), x3, y3, g)[0], 3)
    h = torch.randn(b, n - 1, d, device=dev, dtype=dt, requires_grad=True)
    mask = torch.zeros(b, n - 1, dtype=torch.bool, device=dev)
    mask.view(-1)[torch.randperm(b * (n - 1), device=dev)[:m]] = True
    W = (torch.randn(v, d, device=dev, dtype=dt) * 0.02).requires_grad_()
    Bv = torch.zeros(v, device=dev, dtype=dt, requires_grad=True)
    tgt = torch.randint(0, v, (b, n - 1), device=dev)
    cap = m + m // 100  # the block masks' slack: mean 74.47 of a budget of 75
    heads = {"torch": lambda: K.masked_head(h, mask, W, Bv, tgt, "torch"),
             "torch_static": lambda: K.masked_head(h, mask, W, Bv, tgt, "torch", max_rows=cap),
             "chunked": lambda: masked_head_fused(h, mask, W, Bv, tgt, use_triton=False),
             "chunked_static": lambda: masked_head_fused(h, mask, W, Bv, tgt, use_triton=False, max_rows=cap)}
    if cuda and K.HAVE_TRITON:
        heads["triton"] = lambda: masked_head_fused(h, mask, W, Bv, tgt, use_triton=True)
        heads["triton_static"] = lambda: masked_head_fused(h, mask, W, Bv, tgt, use_triton=True, max_rows=cap)
    for name, fn in heads.items():
        ms, mem = bench(fn, h, W, Bv)
        res[f"head_{name}_ms"] = round(ms, 3)
        if mem is not None:
            res[f"head_{name}_peak_mem_mb"] = round(mem, 1)
    for k in ("layernorm", "residual", "head"):
        fast = res.get(f"{k}_triton_ms") or (res.get("head_chunked_ms") if k == "head" else None)
        if fast:
            res[f"{k}_speedup_vs_torch"] = round(res[f"{k}_torch_ms"] / fast, 3)
    emit(res, show=True)
    return res


if __name__ == "__main__":
    main()
