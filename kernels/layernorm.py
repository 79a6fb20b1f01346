"""Fused LayerNorm, forward and backward, in Triton; `layer_norm_ref` is its twin.

Fuses: mean, variance, normalisation and affine in one pass per row (forward); dx and the
per-program partial sums of dweight/dbias in one pass (backward), the partials summed by
torch. Shapes: x (M, N) rows, weight/bias (N,). The output may have another dtype than x
(out_dtype: the fp32 residual stream in, the bf16 branch input out); dx has x's dtype. One program handles ROWS rows, so the
partial buffers are (ceil(M / ROWS), N). Constants chosen for BEiT widths (N = 384..1024)
by reasoning, not yet tuned on a GPU (no GPU was available when written).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional; dispatch falls back to torch
    triton = None

ROWS = 16  # rows per backward program


def layer_norm_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The twin: torch's LayerNorm over the last dimension."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


if triton is not None:

    @triton.jit
    def _ln_fwd(X, W, B, Y, Mean, Rstd, N, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        x = tl.load(X + row * N + cols, mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(m, x - mean, 0.0)
        var = tl.sum(xc * xc, axis=0) / N
        rstd = 1.0 / tl.sqrt(var + eps)
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * N + cols, (xc * rstd * w + b).to(Y.dtype.element_ty), mask=m)
        tl.store(Mean + row, mean)
        tl.store(Rstd + row, rstd)

    @triton.jit
    def _ln_bwd(X, W, DY, DX, Mean, Rstd, DW, DB, M, N, ROWS_: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        db = tl.zeros([BLOCK], dtype=tl.float32)
        for r in range(0, ROWS_):
            row = pid * ROWS_ + r
            if row < M:
                x = tl.load(X + row * N + cols, mask=m, other=0.0).to(tl.float32)
                dy = tl.load(DY + row * N + cols, mask=m, other=0.0).to(tl.float32)
                mean = tl.load(Mean + row)
                rstd = tl.load(Rstd + row)
                xhat = tl.where(m, (x - mean) * rstd, 0.0)
                wdy = w * dy
                c1 = tl.sum(xhat * wdy, axis=0) / N
                c2 = tl.sum(wdy, axis=0) / N
                dx = (wdy - (xhat * c1 + c2)) * rstd
                tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=m)
                dw += dy * xhat
                db += dy
        tl.store(DW + pid * N + cols, dw, mask=m)
        tl.store(DB + pid * N + cols, db, mask=m)

    # Registered as torch custom ops (forward, backward, and their shapes for tracing), so
    # torch.compile treats each kernel as one opaque call inside a single graph instead of
    # tracing into Triton's launcher.

    @torch.library.custom_op("beitfast::layer_norm_fwd", mutates_args=())
    def _ln_fwd_op(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, out_dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, n = x2.shape
        y = torch.empty_like(x2, dtype=out_dtype)
        mean = torch.empty(m, device=x2.device, dtype=torch.float32)
        rstd = torch.empty(m, device=x2.device, dtype=torch.float32)
        _ln_fwd[(m,)](x2, weight, bias, y, mean, rstd, n, eps, BLOCK=triton.next_power_of_2(n))
        return y, mean, rstd

    @_ln_fwd_op.register_fake
    def _(x2, weight, bias, eps, out_dtype):
        m = x2.shape[0]
        return torch.empty_like(x2, dtype=out_dtype), x2.new_empty(m, dtype=torch.float32), x2.new_empty(m, dtype=torch.float32)

    @torch.library.custom_op("beitfast::layer_norm_bwd", mutates_args=())
    def _ln_bwd_op(x2: torch.Tensor, weight: torch.Tensor, dy2: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m, n = x2.shape
        dx = torch.empty_like(x2)
        progs = triton.cdiv(m, ROWS)
        dw = torch.empty(progs, n, device=x2.device, dtype=torch.float32)
        db = torch.empty(progs, n, device=x2.device, dtype=torch.float32)
        _ln_bwd[(progs,)](x2, weight, dy2, dx, mean, rstd, dw, db, m, n, ROWS_=ROWS, BLOCK=triton.next_power_of_2(n))
        return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)

    @_ln_bwd_op.register_fake
    def _(x2, weight, dy2, mean, rstd):
        return torch.empty_like(x2), torch.empty_like(weight), torch.empty_like(weight)

    def _ln_setup(ctx, inputs, output):
        x2, weight, _bias, _eps, _dtype = inputs
        _y, mean, rstd = output
        ctx.save_for_backward(x2, weight, mean, rstd)

    def _ln_backward(ctx, dy, _dmean, _drstd):
        x2, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _ln_bwd_op(x2, weight, dy.contiguous(), mean, rstd)
        return dx, dw, db, None, None

    _ln_fwd_op.register_autograd(_ln_backward, setup_context=_ln_setup)


def layer_norm_triton(x, weight, bias, eps, out_dtype: torch.dtype | None = None):
    """LayerNorm over the last dim via the Triton kernels above (any leading shape), written
    in out_dtype (default x's)."""
    shape = x.shape
    assert weight.shape == (shape[-1],) and bias.shape == (shape[-1],), (weight.shape, bias.shape, shape)
    y, _, _ = _ln_fwd_op(x.reshape(-1, shape[-1]).contiguous(), weight, bias, float(eps), out_dtype or x.dtype)
    return y.reshape(shape)
