"""Fused LayerNorm, forward and backward, in Triton; `layer_norm_ref` is its twin.

Fuses: mean, variance, normalisation and affine in one pass per row (forward); dx and the
per-program partial sums of dweight/dbias in one pass (backward), the partials summed by
torch. Shapes: x (M, N) rows, weight/bias (N,). One program handles ROWS rows, so the
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


class TritonLayerNorm(torch.autograd.Function):
    """LayerNorm over the last dim via the Triton kernels above (any leading shape)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        m, n = x2.shape
        assert weight.shape == (n,) and bias.shape == (n,), (weight.shape, bias.shape, n)
        y = torch.empty_like(x2)
        mean = torch.empty(m, device=x.device, dtype=torch.float32)
        rstd = torch.empty(m, device=x.device, dtype=torch.float32)
        block = triton.next_power_of_2(n)
        _ln_fwd[(m,)](x2, weight, bias, y, mean, rstd, n, eps, BLOCK=block)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.shape = shape
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = dy.reshape(m, n).contiguous()
        dx = torch.empty_like(x2)
        progs = triton.cdiv(m, ROWS)
        dw = torch.empty(progs, n, device=x2.device, dtype=torch.float32)
        db = torch.empty(progs, n, device=x2.device, dtype=torch.float32)
        _ln_bwd[(progs,)](x2, weight, dy2, dx, mean, rstd, dw, db, m, n, ROWS_=ROWS, BLOCK=triton.next_power_of_2(n))
        return dx.reshape(ctx.shape), dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype), None


def layer_norm_triton(x, weight, bias, eps):
    return TritonLayerNorm.apply(x, weight, bias, eps)
