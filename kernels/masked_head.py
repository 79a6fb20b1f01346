"""Fused masked-token head: gather the masked rows, LM head, cross-entropy and MIM accuracy,
without keeping the (rows x vocab) logits for backward.

`masked_head(h, mask, weight, bias, targets)`: h (B, N, D) final-normed patch tokens, mask
(B, N) bool, weight (V, D), bias (V,), targets (B, N) long. Returns (mean loss over masked
rows, number of correct argmax predictions, number of masked rows) - counts as tensors, so
no host sync. With no masked rows the loss is 0 (still connected to the graph).

Fused path (the technique of chunked "fused linear cross-entropy"): the masked rows are
processed in chunks of CHUNK rows; per chunk, logits = rows @ W^T + b (one cuBLAS matmul),
then ONE Triton kernel per row computes the log-sum-exp, the loss, the argmax and
overwrites the logits in place with d loss / d logits; the chunk's gradients for rows, W
and b are accumulated right away. Only a chunk of logits is alive at any time; backward
just scales the stored gradients by the incoming scalar. `masked_head_ref` is the twin
(plain gather, linear, cross_entropy). Block size chosen for V = 8192 (not yet GPU-tuned).

Static shapes (`max_rows`): a boolean gather `h[mask]` has a data-dependent size, so the host
waits for the GPU every step to learn it. Given an upper bound on the masked rows (the mask
budget times the batch: the generator never exceeds it), the rows are gathered into a fixed
(max_rows, D) buffer by a cumulative-sum scatter, the unused slots carry zero weight, and
nothing in forward or backward reads a device value on the host (a mask over the bound is
caught by a device-side assert). Padding costs max_rows - n extra rows: 0.7% at 14x14 / 75.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

CHUNK = 4096  # masked rows per chunk: 4096 x 8192 fp32 logits = 128 MiB


def masked_index(mask, max_rows: int | None = None):
    """(idx, valid, n) for the flattened masked positions: idx the flat indices in order, valid
    which slots hold one, n the count (a device tensor). Without max_rows, idx has exactly n
    entries (one host sync); with it, max_rows entries, unused slots pointing at 0 with valid
    False, and no host sync."""
    flat = mask.reshape(-1)
    n = flat.sum()
    if max_rows is None:
        idx = flat.nonzero()[:, 0]
        return idx, torch.ones_like(idx, dtype=torch.bool), n
    torch._assert_async(n <= max_rows, "masked_head: more masked positions than max_rows")
    dest = torch.where(flat, (torch.cumsum(flat, 0) - 1).clamp(max=max_rows), max_rows)  # rest -> spare slot
    idx = torch.zeros(max_rows + 1, dtype=torch.long, device=flat.device)
    idx.scatter_(0, dest, torch.arange(flat.numel(), device=flat.device))
    return idx[:max_rows], torch.arange(max_rows, device=flat.device) < n, n


def masked_head_ref(h, mask, weight, bias, targets, max_rows: int | None = None):
    """The twin: gather, linear, cross-entropy, argmax (padded to max_rows when given)."""
    if max_rows is not None:
        idx, valid, n = masked_index(mask, max_rows)
        logits = F.linear(h.reshape(-1, h.shape[-1])[idx], weight, bias).float()
        tgt = targets.reshape(-1)[idx]
        loss = (F.cross_entropy(logits, tgt, reduction="none") * valid).sum() / n.clamp(min=1)
        return loss, ((logits.argmax(-1) == tgt) & valid).sum(), n
    rows = h[mask]
    tgt = targets[mask]
    n = mask.sum()
    if rows.shape[0] == 0:
        return h.sum() * 0.0, n * 0, n
    logits = F.linear(rows, weight, bias).float()
    loss = F.cross_entropy(logits, tgt)
    correct = (logits.argmax(-1) == tgt).sum()
    return loss, correct, n


if triton is not None:

    @triton.jit
    def _ce_fwd_bwd(LOGITS, TGT, WROW, LOSS, CORRECT, V: tl.constexpr, stride, BLOCK: tl.constexpr):
        """Per row: loss = lse - logit[t]; correct = (argmax == t); logits <- (softmax - onehot) * w_row.
        V (the vocabulary) is a compile-time constant: one compilation a run, and Triton 3.4's
        interpreter cannot loop to a run-time bound under numpy 2 (the compatibility run)."""
        row = tl.program_id(0)
        base = LOGITS + row * stride
        t = tl.load(TGT + row)
        w_row = tl.load(WROW + row)
        # pass 1: running max, sum of exp, argmax
        m = -float("inf")
        s = 0.0
        best = -float("inf")
        best_i = 0
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
            bm = tl.max(x, axis=0)
            bi = tl.argmax(x, axis=0) + start
            if bm > best:
                best = bm
                best_i = bi
            new_m = tl.maximum(m, bm)
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
            m = new_m
        lse = m + tl.log(s)
        xt = tl.load(base + t).to(tl.float32)
        tl.store(LOSS + row, lse - xt)
        tl.store(CORRECT + row, (best_i == t).to(tl.int32))
        # pass 2: gradient in place
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(cols == t, 1.0, 0.0)
            tl.store(base + cols, (g * w_row).to(LOGITS.dtype.element_ty), mask=cols < V)


def _ce_rows_triton(logits, tgt, w_row):
    r, v = logits.shape
    loss = torch.empty(r, device=logits.device, dtype=torch.float32)
    correct = torch.empty(r, device=logits.device, dtype=torch.int32)
    _ce_fwd_bwd[(r,)](logits, tgt, w_row, loss, correct, v, logits.stride(0), BLOCK=min(4096, triton.next_power_of_2(v)))
    return loss, correct


def _ce_rows_torch(logits, tgt, w_row):
    """The same contract as the kernel, in torch (for the chunked path without Triton)."""
    lf = logits.float()
    lse = torch.logsumexp(lf, -1)
    loss = lse - lf.gather(1, tgt[:, None])[:, 0]
    correct = (lf.argmax(-1) == tgt).int()
    g = torch.softmax(lf, -1)
    g[torch.arange(len(tgt), device=lf.device), tgt] -= 1
    logits.copy_(g * w_row[:, None])
    return loss, correct


@torch.library.custom_op("beitfast::masked_head_fwd", mutates_args=())
def _head_op(rows: torch.Tensor, tgt: torch.Tensor, w_row: torch.Tensor, valid: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor, use_triton: bool, chunk: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, correct, d_rows, d_weight, d_bias) of the gathered rows; a torch custom op, so
    torch.compile calls it as one opaque op (its chunk loop and kernels run as written)."""
    d_rows = torch.empty_like(rows)
    d_w = torch.zeros_like(weight, dtype=torch.float32)
    d_b = torch.zeros_like(bias, dtype=torch.float32)
    loss = torch.zeros((), device=rows.device, dtype=torch.float32)
    correct = torch.zeros((), device=rows.device, dtype=torch.int64)
    ce = _ce_rows_triton if use_triton else _ce_rows_torch
    for s in range(0, rows.shape[0], chunk):
        r = rows[s:s + chunk]
        logits = torch.addmm(bias.to(r.dtype), r, weight.t().to(r.dtype))  # (c, V)
        if logits.dtype != torch.float32:
            logits = logits.float()
        l, c = ce(logits, tgt[s:s + chunk].contiguous(), w_row[s:s + chunk].contiguous())
        loss += (l * w_row[s:s + chunk]).sum()
        correct += (c.bool() & valid[s:s + chunk]).sum()
        g = logits.to(r.dtype)  # now d loss / d logits (zero on padding rows)
        d_rows[s:s + chunk] = g @ weight.to(r.dtype)
        d_w += (g.t() @ r).float()
        d_b += g.float().sum(0)
    return loss, correct, d_rows, d_w, d_b


