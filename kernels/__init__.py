"""Fused kernels with PyTorch twins, and the per-kernel choice of implementation.

Each op takes `impl`: "triton" (our kernels; on CUDA tensors, or anywhere under
TRITON_INTERPRET=1), "torch" (the twin), "apex" (NVIDIA Apex's FusedLayerNorm for the
LayerNorm; Apex has no residual or masked-head op, so those run our Triton kernels) or
"auto": Apex LayerNorm when installed on CUDA, Triton on CUDA, else torch. `policy(impl,
device)` resolves a choice for every op at start-up and refuses an impossible one.

Residual-dtype policy (the reference's, under autocast): the residual stream stays fp32 and
the branches compute in the autocast dtype. LayerNorm reads the fp32 stream and writes the
branch's compute dtype (`compute_dtype`: what the next Linear would cast to anyway); the
residual add reads the fp32 stream and a bf16/fp16 branch and writes fp32 (the fp32 layer
scale promotes it). A bf16 stream would lose BEiT-L's 1e-5 * branch updates entirely.
This package imports no project code.
"""
from __future__ import annotations

import os

import torch

from kernels.layernorm import layer_norm_ref, layer_norm_triton
from kernels.masked_head import masked_head_fused, masked_head_ref
from kernels.residual import residual_ref, residual_triton

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False
try:
    from apex.normalization import FusedLayerNorm as _ApexLN  # noqa: F401
    from apex.normalization.fused_layer_norm import fused_layer_norm_affine as _apex_ln

    HAVE_APEX = True
except ImportError:
    HAVE_APEX = False

IMPLS = ("auto", "apex", "triton", "torch")
OPS = ("layer_norm", "residual", "masked_head")


def _triton_ok(cuda: bool) -> bool:
    return HAVE_TRITON and (cuda or os.environ.get("TRITON_INTERPRET") == "1")


def _resolve(op: str, impl: str, cuda: bool) -> str:
    if impl not in IMPLS:
        raise ValueError(f"kernel impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if op == "layer_norm" and HAVE_APEX and cuda:
            return "apex"
        return "triton" if (HAVE_TRITON and cuda) else "torch"
    if impl == "apex":
        if not (HAVE_APEX and cuda):
            raise RuntimeError(f"'apex' needs NVIDIA Apex on a CUDA device (Apex installed: {HAVE_APEX}, "
                               f"CUDA: {cuda}); 'auto' uses it when it is there")
        if op != "layer_norm":  # Apex has no such op: ours
            impl = "triton"
    if impl == "triton" and not _triton_ok(cuda):
        raise RuntimeError(f"Triton {op} needs a CUDA device or TRITON_INTERPRET=1 (triton installed: {HAVE_TRITON})")
    return impl


def resolve(op: str, impl: str, t: torch.Tensor) -> str:
    """The implementation `impl` means for op on tensor t; refuses impossible requests."""
    return _resolve(op, impl, t.is_cuda)


def policy(impl: str, device: torch.device | str) -> dict[str, str]:
    """What `impl` resolves to for every op on `device` (start-up check: raises RuntimeError
    saying why when a choice cannot work there)."""
    cuda = torch.device(device).type == "cuda"
    return {op: _resolve(op, impl, cuda) for op in OPS}


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a residual branch computes in: autocast's for x's device when it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def layer_norm(x, weight, bias, eps: float = 1e-6, impl: str = "auto"):
    """LayerNorm of the (fp32) residual stream, written in the branch's compute dtype."""
    r = resolve("layer_norm", impl, x)
    out_dtype = compute_dtype(x)
    if r == "apex":
        return _apex_ln(x, weight, bias, weight.shape, eps).to(out_dtype)
    if r == "triton":
        return layer_norm_triton(x, weight, bias, eps, out_dtype)
    return layer_norm_ref(x, weight, bias, eps).to(out_dtype)


def residual_add(x, y, gamma, scale, impl: str = "auto"):
    """x + scale[b] * gamma * y (layer scale and drop path fused into the residual add), in the
    promoted dtype of x, y and gamma: fp32 for an fp32 stream and a bf16 branch."""
    if gamma is None:
        gamma = torch.ones(x.shape[-1], device=x.device, dtype=x.dtype)
    if resolve("residual", impl, x) == "triton":
        return residual_triton(x, y, gamma, scale)
    return residual_ref(x, y, gamma, scale)


def masked_head(h, mask, weight, bias, targets, impl: str = "auto", max_rows: int | None = None):
    """(loss, correct, n_masked) of the LM head on masked rows, without full logits kept.
    max_rows: an upper bound on mask.sum(); given, no step reads a device value on the host."""
    r = resolve("masked_head", impl, h)
    if r == "torch":
        return masked_head_ref(h, mask, weight, bias, targets, max_rows)
    return masked_head_fused(h, mask, weight, bias, targets, use_triton=True, max_rows=max_rows)
