"""Train our own dVAE image tokenizer (the DALL-E recipe).

    python data_prep/train_dvae.py --cfg dvae_tiny.yaml [section.key=value ...]
    torchrun --nproc_per_node=8 data_prep/train_dvae.py --cfg dvae.yaml

Writes to `log.out_dir`: `config.yaml` (resolved), `metrics.jsonl` (one JSON row per
report), `ckpt.pt` (atomic; a re-run resumes from it), `recon.png` (originals above their
reconstructions from hard codes), `curves.png`, and at the end `tokenizer.pt`, which
`tokenizer.kind: dvae` loads. Reports: reconstruction NLL and PSNR, KL, temperature, KL
weight, codebook perplexity and the fraction of codes in use, and the PSNR of the
mean-image baseline for comparison.

The data stream is a pure function of (seed, step): batch b of step s is a slice of an
epoch permutation, each crop seeded by (seed, epoch, index), so a resumed run sees exactly
the batches an uninterrupted one would.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from beitfast import distributed  # noqa: E402
from beitfast.config import ConfigError, DVAEConfig, cli_config  # noqa: E402
from beitfast.data.images import BadImage, decode_rgb, list_imagefolder  # noqa: E402
from beitfast.runlog import atomic_save, read_checkpoint, reset_metrics  # noqa: E402
from beitfast.tokenizers.dvae import DVAE, DVAEArch  # noqa: E402

CKPT_FORMAT = "beitfast-dvae-ckpt/1"


# ----------------------------------------------------------------------------- data
class Images:
    """Decoded images of an ImageNet-layout split; bad files are skipped and reported."""

    def __init__(self, root: str, split: str, preload_side: int):
        self.root = Path(root)
        self.paths, _, self.classes = list_imagefolder(root, split)
        self.preload_side = preload_side
        self.bad: dict[str, str] = {}
        self.cache: dict[int, np.ndarray] = {}
        if preload_side:
            from beitfast.progress import progress_bar

            for i in progress_bar(range(len(self.paths)), desc=f"decoding {split}", unit="img", leave=False,
                          disable=not sys.stderr.isatty()):
                self.load(i)
        self.good = [i for i in range(len(self.paths)) if self.paths[i] not in self.bad]
        if not self.good:
            raise RuntimeError(f"no decodable images under {self.root / split}")

    def load(self, i: int) -> np.ndarray | None:
        if i in self.cache:
            return self.cache[i]
        try:
            img = decode_rgb((self.root / self.paths[i]).read_bytes(), self.paths[i])
        except BadImage as e:
            self.bad[self.paths[i]] = e.reason
            return None
        if self.preload_side:
            from PIL import Image

            h, w = img.shape[:2]
            s = self.preload_side / min(h, w)
            img = np.asarray(Image.fromarray(img).resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC))
            self.cache[i] = img
        return img


def random_resized_crop(img: np.ndarray, size: int, scale, rng: np.random.Generator) -> np.ndarray:
    """RandomResizedCrop (ratio 3/4..4/3, 10 tries then centre) + horizontal flip, bicubic."""
    from PIL import Image

    h, w = img.shape[:2]
    area = h * w
    for _ in range(10):
        a = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(a * r))), int(round(math.sqrt(a / r)))
        if 0 < cw <= w and 0 < ch <= h:
            y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            break
    else:
        ch = cw = min(h, w)
        y, x = (h - ch) // 2, (w - cw) // 2
    crop = Image.fromarray(img[y:y + ch, x:x + cw]).resize((size, size), Image.BICUBIC)
    out = np.asarray(crop)
    return out[:, ::-1] if rng.random() < 0.5 else out


def centre_crop(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return np.asarray(Image.fromarray(img[y:y + s, x:x + s]).resize((size, size), Image.BICUBIC))


class StepBatches(torch.utils.data.Dataset):
    """Item `step` is the batch this rank trains on at that step: a pure function of
    (seed, step, rank), so resuming at any step replays exactly the same data."""

    def __init__(self, images: Images, cfg: DVAEConfig, rank: int, world: int):
        self.im, self.cfg, self.rank, self.world = images, cfg, rank, world
        self.per_epoch = max(1, len(images.good) // (cfg.data.batch_size * world))

    def __len__(self):
        return self.cfg.train.steps

    def __getitem__(self, step: int) -> torch.Tensor:
        d, seed = self.cfg.data, self.cfg.train.seed
        epoch, k = divmod(step, self.per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(len(self.im.good))
        start = (k * self.world + self.rank) * d.batch_size
        out = []
        for j in perm[start:start + d.batch_size]:
            idx = self.im.good[j]
            img = self.im.load(idx)
            if img is None:  # became unreadable after the scan: take the next good one
                img = self.im.load(self.im.good[(j + 1) % len(self.im.good)])
            out.append(random_resized_crop(img, self.cfg.model.img_size, d.crop_scale,
                                           np.random.default_rng([seed, epoch, idx])))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()  # uint8 (B, 3, S, S)


# ----------------------------------------------------------------------------- schedules
def lr_at(step: int, cfg: DVAEConfig) -> float:
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    t = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
    return o.min_lr + 0.5 * (o.lr - o.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def temperature_at(step: int, cfg: DVAEConfig) -> float:
    """Cosine anneal temp_start -> temp_end over anneal_steps (0: all steps)."""
    t = cfg.train
    n = t.anneal_steps or t.steps
    x = min(1.0, step / max(1, n))
    return t.temp_end + 0.5 * (t.temp_start - t.temp_end) * (1 + math.cos(math.pi * x))


def kl_weight_at(step: int, cfg: DVAEConfig) -> float:
    t = cfg.train
    return t.kl_max * min(1.0, step / t.kl_warmup_steps) if t.kl_warmup_steps else t.kl_max


# ----------------------------------------------------------------------------- metrics
def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of [0, 1] images, averaged over the batch."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return float((-10 * torch.log10(mse)).mean())


def codebook_usage(codes: torch.Tensor, k: int) -> tuple[float, float]:
    """(perplexity of the code histogram, fraction of the k codes used at least once)."""
    hist = torch.bincount(codes.flatten(), minlength=k).float()
    p = hist / hist.sum()
    ent = -(p[p > 0] * p[p > 0].log()).sum()
    return float(ent.exp()), float((hist > 0).float().mean())


def save_grid(orig: torch.Tensor, recon: torch.Tensor, path: Path, n: int = 8) -> None:
    """Originals (top row) above their reconstructions (bottom row), as one PNG."""
    from PIL import Image

    pick = torch.linspace(0, orig.shape[0] - 1, min(n, orig.shape[0])).round().long()  # spread over classes
    rows = [torch.cat(list(t[pick].float().clamp(0, 1)), dim=2) for t in (orig, recon)]
    grid = (torch.cat(rows, dim=1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    s = max(1, 96 // orig.shape[-1])  # upscale tiny images so a person can see them
    im = Image.fromarray(grid).resize((grid.shape[1] * s, grid.shape[0] * s), Image.NEAREST)
    tmp = path.with_name(path.name + ".tmp.png")
    im.save(tmp)
    os.replace(tmp, path)


def save_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r["kind"] == "train"]
    ev = [r for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(1, 4, figsize=(16, 3.2))
    ax[0].plot([r["step"] for r in train], [r["nll"] for r in train])
    ax[0].set_title("reconstruction NLL / dim")
    ax[1].plot([r["step"] for r in ev], [r["psnr"] for r in ev], "o-", label="dVAE (hard codes)")
    if ev:
        ax[1].axhline(ev[0]["baseline_psnr"], color="gray", ls="--", label="mean image")
    ax[1].set_title("eval PSNR (dB)")
    ax[1].legend()
    ax[2].plot([r["step"] for r in train], [r["kl"] for r in train], label="KL / dim")
    ax[2].plot([r["step"] for r in train], [r["temperature"] for r in train], label="temperature")
    ax[2].legend()
    ax[3].plot([r["step"] for r in ev], [r["used_fraction"] for r in ev], "o-")
    ax[3].set_title("fraction of codebook used (eval)")
    for a in ax:
        a.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path.with_name(path.name + ".tmp.png"), dpi=80)
    plt.close(fig)
    os.replace(path.with_name(path.name + ".tmp.png"), path)


# ----------------------------------------------------------------------------- main
# ----------------------------------------------------------------------------- the run, as named steps
@dataclass
class Run:
    """What the steps of one run share (main: data, model, resume, loop, finish)."""

    cfg: DVAEConfig
    world: int
    rank: int
    device: torch.device
    out: Path
    train_im: Images | None = None
    val_im: Images | None = None
    eval_x: torch.Tensor | None = None  # the fixed eval batch, (N, 3, S, S) in [0, 1] on the device
    baseline_psnr: float = 0.0  # the mean training image's PSNR on it
    arch: DVAEArch | None = None
    model: DVAE | None = None
    ema: DVAE | None = None
    ddp: torch.nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    step: int = 0
    rows: list = field(default_factory=list)  # the metrics rows (rank 0)

    @property
    def main_proc(self) -> bool:
        return self.rank == 0

    @property
    def final(self) -> DVAE:
        return self.ema if self.ema is not None else self.model


def open_data(r: Run) -> None:
    """The data step: both splits scanned, the fixed eval batch (evenly spaced over the sorted
    split, so every class is in it) and the mean-image baseline's PSNR on it."""
    cfg = r.cfg
    r.train_im = Images(cfg.data.root, cfg.data.split, cfg.data.preload_side)
    r.val_im = Images(cfg.data.root, cfg.data.val_split, cfg.data.preload_side)
    ev_idx = r.val_im.good[:: max(1, len(r.val_im.good) // cfg.data.eval_images)][: cfg.data.eval_images]
    eval_x = torch.from_numpy(np.stack([centre_crop(r.val_im.load(i), cfg.model.img_size) for i in ev_idx]))
    r.eval_x = eval_x.permute(0, 3, 1, 2).float().div(255).to(r.device)
    mean_idx = r.train_im.good[:: max(1, len(r.train_im.good) // 512)]
    mean_img = torch.from_numpy(np.stack([centre_crop(r.train_im.load(i), cfg.model.img_size)
                                          for i in mean_idx])).float().div(255).mean(0)
    r.baseline_psnr = psnr(r.eval_x.cpu(), mean_img.permute(2, 0, 1).expand_as(r.eval_x.cpu()))
    if r.main_proc and (r.train_im.bad or r.val_im.bad):
        bad = {**r.train_im.bad, **r.val_im.bad}
        print(f"[dvae] skipped {len(bad)} undecodable files, e.g. {next(iter(bad.items()))}")


def build_model(r: Run) -> None:
    """The model step: the dVAE, its EMA copy (optim.ema > 0) and AdamW."""
    m, o = r.cfg.model, r.cfg.optim
    r.arch = DVAEArch(vocab_size=m.vocab_size, n_hid=m.n_hid, n_init=m.n_init, n_blk_per_group=m.n_blk_per_group,
                      downsample=m.downsample, likelihood=m.likelihood)
    r.model = DVAE(r.arch).to(r.device)
    r.ema = copy.deepcopy(r.model).requires_grad_(False) if o.ema > 0 else None
    r.opt = torch.optim.AdamW(r.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)


def resume(r: Run, fresh: bool) -> None:
    """The resume step: model, optimizer, EMA, step and every rank's RNG streams from out/ckpt.pt
    unless `fresh`; the metrics log cut back to that step; the DDP wrapper. Raises ValueError
    naming the file for a checkpoint that cannot be used."""
    path = r.out / "ckpt.pt"
    if path.exists() and not fresh:
        ck = read_checkpoint(path, CKPT_FORMAT, "use --fresh to start over")
        r.model.load_state_dict(ck["model"])
        r.opt.load_state_dict(ck["opt"])
        if r.ema is not None:
            r.ema.load_state_dict(ck["ema"])
        r.step = ck["step"]
        try:
            distributed.restore_rng(ck["rng"], r.rank, r.world, r.device)
        except distributed.WorldSizeChanged as e:
            raise ValueError(f"{path}: {e}") from None
        if r.main_proc:
            print(f"[dvae] resumed from {path} at step {r.step}")
    r.ddp = torch.nn.parallel.DistributedDataParallel(r.model) if r.world > 1 else r.model
    r.rows = reset_metrics(r.out / "metrics.jsonl", r.step) if r.main_proc else []


def batches(r: Run):
    """This rank's batches from step r.step on (uint8 on the host)."""
    cfg = r.cfg
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(StepBatches(r.train_im, cfg, r.rank, r.world), range(r.step, cfg.train.steps)),
        batch_size=None, shuffle=False, num_workers=cfg.data.workers, persistent_workers=False,
        prefetch_factor=4 if cfg.data.workers else None,
        # its own generator: starting an iterator otherwise draws from the global RNG, which
        # would shift the Gumbel noise of a resumed run against an uninterrupted one
        generator=torch.Generator().manual_seed(cfg.train.seed))


def train_step(r: Run, x: torch.Tensor, amp, acc: torch.Tensor, code_hist: torch.Tensor) -> dict:
    """One optimizer step at r.step's temperature, KL weight and lr (the EMA follows); sums the
    step's nll, kl and soft PSNR into `acc` and its argmax codes into `code_hist` on the device."""
    cfg = r.cfg
    tau, beta, lr = temperature_at(r.step, cfg), kl_weight_at(r.step, cfg), lr_at(r.step, cfg)
    for g in r.opt.param_groups:
        g["lr"] = lr
    with amp() if amp is not None else contextlib.nullcontext():
        o = r.ddp(x, tau, beta)
    r.opt.zero_grad(set_to_none=True)
    o["loss"].backward()
    if cfg.optim.clip_grad:
        torch.nn.utils.clip_grad_norm_(r.model.parameters(), cfg.optim.clip_grad)
    r.opt.step()
    with torch.no_grad():
        if r.ema is not None:
            torch._foreach_lerp_(list(r.ema.parameters()), list(r.model.parameters()), 1 - cfg.optim.ema)
        acc += torch.stack([o["nll"].detach(), o["kl"].detach(), torch.tensor(psnr(o["recon"], x), device=r.device)])
        code_hist += torch.bincount(o["logits"].argmax(1).flatten(), minlength=r.arch.vocab_size)
    return {"temperature": tau, "kl_weight": beta, "lr": lr}


def train_row(r: Run, acc: torch.Tensor, code_hist: torch.Tensor, n: int, seconds: float, sched: dict) -> dict:
    """The report of the last `n` steps (averaged over ranks): the one host sync per report."""
    if r.world > 1:
        dist.all_reduce(acc)
        dist.all_reduce(code_hist)
        acc /= r.world
    a = (acc / n).tolist()
    p = code_hist / code_hist.sum()
    train_ppl = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return {"kind": "train", "step": r.step, "nll": round(a[0], 5), "kl": round(a[1], 5),
            "train_psnr_soft": round(a[2], 3), "temperature": round(sched["temperature"], 4),
            "kl_weight": round(sched["kl_weight"], 4), "lr": sched["lr"], "perplexity": round(train_ppl, 2),
            "used_fraction": round(float((code_hist > 0).float().mean()), 4),
            "img_per_s": round(n * r.cfg.data.batch_size * r.world / seconds, 1)}


def evaluate(r: Run, net: DVAE) -> dict:
    """Hard-code reconstructions of the eval batch: PSNR against the baseline's, codebook use; recon.png."""
    net.eval()
    codes, recon = net.reconstruct_hard(r.eval_x)
    net.train()
    ppl, used = codebook_usage(codes, r.arch.vocab_size)
    save_grid(r.eval_x.cpu(), recon.cpu(), r.out / "recon.png")
    return {"kind": "eval", "step": r.step, "psnr": round(psnr(recon, r.eval_x), 3),
            "baseline_psnr": round(r.baseline_psnr, 3), "perplexity": round(ppl, 2), "used_fraction": round(used, 4)}


def checkpoint(r: Run) -> None:
    rng = distributed.rng_states(r.world, r.device)
    if r.main_proc:
        atomic_save({"format": CKPT_FORMAT, "model": r.model.state_dict(), "opt": r.opt.state_dict(),
                     "ema": r.ema.state_dict() if r.ema is not None else None, "step": r.step, "rng": rng,
                     "config": r.cfg.to_dict()}, r.out / "ckpt.pt")


def log(r: Run, row: dict) -> None:
    r.rows.append(row)
    with open(r.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def loop(r: Run, stop_at: int) -> bool:
    """The steps from r.step to train.steps with their reports, evals and checkpoints; True when
    it stopped early at `stop_at` (after that step's checkpoint)."""
    from beitfast.progress import progress_bar

    cfg = r.cfg
    bar = progress_bar(total=cfg.train.steps, initial=r.step, desc="dvae", unit="step",
                       disable=not (r.main_proc and cfg.log.progress))
    amp = partial(torch.autocast, "cuda", dtype=torch.bfloat16) \
        if r.device.type == "cuda" and cfg.train.precision == "bf16" else None
    acc = torch.zeros(3, device=r.device)  # nll, kl, psnr sums since the last report (no host sync)
    code_hist = torch.zeros(r.arch.vocab_size, device=r.device)
    n_acc, t0 = 0, time.time()
    r.model.train()
    try:
        for x in batches(r):
            sched = train_step(r, x.to(r.device, non_blocking=True).float().div_(255), amp, acc, code_hist)
            n_acc += 1
            r.step += 1
            bar.update()
            end = r.step == cfg.train.steps
            if r.step % cfg.log.every == 0 or end:
                row = train_row(r, acc, code_hist, n_acc, time.time() - t0, sched)
                if r.main_proc:
                    log(r, row)
                    bar.set_postfix(nll=row["nll"], psnr=row["train_psnr_soft"], ppl=row["perplexity"])
                acc.zero_()
                code_hist.zero_()
                n_acc, t0 = 0, time.time()
            if r.main_proc and (r.step % cfg.log.eval_every == 0 or end):
                log(r, evaluate(r, r.final))
            if r.step % cfg.log.ckpt_every == 0 or end:
                checkpoint(r)
                if stop_at and r.step >= stop_at:
                    return True
    finally:
        bar.close()
    return False


def finish(r: Run) -> None:
    """tokenizer.pt (the EMA weights when kept), curves.png, the summary line (rank 0)."""
    out = r.out
    atomic_save(r.final.export(r.cfg.model.img_size), out / "tokenizer.pt")
    save_curves(r.rows, out / "curves.png")
    last = [x for x in r.rows if x["kind"] == "eval"][-1]
    summary = {"tokenizer": str(out / "tokenizer.pt"), "steps": r.step, **{k: last[k] for k in
               ("psnr", "baseline_psnr", "perplexity", "used_fraction")}, "vocab_size": r.arch.vocab_size,
               "skipped_files": len(r.train_im.bad) + len(r.val_im.bad)}
    print(f"[dvae] eval PSNR {last['psnr']:.2f} dB vs mean-image baseline {last['baseline_psnr']:.2f} dB; "
          f"codebook perplexity {last['perplexity']:.1f}, {100 * last['used_fraction']:.1f}% of "
          f"{r.arch.vocab_size} codes used; tokenizer -> {out / 'tokenizer.pt'}, grid -> {out / 'recon.png'}")
    print(json.dumps(summary))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=True)
    ap.add_argument("--stop-at", type=int, default=0,
                    help="exit right after the checkpoint at this step, as if killed (for resume tests)")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    args, rest = ap.parse_known_args(argv)
    try:
        cfg = cli_config(rest, default="dvae_tiny.yaml", schema=DVAEConfig)
    except ConfigError as e:
        print(f"train_dvae: config error: {e}", file=sys.stderr)
        return 2
    started = distributed.start_run(cfg, "train_dvae")
    if started is None:
        return 2
    r = Run(cfg, *started)
    open_data(r)
    build_model(r)
    try:
        resume(r, args.fresh)
    except ValueError as e:
        print(f"train_dvae: {e}", file=sys.stderr)
        return 2
    if loop(r, args.stop_at):
        if r.main_proc:
            print(f"[dvae] stopped at step {r.step} as asked (--stop-at); re-run to resume")
    elif r.main_proc:
        finish(r)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