@_head_op.register_fake
def _(rows, tgt, w_row, valid, weight, bias, use_triton, chunk):
    f32 = torch.float32
    return (rows.new_empty((), dtype=f32), rows.new_empty((), dtype=torch.int64), torch.empty_like(rows),
            weight.new_empty(weight.shape, dtype=f32), bias.new_empty(bias.shape, dtype=f32))


def _head_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[2:])
    ctx.dtypes = (inputs[0].dtype, inputs[4].dtype, inputs[5].dtype)


def _head_backward(ctx, g_loss, *_unused):
    """Backward only scales the gradients the forward already computed."""
    d_rows, d_w, d_b = ctx.saved_tensors
    rows_dt, w_dt, b_dt = ctx.dtypes
    return ((d_rows * g_loss).to(rows_dt), None, None, None, (d_w * g_loss).to(w_dt), (d_b * g_loss).to(b_dt),
            None, None)


_head_op.register_autograd(_head_backward, setup_context=_head_setup)


def masked_head_fused(h, mask, weight, bias, targets, use_triton: bool = True, chunk: int = CHUNK,
                      max_rows: int | None = None):
    """Chunked fused head; max_rows (an upper bound on the masked rows) makes it sync-free.
    The gather is plain torch (its backward scatters the row gradients back into h; padding
    slots point at row 0 with zero gradient, so they add nothing)."""
    idx, valid, n = masked_index(mask, max_rows)
    rows = h.reshape(-1, h.shape[-1]).index_select(0, idx)  # (M, D)
    tgt = targets.reshape(-1).index_select(0, idx)
    w_row = valid.float() / n.clamp(min=1)  # loss weight per row: 1/n, 0 on padding
    loss, correct, _, _, _ = _head_op(rows, tgt, w_row, valid, weight, bias, bool(use_triton and triton is not None),
                                      int(chunk))
    return loss, correct, n
