"""GPU correctness: the Triton kernels compiled for real (fp32 and bf16) against their twins,
the sync-free masked head under CUDA's sync debug mode, a bf16 model step with the fused
kernels against the unfused one (per tensor, at BEiT-B's and BEiT-L's layer scale), the
compiled step against eager, and DALI's GPU ('mixed') decoder against its CPU decoder.

Skipped without CUDA. BEITFAST_GPU_TEST_DEVICE=cpu runs the device-independent parts on CPU
(Triton through its interpreter) to check the tests themselves; only a GPU run proves the GPU.
"""
import importlib.util
import os

import numpy as np
import pytest
import torch

import kernels as K
from beitfast.model import Beit, BeitArgs
from kernels.masked_head import masked_head_fused

DEV = os.environ.get("BEITFAST_GPU_TEST_DEVICE", "cuda")
pytestmark = [pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(not K.HAVE_TRITON, reason="triton not installed")]
# relative error in norm, ||fast - ref|| / ||ref||: meaningful whatever the tensors' scale (the
# head's gradients are ~1e-7 each, where an absolute tolerance would pass anything)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def _close(fast, ref, dtype, what=""):
    err = float((fast.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30))
    assert err <= TOL[dtype], f"{what}: relative error {err:.2e} > {TOL[dtype]:.0e} ({dtype})"


def _seeded():
    return torch.Generator(device=DEV).manual_seed(int(np.random.randint(1 << 30)))


def _run(fn, inputs, dout):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(dout)
    return [out.detach().float()] + [t.grad.float() for t in inputs]


