"""The one tokenizer interface: images in, a (B, h, w) grid of token ids out."""
from __future__ import annotations

import hashlib
from contextlib import nullcontext

import torch
from torch import nn


def weights_checksum(module: nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes) in sorted key order: the
    identity of a tokenizer's weights, recorded by the token cache."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


PRECISIONS = ("fp32", "bf16")


class Tokenizer:
    """Wraps an encoder network that maps preprocessed (B, 3, S, S) floats to (B, K, h, w)
    logits. Subclasses set `kind` and implement `preprocess`.

    `precision`: "fp32" (the reference runs DALL-E in fp32) or "bf16" (autocast; faster on a
    GPU, but the argmax over thousands of logits flips on near ties: README, measured). It is
    part of the identity a token cache records, since the tokens depend on it."""

    kind = "abstract"

    def __init__(self, net: nn.Module, vocab_size: int, input_size: int, grid: int, batch_size: int = 256,
                 device: str | torch.device = "cpu", precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"tokenizer precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        self.net = net.eval().requires_grad_(False)
        self.vocab_size, self.input_size, self.grid = vocab_size, input_size, (grid, grid)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.net.to(self.device)
        if self.device.type == "cuda":
            self.net.to(memory_format=torch.channels_last)
        self._checksum = None

    @property
    def identity(self) -> dict:
        """What the token cache records: kind, vocabulary, sizes, the weight checksum and the precision."""
        if self._checksum is None:
            self._checksum = weights_checksum(self.net)
        return {"kind": self.kind, "vocab_size": self.vocab_size, "input_size": self.input_size,
                "grid": list(self.grid), "weights_sha256": self._checksum, "precision": self.precision}

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] float (B, 3, S, S) -> the network's input."""
        raise NotImplementedError

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float images (B, 3, S, S), S = input_size -> LongTensor (B, h, w)."""
        if images.ndim != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (self.input_size,) * 2:
            raise ValueError(f"{self.kind} tokenizer expects (B, 3, {self.input_size}, {self.input_size}) images, "
                             f"got {tuple(images.shape)}")
        out = []
        for chunk in images.split(self.batch_size):
            x = chunk.to(self.device, non_blocking=True)
            x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
            x = self.preprocess(x)
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                logits = self.net(x)
            out.append(logits.argmax(1))
        return torch.cat(out)
