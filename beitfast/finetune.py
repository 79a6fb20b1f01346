"""Classification fine-tuning of a pretrained BEiT (the reference recipe, REFERENCE.md section 5).

    torchrun --nproc_per_node 8 beitfast/finetune.py --cfg finetune_base.yaml \\
        model.pretrained=runs/base/ckpt.pt data.root=/data/imagenet log.out_dir=runs/ft_base
    python beitfast/finetune.py --cfg finetune_tiny.yaml model.pretrained=runs/demo/pretrain/ckpt.pt

The model is timm's BEiT (mean-pooled patch tokens -> fc_norm -> linear head initialised at
0.001 x trunc-normal 0.02, one relative-position table per block), so the fine-tuned
weights are timm's: `ckpt.pt['model']` and `best.pt['state_dict']` load into
`timm.create_model("beit_base_patch16_224", checkpoint_path=...)` as they are.
`model.pretrained` takes our pretraining checkpoints and the reference's (the shared table
is copied into every block; mask token, LM head and final norm are dropped), or timm /
reference fine-tuned weights (.pth, .safetensors); a table of another grid (224 -> 384 px,
224 -> 512 for segmentation) is resampled as the reference does it (`resample_rel_pos_table`:
a cubic spline per head over geometrically spaced source offsets). timm's own resampling is
linear over those offsets unless scipy's removed `interp2d` is asked for, so it is not used.

Recipe: timm's RandAugment, random erasing, Mixup/CutMix with label smoothing and
SoftTargetCrossEntropy; AdamW with layer-wise lr decay (scale decay^(L+1-i): i = 0 for the
embeddings, block k -> k+1, head L+1), no weight decay on 1-D parameters, biases, cls_token
and pos_embed; per-step warm-up + cosine schedule; top-1 / top-5 on the validation split
after every `train.eval_every_epochs`. Batches follow the pretraining's StepSampler, and each
image's augmentation is seeded by (seed, epoch, index), so a run killed at any step resumes
from `ckpt.pt` to the same result. Outputs in log.out_dir: config.yaml, metrics.jsonl,
ckpt.pt (resume), best.pt (best top-1), eval.json; the last line printed is one JSON object.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from beitfast import selfcheck  # noqa: E402
from beitfast.config import ConfigError, FinetuneConfig  # noqa: E402
from beitfast.data.images import list_imagefolder, read_decodable  # noqa: E402
from beitfast.data.sampler import Counting, StepSampler  # noqa: E402
from beitfast.distributed import trainer_main  # noqa: E402
from beitfast.model import SIZES  # noqa: E402
from beitfast.runlog import atomic_save  # noqa: E402
from beitfast.steploop import accumulation, autocast, resume_run, train_steps  # noqa: E402
from beitfast.train import lr_at  # noqa: E402

CKPT_FORMAT = "beitfast-finetune-ckpt/1"
PROG = "finetune"


# ----------------------------------------------------------------------------- model
def build_classifier(m, num_classes: int) -> nn.Module:
    """timm's BEiT of the configured size with the reference's fine-tuning head."""
    from timm.layers import LayerNorm
    from timm.models.beit import Beit as TimmBeit

    dim, depth, heads, ls = SIZES[m.size]
    return TimmBeit(img_size=m.img_size, patch_size=m.patch_size, num_classes=num_classes, global_pool="avg",
                    embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=4.0, qkv_bias=True,
                    drop_path_rate=m.drop_path, norm_layer=partial(LayerNorm, eps=1e-6),
                    init_values=ls if m.layer_scale_init is None else m.layer_scale_init,
                    use_abs_pos_emb=m.abs_pos_emb, use_rel_pos_bias=True, use_shared_rel_pos_bias=False,
                    head_init_scale=0.001)


def read_weights(path: str) -> dict:
    """The state dict in a weights file: ours, the reference's (under 'model'), timm's or
    DeiT-style ('state_dict', 'module'), or .safetensors; 'module.' prefixes stripped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.pretrained={path}: no such file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            ck = load_file(str(p))
        else:
            ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"model.pretrained={path}: cannot read it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    sd = ck
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"model.pretrained={path}: not a state dict of tensors (looked under 'model', "
                         f"'state_dict', 'module')")
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def _geometric_offsets(src: int, dst: int) -> np.ndarray:
    """The reference's source coordinates for a table of side `src` stretched to side `dst`:
    offsets 1, 1 + q, 1 + q + q^2, ... either side of 0, q found by bisection so that they
    reach dst // 2."""
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        if (1 - q ** (src // 2)) / (1 - q) > dst // 2:
            hi = q
        else:
            lo = q
    dis = np.cumsum([1.0] + [q ** (i + 1) for i in range(src // 2 - 1)])
    return np.concatenate((-dis[::-1], [0.0], dis))


def _cubic_spline_matrix(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(len(t), len(x)): values at `t` of the not-a-knot cubic spline through (x, y), as a
    linear map of y (what FITPACK's interpolating spline, s = 0, is; the reference's
    scipy `interp2d(kind='cubic')` fits it along each axis of its grid)."""
    n = len(x)
    if n < 4:
        raise ValueError(f"a cubic spline needs 4 points, got {n}")
    h = np.diff(x)
    a, b = np.zeros((n, n)), np.zeros((n, n))  # a @ M = b @ y for the second derivatives M
    a[0, :3] = [h[1], -(h[0] + h[1]), h[0]]  # not-a-knot: the third derivative continuous at x[1]
    a[-1, -3:] = [h[-1], -(h[-2] + h[-1]), h[-2]]  # and at x[-2]
    for i in range(1, n - 1):
        a[i, i - 1:i + 2] = [h[i - 1], 2 * (h[i - 1] + h[i]), h[i]]
        b[i, i - 1:i + 2] = [6 / h[i - 1], -6 / h[i - 1] - 6 / h[i], 6 / h[i]]
    m = np.linalg.solve(a, b)  # M = m @ y
    t = np.clip(t, x[0], x[-1])  # outside the points: the end value (FITPACK clamps its argument so)
    i = np.clip(np.searchsorted(x, t, side="right") - 1, 0, n - 2)
    hi, u, v = h[i], x[i + 1] - t, t - x[i]
    eye = np.eye(n)
    w = (m[i] * (u ** 3 / (6 * hi) - hi * u / 6)[:, None] + m[i + 1] * (v ** 3 / (6 * hi) - hi * v / 6)[:, None]
         + eye[i] * (u / hi)[:, None] + eye[i + 1] * (v / hi)[:, None])
    return w


def resample_rel_pos_table(table: torch.Tensor, dst_window: int, extra: int = 3) -> torch.Tensor:
    """A relative-position bias table ((2S-1)^2 + extra, heads) of a square window S resampled to
    window `dst_window`, as the reference's fine-tuning and segmentation code do: per head, a
    bicubic (not-a-knot) spline through the table at geometrically spaced offsets, read at the
    integer offsets of the new window; the `extra` rows (cls-token terms) kept as they are."""
    n_src, heads = table.shape[0] - extra, table.shape[1]
    src = round(n_src ** 0.5)
    if src * src != n_src or src % 2 == 0:
        raise ValueError(f"a relative-position table of {table.shape[0]} rows is not a square window's "
                         f"(2S-1)^2 + {extra}")
    dst = 2 * dst_window - 1
    if src == dst:
        return table
    x = _geometric_offsets(src, dst)
    t = np.arange(-(dst // 2), dst // 2 + 0.1, 1.0)
    w = torch.from_numpy(_cubic_spline_matrix(x, t))
    z = table[:n_src].double().reshape(src, src, heads).permute(2, 0, 1)  # (heads, dy, dx)
    out = (w @ z @ w.T).permute(1, 2, 0).reshape(dst * dst, heads)
    return torch.cat((out.to(table.dtype), table[n_src:]), dim=0)


def pretrained_to_timm(sd: dict, model: nn.Module) -> tuple[dict, list[str]]:
    """Map a pretraining (ours / the reference's) or timm state dict onto `model`'s names and
    shapes. Returns (state dict, what was dropped)."""
    from timm.models.beit import checkpoint_filter_fn

    sd, dropped = dict(sd), []
    shared = sd.pop("rel_pos_bias.relative_position_bias_table", None)
    if shared is not None:  # the reference copies the shared table into every block
        for i in range(len(model.blocks)):
            sd.setdefault(f"blocks.{i}.attn.relative_position_bias_table", shared.clone())
    own = model.state_dict()
    for k in list(sd):
        pretrain_only = k in ("mask_token",) or k.startswith(("lm_head.", "rel_pos_bias.")) \
            or (k.startswith("norm.") and k not in own)
        head_mismatch = k.startswith("head.") and (k not in own or own[k].shape != sd[k].shape)
        pruned = k not in own and (k.startswith("fc_norm.") or  # a backbone without head or later blocks
                                   (k.startswith("blocks.") and int(k.split(".")[1]) >= len(model.blocks)))
        if pretrain_only or head_mismatch or pruned or k.endswith("relative_position_index"):
            dropped.append(k)
            del sd[k]
        elif k.endswith("relative_position_bias_table") and k in own and own[k].shape != sd[k].shape \
                and model.patch_embed.grid_size[0] == model.patch_embed.grid_size[1]:  # non-square: timm's
            try:  # resampled here, the reference's way; timm's filter then finds the shapes equal
                sd[k] = resample_rel_pos_table(sd[k], model.patch_embed.grid_size[0])
            except ValueError as e:
                raise ValueError(f"{k}: {e}") from None
    return checkpoint_filter_fn(sd, model), dropped


def load_pretrained(model: nn.Module, path: str) -> dict:
    """Load `path` into `model`; every encoder weight must be found (the fc_norm and head may
    start fresh). Returns what was loaded, for the log."""
    sd, dropped = pretrained_to_timm(read_weights(path), model)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise ValueError(f"model.pretrained={path}: its weights do not fit the configured model "
                         f"({str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}); "
                         f"check model.size / model.patch_size") from None
    missing = [k for k in missing if not k.endswith("relative_position_index")]
    fresh = [k for k in missing if k.startswith(("fc_norm.", "head."))]
    lost = sorted(set(missing) - set(fresh))
    if lost or unexpected:
        raise ValueError(f"model.pretrained={path}: not a BEiT of the configured shape: missing "
                         f"{lost[:6]}{'...' if len(lost) > 6 else ''}, unexpected {sorted(unexpected)[:6]}")
    return {"pretrained": path, "tensors": len(sd), "fresh": fresh, "dropped": len(dropped)}


def layer_id(name: str, depth: int) -> int:
    """The reference's `get_num_layer_for_vit`: embeddings 0, block k -> k + 1, rest depth + 1."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Parameter groups with `lr_scale` = layer_decay^(depth + 1 - layer_id) and the
    reference's weight-decay rule (none for 1-D, biases, cls_token and pos_embed)."""
    depth = len(model.blocks)
    skip = {"cls_token", "pos_embed"}
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name.endswith(".bias") or name in skip
        lid = layer_id(name, depth)
        g = groups.setdefault((lid, no_decay), {"params": [], "names": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                "lr_scale": layer_decay ** (depth + 1 - lid)})
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


# ----------------------------------------------------------------------------- data
@contextlib.contextmanager
def seeded(seed_seq: list[int]):
    """Run with python's, numpy's and torch's global generators seeded from `seed_seq` (timm's
    transforms draw from them), restoring their states afterwards."""
    s = np.random.SeedSequence(seed_seq).generate_state(2)
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(int(s[0]))
        np.random.seed(int(s[1]))
        torch.manual_seed(int(s[0]) ^ int(s[1]))
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def build_transforms(d, img_size: int):
    """timm's training transform (RandomResizedCrop, flip, RandAugment, normalise, random
    erasing) and eval transform (resize to img_size / crop_pct, centre crop)."""
    from timm.data import create_transform

    train = create_transform(img_size, is_training=True, scale=d.crop_scale, hflip=0.5, color_jitter=0.4,
                             auto_augment=d.auto_augment or None, interpolation=d.interpolation,
                             mean=d.mean, std=d.std, re_prob=d.reprob, re_mode=d.remode, re_count=1)
    val = create_transform(img_size, is_training=False, interpolation=d.interpolation, mean=d.mean, std=d.std,
                           crop_pct=d.crop_pct)
    return train, val


class TrainStream(torch.utils.data.Dataset):
    """Sample n of the rank's stream -> (image, label). The augmentation of image j in epoch e
    is seeded by (seed, e, j), so it does not depend on which worker renders it; a file that
    cannot be decoded is named once and replaced by the next decodable one (with its label)."""

    def __init__(self, root: str, files: list[str], labels: np.ndarray, sampler: StepSampler, transform, seed: int):
        self.root, self.files, self.labels, self.sampler, self.transform, self.seed = \
            root, files, labels, sampler, transform, seed
        self._bad: set = set()

    def __getitem__(self, n: int):
        from PIL import Image

        epoch, j = self.sampler.sample(n)
        arr, j = read_decodable(self.root, self.files, j, self._bad, PROG)
        with seeded([self.seed, epoch, j]):
            x = self.transform(Image.fromarray(arr))
        return x, int(self.labels[j])

    def __len__(self):
        return 1 << 62


class EvalSet(torch.utils.data.Dataset):
    """The validation images of one rank (every world-th); an undecodable one has label -1 and
    is left out of the counts (named on stderr)."""

    def __init__(self, root: str, files: list[str], labels: np.ndarray, transform, size: int):
        self.root, self.files, self.labels, self.transform, self.size = root, files, labels, transform, size

    def __getitem__(self, i: int):
        from PIL import Image

        from beitfast.data.images import BadImage, decode_rgb

        path = os.path.join(self.root, self.files[i])
        try:
            with open(path, "rb") as f:
                arr = decode_rgb(f.read(), path)
        except (BadImage, OSError) as e:
            print(f"[{PROG}] validation image left out: {e}", file=sys.stderr)
            return torch.zeros(3, self.size, self.size), -1
        return self.transform(Image.fromarray(arr)), int(self.labels[i])

    def __len__(self):
        return len(self.files)


def train_batches(ds, batch: int, workers: int, cuda: bool):
    # its own generator: a DataLoader iterator otherwise draws its base seed from torch's global
    # generator, which drop path also draws from, so a resumed run would drift by one draw
    from beitfast.preempt import ignore_in_worker

    dl = torch.utils.data.DataLoader(ds, batch_size=batch, sampler=Counting(), num_workers=workers,
                                     pin_memory=cuda, generator=torch.Generator().manual_seed(ds.seed),
                                     worker_init_fn=ignore_in_worker)
    return iter(dl)


@torch.no_grad()
def evaluate(model: nn.Module, ds: EvalSet, rank: int, world: int, device, batch: int, workers: int, amp,
             progress: bool = False) -> dict:
    """Top-1 / top-5 accuracy and mean cross-entropy over the validation split (all ranks)."""
    import torch.distributed as dist
    from beitfast.progress import progress_bar

    model.eval()
    sub = torch.utils.data.Subset(ds, list(range(rank, len(ds), world)))
    dl = torch.utils.data.DataLoader(sub, batch_size=batch, num_workers=workers, generator=torch.Generator())
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss, n
    for x, y in progress_bar(dl, desc="eval", leave=False, disable=not progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        keep = y >= 0
        if not keep.any():
            continue
        with amp():
            logits = model(x[keep]).float()
        y = y[keep]
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        sums += torch.stack([(top[:, 0] == y).sum().double(), (top == y[:, None]).any(1).sum().double(),
                             F.cross_entropy(logits, y, reduction="sum").double(),
                             torch.tensor(float(len(y)), device=device, dtype=torch.float64)])
    if world > 1:
        dist.all_reduce(sums)
    c1, c5, loss, n = sums.tolist()
    model.train()
    if n == 0:
        raise ValueError(f"no decodable validation image under {ds.root}")
    return {"acc1": 100 * c1 / n, "acc5": 100 * c5 / n, "loss": loss / n, "images": int(n)}


# ----------------------------------------------------------------------------- training
def build_criterion(d, num_classes: int):
    """(timm's Mixup/CutMix or None, the loss): soft-target cross-entropy after Mixup/CutMix
    (label smoothing inside them), label-smoothed or plain cross-entropy without."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if d.mixup > 0 or d.cutmix > 0:
        return (Mixup(mixup_alpha=d.mixup, cutmix_alpha=d.cutmix, prob=d.mixup_prob, switch_prob=d.mixup_switch_prob,
                      mode="batch", label_smoothing=d.smoothing, num_classes=num_classes), SoftTargetCrossEntropy())
    return None, LabelSmoothingCrossEntropy(d.smoothing) if d.smoothing > 0 else nn.CrossEntropyLoss()


def build_model(cfg: FinetuneConfig, num_classes: int, rank: int, device: torch.device):
    """(classifier on `device`, what load_pretrained said, AdamW over the layer-decay groups,
    the groups' lr scales, the GradScaler); the same initial weights on every rank."""
    o, t = cfg.optim, cfg.train
    torch.manual_seed(t.seed)  # the same initial head (and encoder, without weights) on every rank
    model = build_classifier(cfg.model, num_classes)
    loaded = load_pretrained(model, cfg.model.pretrained) if cfg.model.pretrained else {"pretrained": None}
    model.to(device)
    if t.self_check:  # timm's fused attention against its unfused path, on this device, before step 1
        for note in selfcheck.startup_timm(model, device, t.precision, t.seed)[1]:
            if rank == 0:
                print(f"[finetune] {note}")
    groups = layer_decay_groups(model, o.weight_decay, o.layer_decay)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=o.lr,
                            betas=o.betas, eps=o.eps, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    return model, loaded, opt, [g["lr_scale"] for g in groups], scaler


def finetune(cfg: FinetuneConfig, world: int, rank: int, device: torch.device, out: Path) -> dict:
    d, o, t = cfg.data, cfg.optim, cfg.train
    files, labels, classes = list_imagefolder(d.root, d.train_split)
    vfiles, vlabels, vclasses = list_imagefolder(d.root, d.val_split)
    if vclasses != classes:
        raise ValueError(f"{d.root}: the class folders of '{d.val_split}' differ from those of '{d.train_split}'")
    num_classes = cfg.model.num_classes or len(classes)
    if num_classes < len(classes):
        raise ConfigError(f"model.num_classes={num_classes} but {d.root}/{d.train_split} has {len(classes)} classes")
    accum = accumulation(t.global_batch, d.batch_size, world)
    sampler = StepSampler(len(files), t.seed, d.batch_size, world, rank, accum)
    if sampler.steps_per_epoch < 1:
        raise ConfigError(f"{d.root}/{d.train_split} has {len(files)} images, fewer than one global batch "
                          f"({t.global_batch})")
    spe = sampler.steps_per_epoch
    total, warmup = t.epochs * spe, int(round(o.warmup_epochs * spe))
    model, loaded, opt, scales, scaler = build_model(cfg, num_classes, rank, device)
    mixup, criterion = build_criterion(d, num_classes)

    ck, step, net = resume_run(out, CKPT_FORMAT, t.global_batch, model, opt, scaler, rank, world, device, "step")
    best = ck.get("best") if ck is not None else None
    if rank == 0:
        print(f"[{PROG}] resumed from {out / 'ckpt.pt'} at step {step} of {total}" if ck is not None else
              f"[{PROG}] {cfg.model.size} BEiT at {cfg.model.img_size} px, {num_classes} classes, "
              f"weights: {loaded['pretrained'] or 'random init'}; {len(files)} train / {len(vfiles)} val images, "
              f"{total} steps of {t.global_batch}")
    train_tf, val_tf = build_transforms(d, cfg.model.img_size)
    ds = TrainStream(d.root, files, labels, sampler, train_tf, t.seed)
    vds = EvalSet(d.root, vfiles, vlabels, val_tf, cfg.model.img_size)
    sampler.start_step = step
    amp = autocast(t.precision, device)
    kept = {"best": best, "last": None}

    def run_eval(at: int) -> tuple[dict, str]:
        ev, epoch = evaluate(model, vds, rank, world, device, d.batch_size, d.workers, amp), at // spe
        kept["last"] = ev
        if kept["best"] is None or ev["acc1"] > kept["best"]["acc1"]:
            kept["best"] = {"acc1": ev["acc1"], "acc5": ev["acc5"], "epoch": epoch, "step": at}
            if rank == 0:
                atomic_save({"state_dict": model.state_dict(), "epoch": epoch, "acc1": ev["acc1"],
                             "num_classes": num_classes, "classes": classes}, out / "best.pt")
        return ({"kind": "eval", "step": at, "epoch": epoch, **{k: round(v, 4) for k, v in ev.items()}},
                f"[{PROG}] epoch {epoch} (step {at}): top-1 {ev['acc1']:.2f}%, top-5 {ev['acc5']:.2f}% on "
                f"{ev['images']} images")

    def mix(x, y, at: int, micro: int):
        with seeded([t.seed, at, micro, world, rank, 1]):  # timm's Mixup draws from numpy's global generator
            return mixup(x, y)

    step, preempted = train_steps(
        prog=PROG, unit="step", out=out, rank=rank, world=world, device=device, net=net, model=model, opt=opt,
        scaler=scaler, lr_scales=scales, lr_at=lambda s: lr_at(s, total, warmup, o.lr, o.min_lr),
        batches=train_batches(ds, d.batch_size, d.workers, device.type == "cuda"), accum=accum,
        loss_of=lambda n, x, y: criterion(n(x), y), prepare=mix if mixup is not None else None,
        clip_grad=o.clip_grad, autocast_ctx=amp, global_batch=t.global_batch, start=step, total=total,
        stop_at=t.stop_at, report_due=lambda s: s % cfg.log.every == 0 or s % spe == 0,
        eval_due=lambda s: s % spe == 0 and (s // spe) % t.eval_every_epochs == 0,
        ckpt_due=lambda s: s % spe == 0 and (s // spe) % cfg.log.ckpt_every_epochs == 0,
        evaluate=run_eval, train_row=lambda s: {"epoch": (s - 1) // spe}, ckpt_every_minutes=cfg.log.ckpt_every_minutes,
        checkpoint=lambda s, states: {"format": CKPT_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
                                      "scaler": scaler.state_dict(), "step": s, "best": kept["best"],
                                      "rng_states": states, "world_size": world, "config": cfg.to_dict(),
                                      "classes": classes},
        progress=cfg.log.progress)
    if preempted:
        return {"preempted_at": step}
    if step < total:
        return {"stopped_at": step}
    last, best = kept["last"], kept["best"]
    if last is None:  # resumed at the very end: the last eval row is in the log
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        last = [r for r in rows if r["kind"] == "eval"][-1]
    res = {"acc1": round(last["acc1"], 3), "acc5": round(last["acc5"], 3),
           "best_acc1": round(best["acc1"], 3), "best_epoch": best["epoch"], "steps": step,
           "pretrained": cfg.model.pretrained or None, "out": str(out)}
    if rank == 0:
        (out / "eval.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None) -> int:
    return trainer_main(argv, __doc__, PROG, "finetune_base.yaml", FinetuneConfig, finetune)


if __name__ == "__main__":
    sys.exit(main())
