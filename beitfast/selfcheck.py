"""The start-up self-check (`train.self_check`, on by default in every trainer): before step 1,
on the run's device, dtype and shapes (one small batch), each fast path the run chose against
its reference twin, forward and backward. Whatever a review could not find on a GPU nobody has
tested fails here in seconds, loudly, instead of training silently on wrong gradients.

    kernel:<op>       each fused kernel chosen (LayerNorm, residual, masked head) vs its torch twin
    sdpa              attention with the relative-position bias exactly as the model calls it
                      (the bias cast to q's dtype) vs the math backend in fp32 (on H100 the cuDNN
                      backend once misread an fp32 bias with bf16 queries, pytorch PR #191612)
    attention:timm    timm's fused attention (fine-tuning, segmentation) vs its unfused path in fp32
    compile           the compiled step vs eager: loss and per-tensor gradients (2 blocks)
    dali_gpu          the first DALI GPU batch vs the CPU graph's rendering of the same views

`startup(...)` returns the check rows and the notes for the start line. A failure refuses to
start (SelfCheckFailed) naming the component, the measured error and the key that avoids it;
where that key is `auto` (model.kernels) it takes the safe path instead and says so.
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import kernels as K
from beitfast.precision import amp_dtype

# relative error in norm, ||fast - ref|| / ||ref||, allowed for outputs computed in this dtype
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
TOL_STEP = {torch.float32: 1e-3, torch.bfloat16: 8e-2, torch.float16: 3e-2}  # a whole step, per tensor


class SelfCheckFailed(Exception):
    """A fast path disagrees with its reference on this device; the message says which and why."""


def rel_err(fast: torch.Tensor, ref: torch.Tensor) -> float:
    return float((fast.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30))


def _row(component, errors: dict, tol, avoid, note="") -> dict:
    worst = max(errors, key=errors.get)
    ok = all(e == e and e <= tol for e in errors.values())  # e == e: a NaN fails
    return {"component": component, "ok": ok, "error": errors[worst], "worst": worst, "tol": tol, "avoid": avoid,
            **({"note": note} if note else {})}


def _autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def _run(fn, leaves, dout=None):
    """(output, *grads of leaves) of fn(*leaves), backward from dout (or the scalar output)."""
    for t in leaves:
        t.grad = None
    out = fn(*leaves)
    if isinstance(out, tuple):
        out = out[0]
    out.backward(dout) if dout is not None else out.backward()
    return [out.detach()] + [t.grad.detach().clone() if t.grad is not None else torch.zeros_like(t) for t in leaves]


def _compare(fast, ref, names) -> dict:
    return {n: rel_err(f, r) for n, f, r in zip(names, fast, ref)}


def check_kernels(policy: dict, dim: int, tokens: int, vocab: int, max_masked: int, device, dtype, g) -> list[dict]:
    """Each op whose chosen implementation is not the twin, against the twin, at the model's
    width, sequence length and vocabulary, in the run's autocast dtype, batch 2."""
    rows = []

    def leaf(*shape, scale=1.0, shift=0.0, dt=torch.float32):
        return (torch.randn(*shape, device=device, generator=g) * scale + shift).to(dt).requires_grad_()

    for op, impl in policy.items():
        if impl == "torch":
            continue
        avoid = "model.kernels=torch"
        if op == "layer_norm":
            x, w, b = leaf(2, tokens, dim, scale=2.0, shift=0.5), leaf(dim, shift=1.0), leaf(dim)
            dy = torch.randn(2, tokens, dim, device=device, generator=g).to(dtype)

            def fn(impl):
                def f(x, w, b):
                    with _autocast(device, dtype):
                        return K.layer_norm(x, w, b, 1e-6, impl)
                return f
            res = [_run(fn(i), [x, w, b], dy) for i in (impl, "torch")]
            errs = _compare(*res, ("out", "dx", "dw", "db"))
        elif op == "residual":
            x, y, gam = leaf(2, tokens, dim), leaf(2, tokens, dim, dt=dtype), leaf(dim, scale=0.1)
            scale = torch.tensor([1.25, 0.0], device=device)
            dout = torch.randn(2, tokens, dim, device=device, generator=g)
            res = [_run(lambda x, y, gm, i=i: K.residual_add(x, y, gm, scale, i), [x, y, gam], dout)
                   for i in (impl, "torch")]
            errs = _compare(*res, ("out", "dx", "dy", "dgamma"))
        else:  # masked_head: h in the branch dtype, fp32 weights, the static mask budget
            h, w, b = leaf(2, tokens - 1, dim, dt=dtype), leaf(vocab, dim, scale=0.02), leaf(vocab, scale=0.1)
            mask = _budget_mask(tokens - 1, max_masked, device, g)
            tgt = torch.randint(0, vocab, (2, tokens - 1), device=device, generator=g)

            def fn(impl):
                def f(h, w, b):
                    with _autocast(device, dtype):
                        return K.masked_head(h, mask, w, b, tgt, impl, max_rows=2 * max_masked)
                return f
            res = [_run(fn(i), [h, w, b]) for i in (impl, "torch")]
            errs = _compare(*res, ("loss", "dh", "dw", "db"))
        rows.append(_row(f"kernel:{op}", errs, TOL[dtype], avoid, f"{impl} vs torch"))
    return rows


