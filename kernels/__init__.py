"""Fused kernels with PyTorch twins, and the per-kernel choice of implementation.

Each op takes `impl`: "apex" (NVIDIA Apex, where it has the op and is installed), "triton"
(our kernels; on CUDA tensors, or anywhere under TRITON_INTERPRET=1), "torch" (the twin) or
"auto": Apex -> Triton on CUDA -> torch. This package imports no project code.
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


def _triton_ok(t: torch.Tensor) -> bool:
    return HAVE_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def resolve(op: str, impl: str, t: torch.Tensor) -> str:
    """The implementation `impl` means for op on tensor t; refuses impossible requests."""
    if impl not in IMPLS:
        raise ValueError(f"kernel impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        if op == "layer_norm" and HAVE_APEX and t.is_cuda:
            return "apex"
        return "triton" if (HAVE_TRITON and t.is_cuda) else "torch"
    if impl == "apex" and not (op == "layer_norm" and HAVE_APEX and t.is_cuda):
        raise RuntimeError(f"Apex has no usable {op} here (installed: {HAVE_APEX}, cuda tensor: {t.is_cuda})")
    if impl == "triton" and not _triton_ok(t):
        raise RuntimeError(f"Triton {op} needs a CUDA tensor or TRITON_INTERPRET=1 (triton installed: {HAVE_TRITON})")
    return impl


def layer_norm(x, weight, bias, eps: float = 1e-6, impl: str = "auto"):
    r = resolve("layer_norm", impl, x)
    if r == "apex":
        return _apex_ln(x, weight, bias, weight.shape, eps)
    if r == "triton":
        return layer_norm_triton(x, weight, bias, eps)
    return layer_norm_ref(x, weight, bias, eps)


def residual_add(x, y, gamma, scale, impl: str = "auto"):
    """x + scale[b] * gamma * y (layer scale and drop path fused into the residual add)."""
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
