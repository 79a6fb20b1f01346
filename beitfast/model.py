"""The BEiT encoder for masked image modeling (REFERENCE.md section 3).

patch embed (Conv2d, stride = patch) -> mask-token substitution -> prepend cls -> [abs pos]
-> L pre-norm blocks sharing one relative position bias -> final LayerNorm -> LM head on the
masked positions only. Parameter names equal the reference pretraining checkpoint's (section
6), so its `['model']` dict loads as it is; `to_timm` / `to_hf` export to timm `beit_*` and
HuggingFace `BeitForMaskedImageModeling` naming.

Fused kernels (kernels/): LayerNorm, residual + layer scale + drop path, masked LM head with
cross-entropy; `kernels` picks Apex -> Triton (CUDA) -> torch, or the config forces one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import kernels

SIZES = {  # dim, depth, heads, default layer-scale init
    "micro": (96, 4, 3, 0.1),  # long schedules on 2 CPU cores (configs/micro.yaml)
    "tiny": (192, 12, 3, 0.1),
    "small": (384, 12, 6, 0.1),
    "base": (768, 12, 12, 0.1),
    "large": (1024, 24, 16, 1e-5),
}


@dataclass
class BeitArgs:
    size: str = "base"
    img_size: int = 224
    patch_size: int = 16
    vocab_size: int = 8192
    drop_path: float = 0.1
    layer_scale_init: float | None = None
    rel_pos_bias: str = "shared"  # shared | per_block | none
    abs_pos_emb: bool = False
    attention: str = "sdpa"  # sdpa | flex
    kernels: str = "auto"
    depth: int | None = None  # override the size's depth (tests, benchmarks)
    target: str = "tokens"  # tokens | pixels (regress the masked patches' pixels: the paper's ablation)

    @classmethod
    def from_config(cls, m) -> "BeitArgs":
        return cls(size=m.size, img_size=m.img_size, patch_size=m.patch_size, vocab_size=m.vocab_size,
                   drop_path=m.drop_path, layer_scale_init=m.layer_scale_init, rel_pos_bias=m.rel_pos_bias,
                   abs_pos_emb=m.abs_pos_emb, attention=m.attention, kernels=m.kernels,
                   target=m.target)


def relative_position_index(h: int, w: int) -> torch.Tensor:
    """(N+1, N+1) indices into a ((2h-1)(2w-1) + 3)-row table: patch pairs (dy+h-1)*(2w-1) +
    (dx+w-1); cls->token, token->cls, cls->cls the last three rows."""
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
    idx = (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)
    n_rel = (2 * h - 1) * (2 * w - 1)
    out = torch.zeros(h * w + 1, h * w + 1, dtype=torch.long)
    out[1:, 1:] = idx
    out[0, 1:] = n_rel
    out[1:, 0] = n_rel + 1
    out[0, 0] = n_rel + 2
    return out


class RelPosBias(nn.Module):
    """The shared relative position bias: table (num_relative, heads), zeros at init."""

    def __init__(self, grid: tuple[int, int], heads: int):
        super().__init__()
        h, w = grid
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1) + 3, heads))
        self.register_buffer("relative_position_index", relative_position_index(h, w), persistent=True)

    def forward(self) -> torch.Tensor:
        n = self.relative_position_index.shape[0]
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, grid: tuple[int, int] | None, attention: str):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        if grid is not None:  # per-block table (timm's layout)
            h, w = grid
            self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1) + 3, heads))
            self.register_buffer("relative_position_index", relative_position_index(h, w), persistent=True)
        else:
            self.relative_position_bias_table = None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, n, c = x.shape
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))  # no k bias
        qkv = F.linear(x, self.qkv.weight, qkv_bias).reshape(b, n, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, hd) each
        if self.relative_position_bias_table is not None:
            idx = self.relative_position_index
            own = self.relative_position_bias_table[idx.view(-1)].view(n, n, -1).permute(2, 0, 1)
            bias = own if bias is None else bias + own
        out = attend(q, k, v, bias, self.attention)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def attend(q, k, v, bias, attention: str = "sdpa"):
    """softmax(q k^T / sqrt(hd) + bias) v, q/k/v (B, H, N, hd), bias (H, N, N) or None. SDPA takes
    the bias as an additive mask cast to q's dtype (an fp32 mask with bf16 queries was misread by
    cuDNN on H100, pytorch PR #191612; the start-up self-check compares this call with the math
    backend in fp32 on the run's device)."""
    if attention == "flex":
        return _flex(q, k, v, bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype)[None])