def check_sdpa(heads: int, dim: int, tokens: int, device, dtype, attention: str, g) -> dict:
    """The model's attention call with the bias (beitfast.model.attend) against the math backend
    in fp32: output and the gradients of q, k, v and the bias."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from beitfast.model import attend

    hd = dim // heads
    q, k, v = (torch.randn(2, heads, tokens, hd, device=device, generator=g).to(dtype).requires_grad_()
               for _ in range(3))
    bias = (torch.randn(heads, tokens, tokens, device=device, generator=g) * 0.5).requires_grad_()
    dout = torch.randn(2, heads, tokens, hd, device=device, generator=g).to(dtype)
    fast = _run(lambda q, k, v, b: attend(q, k, v, b, attention), [q, k, v, bias], dout)

    def math(q, k, v, b):
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=b[None])
    ref = _run(math, [q, k, v, bias], dout.float())
    return _row(f"attention:{attention}", _compare(fast, ref, ("out", "dq", "dk", "dv", "dbias")), TOL[dtype],
                "model.attention=" + ("flex" if attention == "sdpa" else "sdpa"), "vs the math backend in fp32")


def check_timm_attention(model, tokens: int, device, dtype, g) -> dict | None:
    """timm's BEiT attention of the first block, fused (SDPA with its fp32 bias under autocast, as
    it runs) against its own unfused path in fp32."""
    import copy

    attn = copy.deepcopy(model.blocks[0].attn)  # with a random bias: a zero one (the init) would hide a misread
    if not getattr(attn, "fused_attn", False):
        return None
    dim, heads = attn.qkv.in_features, attn.num_heads
    shared = None
    with torch.no_grad():
        if attn.relative_position_bias_table is not None:
            attn.relative_position_bias_table.copy_(torch.randn(attn.relative_position_bias_table.shape,
                                                                device=device, generator=g) * 0.5)
        else:
            shared = torch.randn(heads, tokens, tokens, device=device, generator=g) * 0.5
    x = torch.randn(2, tokens, dim, device=device, generator=g).requires_grad_()
    dout = torch.randn(2, tokens, dim, device=device, generator=g)
    ref_attn = copy.deepcopy(attn).float()
    ref_attn.fused_attn = False

    def fused(x):
        with _autocast(device, dtype):
            return attn(x, shared_rel_pos_bias=shared)
    fast = _run(fused, [x], dout)
    ref = _run(lambda x: ref_attn(x, shared_rel_pos_bias=shared), [x], dout)
    return _row("attention:timm", _compare(fast, ref, ("out", "dx")), TOL[dtype], "TIMM_FUSED_ATTN=0 (environment)",
                "fused vs unfused fp32")


def check_compiled_step(args, device, dtype, max_masked: int, g) -> dict:
    """The model's step compiled (torch.compile, as the trainer) against eager on the same inputs:
    loss and every parameter's gradient. Two blocks, drop path off (its random draws differ)."""
    from beitfast.model import Beit

    a = dataclasses.replace(args, depth=min(2, args.depth or 99), drop_path=0.0)
    model = Beit(a).to(device)
    side, grid = a.img_size, a.img_size // a.patch_size
    x = torch.randn(2, 3, side, side, device=device, generator=g)
    mask = _budget_mask(grid * grid, max_masked, device, g).view(2, grid, grid)
    tgt = torch.randint(0, a.vocab_size, (2, grid, grid), device=device, generator=g)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(fn):
        model.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = fn(x, mask, tgt, max_masked)["loss"]
        loss.backward()
        return [loss.detach()] + [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                                  for p in params]
    eager = step(model)
    compiled = step(torch.compile(model))
    names = ["loss"] + [n for n, p in model.named_parameters() if p.requires_grad]
    errs = {n: rel_err(c, e) for n, c, e in zip(names, compiled, eager) if n == "loss" or float(e.norm()) > 0}
    return _row("compile", errs, TOL_STEP[dtype], "train.compile=false", "compiled vs eager, 2 blocks")


