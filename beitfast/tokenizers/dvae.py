"""Our own trainable discrete VAE (the DALL-E recipe, REFERENCE.md section 7).

encoder (DalleEncoder) -> logits over K codes per cell -> Gumbel-softmax relaxation with
temperature tau (soft one-hot, forward and backward) -> decoder (mirror of the encoder; its
first 1x1 conv over the K-dim one-hot is the codebook) -> per-pixel likelihood:
logit-Laplace (mu and log b per channel, pixels mapped to [eps, 1-eps]) or MSE.
Loss per image dimension: (NLL + beta * KL(q || uniform)) / (3 H W). At inference, codes are
the argmax of the encoder logits.

Export format (`tokenizer.pt`, loadable with torch's weights-only unpickler): a dict with
`format`, `arch`, `likelihood`, `input_size`, `encoder` (state dict), `decoder` (state dict).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from beitfast.tokenizers.base import Tokenizer
from beitfast.tokenizers.dalle import Conv, DalleEncoder, ResBlock, map_pixels, read_dalle_file, unmap_pixels

EXPORT_FORMAT = "beitfast-dvae/1"


@dataclass
class DVAEArch:
    vocab_size: int = 8192
    n_hid: int = 256  # encoder width of the first group (doubles each group)
    n_init: int = 128  # decoder width after the codebook projection
    n_blk_per_group: int = 2
    downsample: int = 8  # 112 -> 14
    likelihood: str = "logit_laplace"  # or "mse"

    @property
    def group_count(self) -> int:
        g = int(round(math.log2(self.downsample))) + 1
        if 2 ** (g - 1) != self.downsample:
            raise ValueError(f"dVAE downsample must be a power of two, got {self.downsample}")
        return g


class DVAEDecoder(nn.Module):
    """(B, K, h, w) (relaxed) one-hot codes -> (B, C, h*ds, w*ds) likelihood parameters."""

    def __init__(self, a: DVAEArch):
        super().__init__()
        g_count = a.group_count
        n_layers = g_count * a.n_blk_per_group
        out_ch = 6 if a.likelihood == "logit_laplace" else 3
        layers = [("input", Conv(a.vocab_size, a.n_init, 1))]
        width = a.n_init
        for g in range(1, g_count + 1):
            out = a.n_hid * 2 ** (g_count - g)
            group = [(f"block_{i + 1}", ResBlock(width if i == 0 else out, out, n_layers, decoder=True))
                     for i in range(a.n_blk_per_group)]
            if g < g_count:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            layers.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
            width = out
        layers.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv(width, out_ch, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(z)


class DVAE(nn.Module):
    def __init__(self, arch: DVAEArch):
        super().__init__()
        self.arch = arch
        self.encoder = DalleEncoder(group_count=arch.group_count, n_hid=arch.n_hid,
                                    n_blk_per_group=arch.n_blk_per_group, vocab_size=arch.vocab_size)
        self.decoder = DVAEDecoder(arch)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return map_pixels(x) if self.arch.likelihood == "logit_laplace" else x

    def reconstruct_from(self, out: torch.Tensor) -> torch.Tensor:
        """Decoder output -> [0, 1] image (the likelihood's mode/mean)."""
        if self.arch.likelihood == "logit_laplace":
            return unmap_pixels(torch.sigmoid(out[:, :3].float()))
        return out.float().clamp(0, 1)

    def nll(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-dimension negative log-likelihood of [0, 1] images `x` (B, 3, H, W), summed."""
        out = out.float()
        if self.arch.likelihood == "mse":
            return 0.5 * ((out - x) ** 2).sum()
        # logit-Laplace: y = map(x) in (eps, 1-eps); p(y) = exp(-|logit y - mu| / b) / (2 b y (1-y))
        y = map_pixels(x)
        mu, log_b = out[:, :3], out[:, 3:].clamp(min=-7.0)
        return ((torch.logit(y) - mu).abs() * torch.exp(-log_b) + log_b + math.log(2) + torch.log(y * (1 - y))).sum()

    def forward(self, x: torch.Tensor, tau: float, beta: float) -> dict:
        """x: [0, 1] images (B, 3, H, W). Returns the loss and the terms to report."""
        logits = self.encoder(self.preprocess(x)).float()  # (B, K, h, w)
        z = F.gumbel_softmax(logits, tau=tau, hard=False, dim=1)
        out = self.decoder(z)
        dims = x[0].numel() * x.shape[0]
        nll = self.nll(out, x) / dims
        log_q = F.log_softmax(logits, dim=1)
        kl = (log_q.exp() * (log_q + math.log(self.arch.vocab_size))).sum() / dims
        return {"loss": nll + beta * kl, "nll": nll, "kl": kl, "recon": self.reconstruct_from(out), "logits": logits}

    @torch.no_grad()
    def reconstruct_hard(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(argmax codes (B, h, w), reconstruction from those hard codes)."""
        codes = self.encoder(self.preprocess(x)).argmax(1)
        z = F.one_hot(codes, self.arch.vocab_size).permute(0, 3, 1, 2).float()
        return codes, self.reconstruct_from(self.decoder(z))

    def export(self, input_size: int) -> dict:
        return {"format": EXPORT_FORMAT, "arch": asdict(self.arch), "input_size": int(input_size),
                "encoder": self.encoder.state_dict(), "decoder": self.decoder.state_dict()}


@torch.no_grad()
def decode_tokens(model: DVAE, codes: torch.Tensor) -> torch.Tensor:
    """(B, h, w) token ids -> (B, 3, H, W) pixels in [0, 1], through the decoder."""
    z = F.one_hot(codes.long(), model.arch.vocab_size).permute(0, 3, 1, 2).float()
    return model.reconstruct_from(model.decoder(z)).clamp(0, 1)


def load_export(path: str | Path) -> tuple[DVAE, int]:
    """(DVAE with weights, input size) from a `tokenizer.pt` written by train_dvae.py."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dVAE tokenizer not found: {path} (train one with data_prep/train_dvae.py)")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"refusing to load {path}: not a beitfast dVAE export ({type(e).__name__})") from None
    return from_export(d, path)


def from_export(d, path) -> tuple[DVAE, int]:
    """(DVAE, input size) from the loaded contents `d` of the tokenizer.pt at `path`."""
    if not isinstance(d, dict) or d.get("format") != EXPORT_FORMAT:
        got = d.get("format") if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{path}: format {got!r}, expected {EXPORT_FORMAT!r} (a tokenizer.pt from train_dvae.py)")
    model = DVAE(DVAEArch(**d["arch"]))
    model.encoder.load_state_dict(d["encoder"])
    model.decoder.load_state_dict(d["decoder"])
    return model, int(d["input_size"])


def load_decoder(path: str | Path) -> DVAE:
    """A DVAE whose decoder draws tokens: our tokenizer.pt (train_dvae.py), or OpenAI's DALL-E
    `decoder.pkl` (a pickled dall_e.Decoder, read through an allow-list of exactly its classes,
    as the encoder is) or a plain state dict of that decoder. Its encoder is left untrained."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"decoder weights not found: {path} (a dVAE tokenizer.pt, or OpenAI's "
                                f"https://cdn.openai.com/dall-e/decoder.pkl)")
    sd = read_dalle_file(path, "decoder", lambda obj: isinstance(obj, dict) and obj.get("format") == EXPORT_FORMAT)
    if sd.get("format") == EXPORT_FORMAT:  # our own tokenizer.pt
        return from_export(sd, path)[0]
    try:
        n_init, vocab = sd["blocks.input.w"].shape[:2]
        n_hid = sd["blocks.output.conv.w"].shape[1]
    except KeyError as e:
        raise ValueError(f"{path}: not a DALL-E decoder state dict (missing {e.args[0]})") from None
    groups = len({k.split(".")[1] for k in sd if k.startswith("blocks.group_")})
    blocks = len({k.split(".")[2] for k in sd if k.startswith("blocks.group_1.block_")})
    model = DVAE(DVAEArch(vocab_size=int(vocab), n_hid=int(n_hid), n_init=int(n_init), n_blk_per_group=blocks,
                          downsample=2 ** (groups - 1), likelihood="logit_laplace"))
    try:
        model.decoder.load_state_dict(sd)
    except RuntimeError as e:
        raise ValueError(f"{path}: its weights do not fit a DALL-E decoder ({str(e).splitlines()[0]})") from None
    return model


class DVAETokenizer(Tokenizer):
    """Our dVAE's encoder as a tokenizer."""

    kind = "dvae"

    def __init__(self, model: DVAE, input_size: int, batch_size: int = 256, device="cpu", precision: str = "fp32"):
        self.likelihood = model.arch.likelihood
        super().__init__(model.encoder, model.arch.vocab_size, input_size, input_size // model.arch.downsample,
                         batch_size, device, precision)

    @classmethod
    def from_file(cls, path, batch_size: int = 256, device="cpu", precision: str = "fp32") -> "DVAETokenizer":
        model, input_size = load_export(path)
        return cls(model, input_size, batch_size, device, precision)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return map_pixels(x) if self.likelihood == "logit_laplace" else x