_FLEX = {}


def _flex(q, k, v, bias):
    """FlexAttention with the relative position bias as a score_mod (a table gather per
    score instead of a materialised (H, N, N) mask). Compiled on CUDA (eager flex
    materialises the scores; it is only the correctness path on CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    if q.is_cuda:
        if "fn" not in _FLEX:
            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        flex_attention = _FLEX["fn"]
    if bias is None:
        return flex_attention(q, k, v)
    bias = bias.to(q.dtype)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx, kv_idx]

    return flex_attention(q, k, v, score_mod=score_mod)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters) whose forward goes through the kernel dispatch."""

    def __init__(self, dim: int, eps: float = 1e-6, impl: str = "auto"):
        super().__init__(dim, eps=eps)
        self.impl = impl

    def forward(self, x):
        return kernels.layer_norm(x, self.weight, self.bias, self.eps, self.impl)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # erf GELU


class Block(nn.Module):
    def __init__(self, dim, heads, drop_path, layer_scale, grid, attention, impl):
        super().__init__()
        self.norm1 = LayerNorm(dim, impl=impl)
        self.attn = Attention(dim, heads, grid, attention)
        self.norm2 = LayerNorm(dim, impl=impl)
        self.mlp = Mlp(dim, 4 * dim)
        self.gamma_1 = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale else None
        self.gamma_2 = nn.Parameter(layer_scale * torch.ones(dim)) if layer_scale else None
        self.drop_path, self.impl = drop_path, impl

    def _keep(self, x):
        """Per-sample drop-path scale: keep / p, or ones (eval, rate 0)."""
        if not self.training or self.drop_path == 0:
            return torch.ones(x.shape[0], device=x.device, dtype=torch.float32)
        p = 1 - self.drop_path
        return torch.empty(x.shape[0], device=x.device).bernoulli_(p) / p

    def forward(self, x, bias):
        x = kernels.residual_add(x, self.attn(self.norm1(x), bias), self.gamma_1, self._keep(x), self.impl)
        return kernels.residual_add(x, self.mlp(self.norm2(x)), self.gamma_2, self._keep(x), self.impl)


