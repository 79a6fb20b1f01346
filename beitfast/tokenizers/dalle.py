"""The DALL-E dVAE encoder (REFERENCE.md section 7), our implementation.

Parameter names equal the `dall_e` package's (`blocks.group_1.block_1.res_path.conv_1.w`,
...), so its state dicts load as they are. The network is also the encoder of our own dVAE
(`group_count` sets the downsampling: 2**(group_count-1)).

OpenAI's `encoder.pkl` is a pickled `dall_e.Encoder` module. Unpickling runs code, so
`load_dalle_weights` uses torch's weights-only unpickler with an allow-list of exactly the
classes such a file contains; anything else is refused with a message naming the file.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from beitfast.tokenizers.base import Tokenizer

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps], the logit-Laplace input mapping (eps = 0.1)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


class Conv(nn.Module):
    """Conv2d with 'same' padding and dall_e's parameter names (w, b) and init."""

    def __init__(self, n_in: int, n_out: int, kw: int, fp32: bool = False):
        super().__init__()
        self.w = nn.Parameter(torch.empty(n_out, n_in, kw, kw).normal_(std=1 / math.sqrt(n_in * kw * kw)))
        self.b = nn.Parameter(torch.zeros(n_out))
        self.pad = (kw - 1) // 2
        self.fp32 = fp32  # the output conv stays fp32 under autocast, as in dall_e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp32 and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return F.conv2d(x.float(), self.w, self.b, padding=self.pad)
        return F.conv2d(x, self.w, self.b, padding=self.pad)


class ResBlock(nn.Module):
    """x -> id_path(x) + res_path(x) / n_layers**2: dall_e's EncoderBlock (3,3,3,1 kernels)
    or, with `decoder=True`, its DecoderBlock (1,3,3,3 kernels)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, decoder: bool = False):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", Conv(n_in, n_hid, 1 if decoder else 3)),
            ("relu_2", nn.ReLU()), ("conv_2", Conv(n_hid, n_hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", Conv(n_hid, n_hid, 3)),
            ("relu_4", nn.ReLU()), ("conv_4", Conv(n_hid, n_out, 3 if decoder else 1)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """(B, 3, S, S) mapped pixels -> (B, vocab, S/2**(g-1), S/2**(g-1)) fp32 logits.
    Defaults are dall_e.Encoder's: 4 groups of 2 blocks, n_hid 256, vocab 8192."""

    def __init__(self, group_count: int = 4, n_hid: int = 256, n_blk_per_group: int = 2,
                 input_channels: int = 3, vocab_size: int = 8192):
        super().__init__()
        self.arch = dict(group_count=group_count, n_hid=n_hid, n_blk_per_group=n_blk_per_group,
                         input_channels=input_channels, vocab_size=vocab_size)
        n_layers = group_count * n_blk_per_group
        layers = [("input", Conv(input_channels, n_hid, 7))]
        width = n_hid
        for g in range(1, group_count + 1):
            out = n_hid * 2 ** (g - 1)
            group = [(f"block_{i + 1}", ResBlock(width if i == 0 else out, out, n_layers)) for i in range(n_blk_per_group)]
            if g < group_count:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
            width = out
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()), ("conv", Conv(width, vocab_size, 1, fp32=True))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    @property
    def downsample(self) -> int:
        return 2 ** (self.arch["group_count"] - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def _dalle_allow_list(part: str = "encoder") -> list:
    """Exactly the classes a pickled dall_e.Encoder (part="encoder") or dall_e.Decoder holds."""
    try:
        from dall_e.decoder import Decoder, DecoderBlock
        from dall_e.encoder import Encoder, EncoderBlock
        from dall_e.utils import Conv2d
    except ImportError as e:
        raise ImportError(f"loading a pickled dall_e.{part.capitalize()} needs the dall-e package "
                          "(pip install --no-deps dall-e attrs requests)") from e
    import collections

    own = [Encoder, EncoderBlock, nn.MaxPool2d] if part == "encoder" else [Decoder, DecoderBlock, nn.Upsample]
    return [*own, Conv2d, nn.Sequential, nn.ReLU, nn.Identity, collections.OrderedDict, torch.device]


def read_dalle_file(path: Path, part: str, plain_ok=lambda obj: False):
    """What a DALL-E weights file holds: a float state dict of `part`, from OpenAI's pickled
    dall_e.Encoder / dall_e.Decoder (unpickled through `_dalle_allow_list(part)` only) or from a
    plain state dict. `plain_ok(obj)` lets a caller take another weights-only object as it is
    (returned unchanged). Anything else raises ValueError naming the file."""
    cls = f"dall_e.{part}.{part.capitalize()}"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        # Not a plain state dict: try a pickled dall_e module through the allow-list.
        try:
            with torch.serialization.safe_globals(_dalle_allow_list(part)):
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except ImportError:
            raise
        except Exception as e:
            raise ValueError(f"refusing to load {path}: it is neither a state dict nor a pickled "
                             f"{cls} ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    if plain_ok(obj):
        return obj
    if isinstance(obj, nn.Module):
        if f"{type(obj).__module__}.{type(obj).__name__}" != cls:
            raise ValueError(f"refusing to load {path}: holds a {type(obj).__module__}.{type(obj).__name__}, "
                             f"not a {cls}")
        obj = obj.state_dict()
    elif not (isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise ValueError(f"refusing to load {path}: expected a {cls} or a state dict, got {type(obj).__name__}")
    return {k: v.float() for k, v in obj.items()}


def arch_from_state_dict(sd: dict) -> dict:
    """Infer the encoder's hyper-parameters from a dall_e-style state dict."""
    try:
        n_hid, input_channels = sd["blocks.input.w"].shape[:2]
        vocab_size = sd["blocks.output.conv.w"].shape[0]
    except KeyError as e:
        raise ValueError(f"not a DALL-E encoder state dict: missing {e.args[0]}") from None
    groups = {k.split(".")[1] for k in sd if k.startswith("blocks.group_")}
    blocks = {k.split(".")[2] for k in sd if k.startswith("blocks.group_1.block_")}
    return dict(group_count=len(groups), n_hid=int(n_hid), n_blk_per_group=len(blocks),
                input_channels=int(input_channels), vocab_size=int(vocab_size))


def load_dalle_weights(path: str | Path) -> tuple[dict, dict]:
    """(arch, state_dict) from OpenAI's pickled encoder or a plain state dict of the same
    architecture. Never unpickles classes outside the dall_e encoder's allow-list."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DALL-E encoder weights not found: {path} (OpenAI publishes them as "
                                "https://cdn.openai.com/dall-e/encoder.pkl; or set tokenizer.kind=dvae and train "
                                "your own with data_prep/train_dvae.py)")
    sd = read_dalle_file(path, "encoder")
    return arch_from_state_dict(sd), sd


class DalleTokenizer(Tokenizer):
    """OpenAI's DALL-E encoder as a tokenizer: 112x112 -> 14x14 tokens of 8192."""

    kind = "dalle"

    def __init__(self, net: DalleEncoder, input_size: int = 112, batch_size: int = 256, device="cpu",
                 precision: str = "fp32"):
        super().__init__(net, net.arch["vocab_size"], input_size, input_size // net.downsample, batch_size, device,
                         precision)

    @classmethod
    def from_file(cls, path, input_size: int = 112, batch_size: int = 256, device="cpu",
                  precision: str = "fp32") -> "DalleTokenizer":
        arch, sd = load_dalle_weights(path)
        net = DalleEncoder(**arch)
        missing, unexpected = net.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not fit the DALL-E encoder: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return cls(net, input_size, batch_size, device, precision)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return map_pixels(x)
