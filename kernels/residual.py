"""Fused residual + layer scale + drop path: out = x + keep[b] / p * gamma * y.

x, y (B, N, D); gamma (D,); scale (B,) = drop-path keep flag / keep probability per sample
(all ones at inference). One Triton pass writes `out`; backward writes dy = dout * scale * gamma
and per-program partial sums of dgamma = sum(dout * scale * y), summed by torch; dx = dout.
`residual_ref` is the twin. `out` has the promoted dtype of x, y and gamma (an fp32 stream
plus a bf16 branch gives fp32, as torch's type promotion does in the twin); dy has y's dtype. Block size for D = 384..1024, not yet GPU-tuned.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

ROWS = 16


def _out_dtype(x, y, gamma) -> torch.dtype:
    return torch.promote_types(torch.promote_types(x.dtype, y.dtype), gamma.dtype)


def residual_ref(x, y, gamma, scale):
    """The twin: x + scale[:, None, None] * gamma * y, in the promoted dtype of x, y, gamma."""
    return (x + scale.float()[:, None, None] * (gamma * y)).to(_out_dtype(x, y, gamma))


if triton is not None:

    @triton.jit
    def _res_fwd(X, Y, G, S, OUT, N, D, BLOCK: tl.constexpr):
        row = tl.program_id(0)  # one (b, n) row of D
        cols = tl.arange(0, BLOCK)
        m = cols < D
        s = tl.load(S + row // N).to(tl.float32)
        x = tl.load(X + row * D + cols, mask=m, other=0.0).to(tl.float32)
        y = tl.load(Y + row * D + cols, mask=m, other=0.0).to(tl.float32)
        g = tl.load(G + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + row * D + cols, (x + s * g * y).to(OUT.dtype.element_ty), mask=m)

    @triton.jit
    def _res_bwd(DOUT, Y, G, S, DY, DG, M, N, D, ROWS_: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < D
        g = tl.load(G + cols, mask=m, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for r in range(0, ROWS_):
            row = pid * ROWS_ + r
            if row < M:
                s = tl.load(S + row // N).to(tl.float32)
                do = tl.load(DOUT + row * D + cols, mask=m, other=0.0).to(tl.float32)
                y = tl.load(Y + row * D + cols, mask=m, other=0.0).to(tl.float32)
                tl.store(DY + row * D + cols, (do * s * g).to(DY.dtype.element_ty), mask=m)
                acc += do * s * y
        tl.store(DG + pid * D + cols, acc, mask=m)

    # torch custom ops (see layernorm.py): one opaque call each under torch.compile

    @torch.library.custom_op("beitfast::residual_fwd", mutates_args=())
    def _res_fwd_op(x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        out = torch.empty_like(x, dtype=_out_dtype(x, y, gamma))
        _res_fwd[(b * n,)](x, y, gamma, scale, out, n, d, BLOCK=triton.next_power_of_2(d))
        return out

    @_res_fwd_op.register_fake
    def _(x, y, gamma, scale):
        return torch.empty_like(x, dtype=_out_dtype(x, y, gamma))

    @torch.library.custom_op("beitfast::residual_bwd", mutates_args=())
    def _res_bwd_op(dout: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, scale: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, d = y.shape
        dy = torch.empty_like(y)
        progs = triton.cdiv(b * n, ROWS)
        dg = torch.empty(progs, d, device=y.device, dtype=torch.float32)
        _res_bwd[(progs,)](dout, y, gamma, scale, dy, dg, b * n, n, d, ROWS_=ROWS, BLOCK=triton.next_power_of_2(d))
        return dy, dg.sum(0).to(gamma.dtype)

    @_res_bwd_op.register_fake
    def _(dout, y, gamma, scale):
        return torch.empty_like(y), torch.empty_like(gamma)

    def _res_setup(ctx, inputs, output):
        x, y, gamma, scale = inputs
        ctx.save_for_backward(y, gamma, scale)
        ctx.x_dtype = x.dtype

    def _res_backward(ctx, dout):
        y, gamma, scale = ctx.saved_tensors
        dy, dg = _res_bwd_op(dout.contiguous(), y, gamma, scale)
        return dout.to(ctx.x_dtype), dy, dg, None

    _res_fwd_op.register_autograd(_res_backward, setup_context=_res_setup)


def residual_triton(x, y, gamma, scale):
    """x + scale[b] * gamma * y, (B, N, D), in one Triton pass (and one for backward)."""
    assert x.shape == y.shape and x.ndim == 3 and gamma.shape == (x.shape[-1],) and scale.shape == (x.shape[0],), \
        (x.shape, y.shape, gamma.shape, scale.shape)
    return _res_fwd_op(x.contiguous(), y.contiguous(), gamma, scale.contiguous().float())
