"""Each Triton kernel against its PyTorch twin on fresh random inputs (Triton's interpreter on
CPU: TRITON_INTERPRET=1, set in conftest), forward and backward; and the dispatch rules."""
import os

import pytest
import torch

import kernels as K
from kernels.masked_head import masked_head_fused, masked_index

pytestmark = pytest.mark.skipif(not K.HAVE_TRITON, reason="triton not installed")


def _grads(fn, inputs, dout):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(dout)
    return [out.detach()] + [t.grad.clone() for t in inputs]


@pytest.mark.parametrize("m,n", [(1, 16), (7, 48), (33, 100), (40, 192)])
def test_layer_norm(m, n):
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    x = (torch.randn(m, n, generator=g) * 3 + 1).requires_grad_()
    w = torch.randn(n, generator=g).requires_grad_()
    b = torch.randn(n, generator=g).requires_grad_()
    dy = torch.randn(m, n, generator=g)
    fast = _grads(lambda *a: K.layer_norm(*a, eps=1e-6, impl="triton"), [x, w, b], dy)
    slow = _grads(lambda *a: K.layer_norm(*a, eps=1e-6, impl="torch"), [x, w, b], dy)
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-5)


def test_layer_norm_3d_input():
    x = torch.randn(2, 5, 24, requires_grad=True)
    w, b = torch.randn(24, requires_grad=True), torch.randn(24, requires_grad=True)
    fast = _grads(lambda *a: K.layer_norm(*a, impl="triton"), [x, w, b], torch.ones(2, 5, 24))
    slow = _grads(lambda *a: K.layer_norm(*a, impl="torch"), [x, w, b], torch.ones(2, 5, 24))
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_mixed_dtypes_follow_the_residual_policy(half):
    """fp32 stream in, bf16 / fp16 branch (fp16: the V100's precision): LayerNorm under autocast
    writes the branch dtype (dx stays fp32), the residual add writes fp32 (dy stays in the branch
    dtype); Triton and the twins agree on dtypes and values."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    x = torch.randn(2, 9, 48, generator=g).requires_grad_()
    y = torch.randn(2, 9, 48, generator=g).to(half).requires_grad_()
    w, b = torch.randn(48, generator=g).requires_grad_(), torch.randn(48, generator=g).requires_grad_()
    gamma = torch.full((48,), 1e-5).requires_grad_()
    scale = torch.tensor([1.25, 0.0])
    res = {}
    for impl in ("torch", "triton"):
        with torch.autocast("cpu", dtype=half):
            ln = K.layer_norm(x, w, b, 1e-6, impl)
        out = K.residual_add(x, y, gamma, scale, impl)
        assert ln.dtype == half and out.dtype == torch.float32, impl
        for t in (x, y, w, b, gamma):
            t.grad = None
        (ln.float().square().sum() + (out * torch.linspace(-1, 1, 48)).sum()).backward()
        assert x.grad.dtype == torch.float32 and y.grad.dtype == half
        res[impl] = [ln.detach().float(), out.detach(), x.grad, y.grad.float(), w.grad, b.grad, gamma.grad]
    for what, f, s in zip(("ln", "out", "dx", "dy", "dw", "db", "dgamma"), res["triton"], res["torch"]):
        err = float((f - s).norm() / s.norm())  # half outputs may differ by one unit in the last place
        assert err < 1e-2, (what, err)
    # 1e-5 * y is far below bf16's resolution of x: only an fp32 output keeps it
    assert (res["torch"][1][0] != x.detach()[0]).float().mean() > 0.9  # sample 1 is dropped (scale 0)


@pytest.mark.parametrize("b,n,d", [(1, 1, 8), (3, 5, 24), (4, 17, 96)])
def test_residual(b, n, d):
    x, y = torch.randn(b, n, d, requires_grad=True), torch.randn(b, n, d, requires_grad=True)
    gamma = torch.randn(d, requires_grad=True)
    scale = (torch.rand(b) < 0.7).float() / 0.7  # drop path with keep 0.7
    dout = torch.randn(b, n, d)
    fast = _grads(lambda *a: K.residual_add(*a, scale, impl="triton"), [x, y, gamma], dout)
    slow = _grads(lambda *a: K.residual_add(*a, scale, impl="torch"), [x, y, gamma], dout)
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("chunk", [3, 4096])
@pytest.mark.parametrize("pad", [None, 0, 5])
def test_masked_head(use_triton, chunk, pad):
    """Fused head (dynamic, or padded to max_rows = n + pad) equals the plain twin, fwd and bwd."""
    b, n, d, v = 3, 11, 16, 70
    h = torch.randn(b, n, d, requires_grad=True)
    w, bias = (torch.randn(v, d) * 0.3).requires_grad_(), torch.randn(v).requires_grad_()
    mask = torch.rand(b, n) < 0.45
    mask[0, 0] = True
    tgt = torch.randint(0, v, (b, n))
    tgt[mask] = torch.randint(0, v, (int(mask.sum()),))
    max_rows = None if pad is None else int(mask.sum()) + pad
    res = {}
    for name, fn in (("fast", lambda: masked_head_fused(h, mask, w, bias, tgt, use_triton=use_triton, chunk=chunk,
                                                        max_rows=max_rows)),
                     ("ref", lambda: K.masked_head(h, mask, w, bias, tgt, impl="torch")),
                     ("ref_static", lambda: K.masked_head(h, mask, w, bias, tgt, impl="torch", max_rows=max_rows))):
        for t in (h, w, bias):
            t.grad = None
        loss, correct, cnt = fn()
        (loss * 1.7).backward()
        res[name] = (loss.detach(), correct, cnt, h.grad.clone(), w.grad.clone(), bias.grad.clone())
    for name in ("fast", "ref_static"):
        assert int(res[name][1]) == int(res["ref"][1]) and int(res[name][2]) == int(mask.sum())
        for f, s in zip(res[name][3:] + res[name][:1], res["ref"][3:] + res["ref"][:1]):
            torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_masked_head_in_half_precision(half):
    """The head as the model calls it under autocast (h in the branch dtype, fp32 weights): the
    Triton head against the twin, loss and gradients, in bf16 and fp16 (the V100's)."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    b, n, d, v = 2, 13, 32, 96
    h = torch.randn(b, n, d, generator=g).to(half).requires_grad_()
    w, bias = (torch.randn(v, d, generator=g) * 0.2).requires_grad_(), torch.randn(v, generator=g).requires_grad_()
    mask = torch.rand(b, n, generator=g) < 0.5
    tgt = torch.randint(0, v, (b, n), generator=g)
    res = {}
    for impl in ("triton", "torch"):
        for t in (h, w, bias):
            t.grad = None
        with torch.autocast("cpu", dtype=half):
            loss, correct, cnt = K.masked_head(h, mask, w, bias, tgt, impl=impl, max_rows=int(mask.sum()) + 3)
        loss.backward()
        assert h.grad.dtype == half
        res[impl] = (loss.detach().float(), h.grad.float(), w.grad.float(), bias.grad.float())
    for what, f, s in zip(("loss", "dh", "dw", "db"), res["triton"], res["torch"]):
        err = float((f - s).norm() / s.norm())
        assert err < 2e-2, (what, half, err)


@pytest.mark.parametrize("max_rows", [None, 6])
def test_masked_head_no_masked_rows(max_rows):
    h = torch.randn(2, 4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    loss, correct, n = K.masked_head(h, torch.zeros(2, 4, dtype=torch.bool), w, torch.zeros(10), torch.zeros(2, 4,
                                     dtype=torch.long), impl="triton", max_rows=max_rows)
    loss.backward()
    assert float(loss) == 0 and int(n) == 0 and int(correct) == 0 and h.grad.abs().sum() == 0


def test_masked_index_static_order_and_overflow():
    mask = torch.rand(4, 13) < 0.3
    idx, valid, n = masked_index(mask, 30)
    assert idx.shape == (30,) and int(valid.sum()) == int(n) == int(mask.sum())
    assert torch.equal(idx[valid], mask.reshape(-1).nonzero()[:, 0])
    with pytest.raises(RuntimeError, match="more masked positions than max_rows"):
        masked_index(torch.ones(2, 5, dtype=torch.bool), 9)


@pytest.mark.parametrize("head", ["ref", "fused"])
@pytest.mark.parametrize("static", [True, False])
def test_masked_head_static_shapes_need_no_host_sync(head, static):
    """Under FakeTensorMode no tensor has data: any op whose output size depends on values
    (the boolean gather, nonzero) or that reads a value on the host raises. With max_rows
    the head's forward and backward run; without it they cannot (the control)."""
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode

    from kernels.masked_head import masked_head_ref
    fn = {"ref": masked_head_ref, "fused": lambda *a, **k: masked_head_fused(*a, use_triton=False, chunk=7, **k)}[head]
    with FakeTensorMode():
        h = torch.randn(3, 11, 8, requires_grad=True)
        w, bias = torch.randn(10, 8, requires_grad=True), torch.randn(10, requires_grad=True)
        mask, tgt = torch.rand(3, 11) < 0.4, torch.randint(0, 10, (3, 11))
        if not static:
            with pytest.raises(DynamicOutputShapeException):
                fn(h, mask, w, bias, tgt)
            return
        loss, correct, n = fn(h, mask, w, bias, tgt, max_rows=20)
        loss.backward()
        assert h.grad.shape == h.shape and w.grad.shape == w.shape


def test_dispatch_rules(monkeypatch):
    t = torch.zeros(2, 4)
    assert K.resolve("layer_norm", "auto", t) == "torch"  # a CPU tensor
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert K.resolve("layer_norm", "triton", t) == "triton"  # interpreter on
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="CUDA device or TRITON_INTERPRET"):
        K.resolve("residual", "triton", t)
    if not K.HAVE_APEX:
        with pytest.raises(RuntimeError, match="Apex"):
            K.resolve("layer_norm", "apex", t)
    with pytest.raises(ValueError, match="impl"):
        K.resolve("layer_norm", "cuda", t)
    assert os.environ.get("TRITON_INTERPRET") is None


def test_custom_ops_pass_opcheck():
    """Each kernel is a torch custom op: schema, autograd registration, fake (shape) functions
    and AOT dispatch checked by torch.library.opcheck against the real kernels."""
    import importlib

    L, R, H = (importlib.import_module(f"kernels.{m}") for m in ("layernorm", "residual", "masked_head"))
    x, w, b = torch.randn(6, 16, requires_grad=True), torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)
    cases = [(L._ln_fwd_op, (x, w, b, 1e-6, torch.float32)), (L._ln_fwd_op, (x, w, b, 1e-6, torch.bfloat16)),
             (R._res_fwd_op, (torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 3, 16, requires_grad=True),
                              torch.randn(16, requires_grad=True), torch.tensor([1.0, 0.0])))]
    valid = torch.tensor([1, 1, 1, 0, 0]).bool()
    for use_triton in (True, False):
        cases.append((H._head_op, (torch.randn(5, 16, requires_grad=True), torch.randint(0, 20, (5,)), valid.float() / 3,
                                   valid, torch.randn(20, 16, requires_grad=True), torch.randn(20, requires_grad=True),
                                   use_triton, 2)))
    for op, args in cases:
        report = torch.library.opcheck(op, args)
        assert set(report.values()) == {"SUCCESS"}, (op, report)