class Beit(nn.Module):
    def __init__(self, a: BeitArgs):
        super().__init__()
        dim, depth, heads, ls_default = SIZES[a.size]
        depth = a.depth or depth
        self.args = a
        self.grid = (a.img_size // a.patch_size,) * 2
        self.num_patches = self.grid[0] * self.grid[1]
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, a.patch_size, stride=a.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, dim)) if a.abs_pos_emb else None
        self.rel_pos_bias = RelPosBias(self.grid, heads) if a.rel_pos_bias == "shared" else None
        ls = a.layer_scale_init if a.layer_scale_init is not None else ls_default
        dpr = torch.linspace(0, a.drop_path, depth).tolist()
        per_block = self.grid if a.rel_pos_bias == "per_block" else None
        self.blocks = nn.ModuleList(Block(dim, heads, dpr[i], ls, per_block, a.attention, a.kernels) for i in range(depth))
        self.norm = LayerNorm(dim, impl=a.kernels)
        self.lm_head = nn.Linear(dim, a.vocab_size if a.target == "tokens" else 3 * a.patch_size ** 2)
        self._init()

    def _init(self):
        def tn(t):
            nn.init.trunc_normal_(t, std=0.02, a=-0.02, b=0.02)

        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                tn(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        tn(self.cls_token)
        tn(self.mask_token)
        if self.pos_embed is not None:
            tn(self.pos_embed)
        with torch.no_grad():
            for i, blk in enumerate(self.blocks, start=1):  # 1/sqrt(2l) rescale of the residual outputs
                blk.attn.proj.weight.div_(math.sqrt(2.0 * i))
                blk.mlp.fc2.weight.div_(math.sqrt(2.0 * i))

    def no_weight_decay(self) -> set[str]:
        """Parameters without weight decay (REFERENCE.md section 4); 1-D params are added by
        the optimizer builder. The reference decays mask_token and the rel-pos table."""
        return {"cls_token", "pos_embed"}

    def embed(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The blocks' input (B, N+1, D) (patch embedding, mask-token substitution, cls, absolute
        positions) and the shared relative-position bias (or None)."""
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2).float()  # (B, N, D), row-major
        if mask is not None:
            w = mask.reshape(t.shape[0], -1, 1).float()
            t = t * (1 - w) + self.mask_token * w
        t = torch.cat((self.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
        if self.pos_embed is not None:
            t = t + self.pos_embed
        return t, (self.rel_pos_bias() if self.rel_pos_bias is not None else None)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, 3, H, W), mask (B, h, w) bool or None -> (B, N+1, D) after the last block."""
        # The residual stream is fp32 whatever the autocast dtype (the reference's: its fp32
        # mask token and layer scale promote it); the branches compute in bf16/fp16 (see kernels/).
        t, bias = self.embed(x, mask)
        for blk in self.blocks:
            t = blk(t, bias)
        return t

    def forward(self, x: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor,
                max_masked: int | None = None) -> dict:
        """MIM step: loss (cross-entropy on masked positions), correct and n_masked counts as
        device tensors. max_masked, an upper bound on the masked patches of one image (the mask
        budget), keeps every shape static, so the step never waits on the GPU; without it the
        masked gather reads the count on the host once."""
        h = self.norm(self.forward_features(x, mask))[:, 1:]  # (B, N, D), cls dropped
        b = h.shape[0]
        if self.args.target == "pixels":
            return self.pixel_loss(h, x, mask)
        loss, correct, n = kernels.masked_head(h, mask.reshape(b, -1), self.lm_head.weight, self.lm_head.bias,
                                               targets.reshape(b, -1), self.args.kernels,
                                               None if max_masked is None else b * max_masked)
        return {"loss": loss, "correct": correct, "n_masked": n}

    def pixel_loss(self, h, x, mask) -> dict:
        """The pixel-regression ablation: mean squared error between the head's output and the
        masked patches' pixels of the (normalised) input, each patch flattened (c, y, x);
        weighted by the mask, so shapes stay static."""
        b, p = x.shape[0], self.args.patch_size
        gh, gw = self.grid
        tgt = x.float().reshape(b, 3, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, 3 * p * p)
        err = (self.lm_head(h).float() - tgt).pow(2).mean(-1)
        m = mask.reshape(b, -1).float()
        n = m.sum()
        return {"loss": (err * m).sum() / n.clamp_min(1), "correct": torch.zeros((), device=x.device), "n_masked": n}

    def masked_logits(self, x, mask):
        """(n_masked, vocab) logits of the masked positions (unfused; for tests and eval)."""
        h = self.norm(self.forward_features(x, mask))[:, 1:]
        return self.lm_head(h[mask.reshape(h.shape[0], -1)])


# ----------------------------------------------------------------------------- interop
def load_reference(model: Beit, sd: dict, strict: bool = True):
    """Load a reference pretraining checkpoint's `['model']` dict (same key names)."""
    return model.load_state_dict(sd, strict=strict)


def to_timm(model: Beit) -> dict:
    """A state dict for timm `beit_*` (mean pooling, per-block tables): the shared table is
    copied into every block; mask_token, lm_head, norm and the index buffers are dropped.
    Load with `load_state_dict(..., strict=False)` (timm's fc_norm/head stay as built)."""
    sd = {k: v for k, v in model.state_dict().items()
          if not (k.startswith(("mask_token", "lm_head", "norm.", "rel_pos_bias")) or k.endswith("relative_position_index"))}
    if model.rel_pos_bias is not None:
        table = model.rel_pos_bias.relative_position_bias_table.detach()
        for i in range(len(model.blocks)):
            sd[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
    return sd


# our block key -> HuggingFace's, per naming: "v4" (transformers 4.x) and "v5" (5.x renamed BEiT's
# parameters); the q/k/v split of qkv.weight is done in to_hf
_HF_BLOCK = {
    "v4": {"q": "attention.attention.query", "k": "attention.attention.key", "v": "attention.attention.value",
           "attn.proj": "attention.output.dense", "norm1": "layernorm_before", "norm2": "layernorm_after",
           "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense", "gamma_1": "lambda_1", "gamma_2": "lambda_2",
           "attn.relative_position_bias_table": "attention.attention.relative_position_bias.relative_position_bias_table"},
    "v5": {"q": "attention.q_proj", "k": "attention.k_proj", "v": "attention.v_proj", "attn.proj": "attention.o_proj",
           "norm1": "layernorm_before", "norm2": "layernorm_after", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
           "gamma_1": "lambda_1", "gamma_2": "lambda_2",
           "attn.relative_position_bias_table": "relative_position_bias.relative_position_bias_table"},
}
_HF_LAYERS = {"v4": "beit.encoder.layer.", "v5": "beit.layers."}
_HF_SHARED = {"v4": "beit.encoder.relative_position_bias.relative_position_bias_table",
              "v5": "beit.shared_position_bias.relative_position_bias_table"}


def hf_naming() -> str:
    """The naming of the installed transformers: "v5" from 5.0 on, else "v4"."""
    import transformers

    return "v5" if int(transformers.__version__.split(".")[0]) >= 5 else "v4"


def to_hf(model: Beit, naming: str | None = None) -> dict:
    """A state dict in HuggingFace `BeitForMaskedImageModeling` naming (use_mask_token,
    use_shared_relative_position_bias, layer_norm_eps=1e-6). naming: "v4" (transformers 4.x),
    "v5" (5.x) or None, the installed version's."""
    naming = naming or hf_naming()
    if naming not in _HF_BLOCK:
        raise ValueError(f"naming must be one of {sorted(_HF_BLOCK)}, got {naming!r}")
    names, layers = _HF_BLOCK[naming], _HF_LAYERS[naming]
    src = model.state_dict()
    dim = model.cls_token.shape[-1]
    out = {"beit.embeddings.cls_token": src["cls_token"], "beit.embeddings.mask_token": src["mask_token"],
           "beit.embeddings.patch_embeddings.projection.weight": src["patch_embed.proj.weight"],
           "beit.embeddings.patch_embeddings.projection.bias": src["patch_embed.proj.bias"],
           "layernorm.weight": src["norm.weight"], "layernorm.bias": src["norm.bias"],
           "lm_head.weight": src["lm_head.weight"], "lm_head.bias": src["lm_head.bias"]}
    if "rel_pos_bias.relative_position_bias_table" in src:
        out[_HF_SHARED[naming]] = src["rel_pos_bias.relative_position_bias_table"]
    if model.pos_embed is not None:
        out["beit.embeddings.position_embeddings"] = src["pos_embed"]
    for i in range(len(model.blocks)):
        p, q = f"blocks.{i}.", f"{layers}{i}."
        for part, w in zip("qkv", src[p + "attn.qkv.weight"].split(dim)):
            out[f"{q}{names[part]}.weight"] = w
        out[f"{q}{names['q']}.bias"], out[f"{q}{names['v']}.bias"] = src[p + "attn.q_bias"], src[p + "attn.v_bias"]
        for ours in ("attn.proj", "norm1", "norm2", "mlp.fc1", "mlp.fc2"):
            out[f"{q}{names[ours]}.weight"], out[f"{q}{names[ours]}.bias"] = src[f"{p}{ours}.weight"], src[f"{p}{ours}.bias"]
        for ours in ("gamma_1", "gamma_2", "attn.relative_position_bias_table"):
            if p + ours in src:
                out[q + names[ours]] = src[p + ours]
    return out
