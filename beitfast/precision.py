"""`train.precision: auto` and the check of an explicit choice, for every trainer.

    auto   bf16 where the GPU computes it natively (compute capability 8.0 and up: A100, H100,
           ...), fp16 with the GradScaler below that (V100: no bf16 units), fp32 on a CPU
    bf16   refused on a GPU without native bf16 (it would be emulated, several times slower)
    fp16   autocast fp16 with the GradScaler (any device)
    fp32   no autocast

`resolve(choice, device)` returns (precision, why); the trainers write the resolved value into
the config before anything reads it, so config.yaml and the checkpoints record what ran.
"""
from __future__ import annotations

import torch

CHOICES = ("auto", "bf16", "fp16", "fp32")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a GPU of compute capability 8.0 and up."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def resolve(choice: str, device: torch.device | str, capability: tuple[int, int] | None = None) -> tuple[str, str]:
    """(precision, why) for train.precision=`choice` on `device`. `capability` stands in for the
    GPU's compute capability (tests). Raises ValueError naming the key for an impossible choice."""
    device = torch.device(device)
    if choice not in CHOICES:
        raise ValueError(f"train.precision must be one of {CHOICES}, got {choice!r}")
    cuda = device.type == "cuda"
    cc = capability if capability is not None else (torch.cuda.get_device_capability(device) if cuda else None)
    name = (torch.cuda.get_device_name(device) if cuda and capability is None else f"compute capability {cc}") \
        if cuda else "CPU"
    native = cuda and cc >= (8, 0)
    if choice == "auto":
        if not cuda:
            return "fp32", "auto: fp32 on the CPU"
        if native:
            return "bf16", f"auto: bf16, native on {name} (compute capability {cc[0]}.{cc[1]})"
        return "fp16", (f"auto: fp16 with the GradScaler, {name} (compute capability {cc[0]}.{cc[1]}) has no native "
                        f"bf16")
    if choice == "bf16" and cuda and not native:
        raise ValueError(f"train.precision=bf16: {name} (compute capability {cc[0]}.{cc[1]}) has no native bf16 "
                         f"(8.0 and up); use train.precision=auto (fp16 with the GradScaler there) or fp16")
    return choice, f"{choice}, as configured"


def amp_dtype(precision: str) -> torch.dtype:
    """The autocast dtype of a resolved precision (float32: no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