def _leaves(g, dtype, *shapes, scale=1.0):
    return [(torch.randn(s, device=DEV, generator=g) * scale).to(dtype).requires_grad_() for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_compiled(dtype):
    g = _seeded()
    x, w, b = _leaves(g, dtype, (2 * 197, 768), (768,), (768,))
    dy = torch.randn(2 * 197, 768, device=DEV, generator=g).to(dtype)
    fast = _run(lambda *a: K.layer_norm(*a, eps=1e-6, impl="triton"), [x, w, b], dy)
    slow = _run(lambda *a: K.layer_norm(*[t.float() for t in a], eps=1e-6, impl="torch"), [x, w, b], dy.float())
    for what, f, s in zip(("out", "d0", "d1", "d2"), fast, slow):
        _close(f, s, dtype, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_compiled(dtype):
    g = _seeded()
    x, y, gamma = _leaves(g, dtype, (4, 197, 768), (4, 197, 768), (768,))
    scale = (torch.rand(4, device=DEV, generator=g) < 0.9).float() / 0.9
    dout = torch.randn(4, 197, 768, device=DEV, generator=g).to(dtype)
    fast = _run(lambda *a: K.residual_add(*a, scale, impl="triton"), [x, y, gamma], dout)
    slow = _run(lambda *a: K.residual_add(*[t.float() for t in a], scale, impl="torch"), [x, y, gamma], dout.float())
    for what, f, s in zip(("out", "d0", "d1", "d2"), fast, slow):
        _close(f, s, dtype, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("static", [False, True])
def test_masked_head_compiled(dtype, static):
    """BEiT-B head shapes (768 -> 8192) on 8 images of 196 patches, 75 masked each at most."""
    g = _seeded()
    b, n, d, v = 8, 196, 768, 8192
    h, = _leaves(g, dtype, (b, n, d))
    w, = _leaves(g, dtype, (v, d), scale=0.02)
    bias, = _leaves(g, dtype, (v,), scale=0.02)
    mask = torch.zeros(b, n, dtype=torch.bool, device=DEV)
    for i in range(b):
        mask[i, torch.randperm(n, device=DEV, generator=g)[:75 - i]] = True
    tgt = torch.randint(0, v, (b, n), device=DEV, generator=g)
    res = {}
    for name, fn in (("fast", lambda: masked_head_fused(h, mask, w, bias, tgt, use_triton=True,
                                                        max_rows=b * 75 if static else None)),
                     ("ref", lambda: K.masked_head(h.float(), mask, w.float(), bias.float(), tgt, impl="torch"))):
        for t in (h, w, bias):
            t.grad = None
        loss, correct, cnt = fn()
        loss.backward()
        res[name] = (loss.detach().float(), int(correct), int(cnt), h.grad.float(), w.grad.float(), bias.grad.float())
    assert res["fast"][2] == res["ref"][2] == int(mask.sum())
    assert abs(res["fast"][1] - res["ref"][1]) <= (0 if dtype == torch.float32 else 0.02 * res["ref"][2])
    for what, f, s in zip(("dh", "dw", "db", "loss"), res["fast"][3:] + res["fast"][:1], res["ref"][3:] + res["ref"][:1]):
        _close(f, s, dtype, what)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA's sync debug mode exists only on CUDA")
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_static_masked_head_never_syncs(impl):
    """Forward and backward with max_rows under sync debug mode 'error': any host sync raises.
    The control (exact-size boolean gather) must raise, or the check proves nothing."""
    g = _seeded()
    h = torch.randn(4, 196, 768, device=DEV, generator=g, requires_grad=True)
    w = (torch.randn(8192, 768, device=DEV, generator=g) * 0.02).requires_grad_()
    bias = torch.zeros(8192, device=DEV, requires_grad=True)
    mask = torch.rand(4, 196, device=DEV, generator=g) < 0.35
    tgt = torch.randint(0, 8192, (4, 196), device=DEV, generator=g)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        loss, correct, n = K.masked_head(h, mask, w, bias, tgt, impl=impl, max_rows=4 * 196)
        loss.backward()
        with pytest.raises(RuntimeError):
            K.masked_head(h, mask, w, bias, tgt, impl=impl)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(n) == int(mask.sum())


@pytest.mark.parametrize("layer_scale", [0.1, 1e-5])
def test_model_bf16_fused_matches_unfused(layer_scale):
    """A BEiT-B-width model (2 blocks) in bf16 autocast: fused kernels vs torch twins, the loss
    and each parameter's gradient on its own (one norm over all gradients would be dominated
    by the largest tensors), at BEiT-B's and BEiT-L's layer scale; the residual stream stays
    fp32 in both (at 1e-5 a bf16 stream would drop every branch update)."""
    torch.manual_seed(int(np.random.randint(1 << 30)))
    models = {k: Beit(BeitArgs(size="base", depth=2, img_size=224, vocab_size=8192, kernels=k, drop_path=0,
                               layer_scale_init=layer_scale)).to(DEV) for k in ("torch", "triton")}
    models["triton"].load_state_dict(models["torch"].state_dict())
    g = _seeded()
    x = torch.randn(4, 3, 224, 224, device=DEV, generator=g)
    mask = torch.rand(4, 14, 14, device=DEV, generator=g) < 0.38
    tgt = torch.randint(0, 8192, (4, 14, 14), device=DEV, generator=g)
    out = {}
    for k, m in models.items():
        with torch.autocast(DEV, dtype=torch.bfloat16):
            assert m.forward_features(x, mask).dtype == torch.float32, k
            o = m(x, mask, tgt, max_masked=196)
        o["loss"].backward()
        out[k] = (o["loss"].detach().float(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None})
    _close(out["triton"][0], out["torch"][0], torch.bfloat16, "loss")
    assert out["triton"][1].keys() == out["torch"][1].keys()
    for n, ref in out["torch"][1].items():
        if ref.norm() > 0:
            _close(out["triton"][1][n], ref, torch.bfloat16, n)


@pytest.mark.skipif(DEV != "cuda", reason="inductor through Triton's interpreter is covered by test_model.py")
def test_compiled_fused_step_matches_eager():
    """train.compile=true on a GPU: the whole bf16 MIM step with our Triton custom ops inside,
    compiled by inductor as one graph (fullgraph), gives eager's loss and gradients."""
    torch.manual_seed(int(np.random.randint(1 << 30)))
    m = Beit(BeitArgs(size="base", depth=2, img_size=224, vocab_size=8192, kernels="triton", drop_path=0)).to(DEV)
    g = _seeded()
    x = torch.randn(8, 3, 224, 224, device=DEV, generator=g)
    mask = torch.rand(8, 14, 14, device=DEV, generator=g) < 0.38
    tgt = torch.randint(0, 8192, (8, 14, 14), device=DEV, generator=g)
    res = {}
    try:
        for name, fn in (("eager", m), ("compiled", torch.compile(m, fullgraph=True))):
            m.zero_grad()
            with torch.autocast(DEV, dtype=torch.bfloat16):
                o = fn(x, mask, tgt, max_masked=196)
            o["loss"].backward()
            res[name] = (o["loss"].detach().float(), {n: p.grad.float() for n, p in m.named_parameters()
                                                      if p.grad is not None})
    finally:
        torch._dynamo.reset()
    _close(res["compiled"][0], res["eager"][0], torch.bfloat16, "loss")
    for n, ref in res["eager"][1].items():
        if ref.norm() > 0:
            _close(res["compiled"][1][n], ref, torch.bfloat16, n)


@pytest.mark.skipif(DEV != "cuda", reason="the 'mixed' decoder needs a GPU")
@pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="DALI not installed")
def test_dali_gpu_decoder_matches_cpu(toy_root):
    """nvJPEG vs libjpeg-turbo: the same views differ only by decoder rounding."""
    from beitfast.data.images import BadImage, list_imagefolder, prepare_for_cache
    from beitfast.data.views import AugSpec, ViewRenderer, sample_views

    datas, views = [], []
    for i, rel in enumerate(list_imagefolder(toy_root)[0][:24]):
        try:  # upright RGB JPEG bytes, as the cache stores them
            data, hh, ww, _ = prepare_for_cache((toy_root / rel).read_bytes(), rel)
        except BadImage:
            continue
        datas.append(np.frombuffer(data, np.uint8))
        views.append(sample_views(0, i, hh, ww, 1, AugSpec())[0])
    views = np.stack(views)
    cpu = ViewRenderer(112, "lanczos", len(datas), device="cpu").render(datas, views)
    gpu = ViewRenderer(112, "lanczos", len(datas), device="gpu").render(datas, views).cpu()
    diff = (cpu.float() - gpu.float()).abs()
    assert diff.mean() < 2.0, f"mean |cpu - gpu| = {float(diff.mean()):.2f} grey levels"


def _dali_gpu_cfg(cache, *extra):
    from beitfast.config import load_config

    path, over = cache
    return load_config("tiny", [*over, f"data.cache={path}", "data.backend=dali", "data.batch_size=8",
                                "data.workers=0", "train.device=cuda", *extra])


@pytest.mark.skipif(DEV != "cuda", reason="the DALI GPU pipeline needs a GPU")
@pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="DALI not installed")
def test_dali_gpu_pipeline_matches_the_cpu_one(cache):
    """The same stored views through the GPU graph (nvJPEG 'mixed' decoder, GPU jitter and
    resize) and the CPU graph: equal tokens, masks and indices, images within decoder and
    resampler rounding; every output of the contract on the GPU but the index."""
    from beitfast.data.cache import TokenCache
    from beitfast.data.loader import build_loader

    cfg = _dali_gpu_cfg(cache)
    out = {}
    for dev in ("cuda", "cpu"):
        s = build_loader(cfg, TokenCache(cache[0]), device=dev).stream(0)
        out[dev] = [{k: v.clone() for k, v in next(s).items()} for _ in range(3)]
        s.close()
    for g, c in zip(out["cuda"], out["cpu"]):
        assert g["images"].is_cuda and g["tokens"].is_cuda and g["mask"].is_cuda and not g["index"].is_cuda
        for k in ("tokens", "mask", "index"):
            assert torch.equal(g[k].cpu(), c[k]), k
        mad = float((g["images"].float().cpu() - c["images"].float()).abs().mean()) * 255 * 0.226
        assert mad < 1.0, f"mean |gpu - cpu| = {mad:.2f} grey levels"


@pytest.mark.skipif(DEV != "cuda", reason="the DALI GPU pipeline needs a GPU")
@pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="DALI not installed")
def test_dali_gpu_batches_are_handed_over_in_stream_order(cache):
    """The hand-off is safe by construction: with torch's stream held up by a sleep kernel, a
    batch's copy is queued behind it while DALI works ahead and the batch's own reference is
    dropped; read twice (once behind the sleep, once after DALI made prefetch + 2 more batches),
    it equals the CPU graph's batch of the same views. Asking for batches makes no torch-level
    host synchronisation."""
    from beitfast.data.cache import TokenCache
    from beitfast.data.loader import build_loader

    cfg = _dali_gpu_cfg(cache, "data.prefetch=2")
    c = TokenCache(cache[0])
    s = build_loader(cfg, c, device="cpu").stream(0)
    want = {k: v.clone() for k, v in next(s).items()}
    s.close()
    s = build_loader(cfg, c, device="cuda").stream(0)
    try:
        torch.cuda._sleep(int(2e9))  # torch's stream busy: what the hand-off queues waits behind this
        b0 = next(s)
        first = b0["images"].float().clone()  # read 1, queued behind the sleep
        tokens = b0["tokens"].clone()
        del b0  # the batch's own reference gone: only the hand-off keeps DALI from reusing its buffer
        torch.cuda.set_sync_debug_mode("error")
        try:
            later = [next(s) for _ in range(cfg.data.prefetch + 2)]  # DALI may reuse freed buffers for these
            later[-1]["tokens"].sum()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        second = first.clone()  # read 2, after DALI worked ahead
        torch.cuda.synchronize()
        assert torch.equal(tokens.cpu(), want["tokens"])
        for got in (first, second):
            mad = float((got.cpu() - want["images"].float()).abs().mean()) * 255 * 0.226
            assert mad < 1.0, f"mean |handed over - cpu| = {mad:.2f} grey levels"
    finally:
        s.close()