def check_dali_gpu(cfg, cache, device) -> dict:
    """The first batch of the DALI GPU graph against the CPU graph's of the same views: equal
    tokens, masks and indices, images within decoder rounding (mean under 1 grey level)."""
    from beitfast.data.loader import build_loader

    first = {}
    for dev in (device, torch.device("cpu")):
        s = build_loader(cfg, cache, device=dev, workers=0).stream(0)
        try:
            first[dev.type] = {k: v.float().cpu() for k, v in next(s).items()}
        finally:
            s.close()
    gpu, cpu = first["cuda"], first["cpu"]
    errs = {k: float((gpu[k] != cpu[k]).float().mean()) for k in ("tokens", "mask", "index")}
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1) * 255
    errs["images"] = float(((gpu["images"] - cpu["images"]) * std).abs().mean())  # in grey levels, tol 1
    ok = errs["images"] < 1.0 and not any(errs[k] for k in ("tokens", "mask", "index"))
    worst = max(errs, key=errs.get)
    return {"component": "dali_gpu", "ok": ok, "error": errs[worst], "worst": worst, "tol": 1.0,
            "avoid": "data.backend=reference (Pillow on the CPU)", "note": "GPU vs CPU graph, grey levels"}


def _budget_mask(n: int, budget: int, device, g) -> torch.Tensor:
    """(2, n) bool, exactly min(budget, n) masked positions per row (the static budget)."""
    mask = torch.zeros(2, n, dtype=torch.bool, device=device)
    for i in range(2):
        mask[i, torch.randperm(n, device=device, generator=g)[:min(budget, n)]] = True
    return mask


def startup_pretrain(cfg, device, cache=None, seed: int = 0) -> tuple[list[dict], list[str]]:
    """Every check the pretraining run's choices call for. Returns (rows, notes); takes the safe
    path where the key is `auto` (model.kernels, setting it to torch), else raises SelfCheckFailed.
    The run's random streams are left as they were."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _startup_pretrain(cfg, device, cache, seed)


def _startup_pretrain(cfg, device, cache, seed):
    from beitfast.model import SIZES, BeitArgs

    g = torch.Generator(device=device).manual_seed(seed)
    dt = amp_dtype(cfg.train.precision)
    args = BeitArgs.from_config(cfg.model)
    dim, _, heads, _ = SIZES[args.size]
    grid = args.img_size // args.patch_size
    tokens = grid * grid + 1
    rows, notes = [], []
    t0 = time.time()
    policy = K.policy(cfg.model.kernels, device)
    kern = check_kernels(policy, dim, tokens, args.vocab_size if args.target == "tokens" else 16,
                         cfg.mask.num_patches, device, dt, g)
    rows += kern
    bad = [r for r in kern if not r["ok"]]
    if bad and cfg.model.kernels == "auto":
        cfg.model.kernels = "torch"
        notes.append("model.kernels=auto fell back to torch: " + "; ".join(_say(r) for r in bad))
        for r in bad:
            r["fallback"] = True
        args = BeitArgs.from_config(cfg.model)
    if cfg.model.rel_pos_bias != "none":
        rows.append(check_sdpa(heads, dim, tokens, device, dt, cfg.model.attention, g))
    if cfg.train.compile:
        rows.append(check_compiled_step(args, device, dt, cfg.mask.num_patches, g))
    from beitfast.data.loader import resolve_backend

    if device.type == "cuda" and cfg.data.targets == "cache" and resolve_backend(cfg.data) == "dali" and cache is not None:
        rows.append(check_dali_gpu(cfg, cache, device))
    _refuse([r for r in rows if not r["ok"] and not r.get("fallback")])
    notes.insert(0, f"self-check on {device.type} in {str(dt).split('.')[-1]} ({time.time() - t0:.1f} s): "
                 + ", ".join(f"{r['component']} {r['error']:.1e}{'' if r['ok'] else ' FAILED'}" for r in rows))
    return rows, notes


def startup_timm(model, device, precision: str, seed: int = 0) -> tuple[list[dict], list[str]]:
    """The fine-tuning and segmentation jobs' check: timm's fused attention as they run it, at the
    model's sequence length (its patches and the cls token)."""
    g = torch.Generator(device=device).manual_seed(seed)
    tokens = model.patch_embed.num_patches + 1
    dt = amp_dtype(precision)
    t0 = time.time()
    row = check_timm_attention(model, tokens, device, dt, g)
    rows = [row] if row else []
    _refuse([r for r in rows if not r["ok"]])
    return rows, [f"self-check on {device.type} in {str(dt).split('.')[-1]} ({time.time() - t0:.1f} s): "
                  + (", ".join(f"{r['component']} {r['error']:.1e}" for r in rows) or "no fused path to check")]


def _say(r: dict) -> str:
    return (f"{r['component']} ({r.get('note', '')}): relative error {r['error']:.2e} in {r['worst']} > "
            f"{r['tol']:.0e}")


def _refuse(failed: list[dict]) -> None:
    if failed:
        raise SelfCheckFailed("self-check failed on this device: " + "; ".join(
            f"{_say(r)}; avoid it with {r['avoid']}" for r in failed)
            + " (train.self_check=false skips the check at your own risk)")
