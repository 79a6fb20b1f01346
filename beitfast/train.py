"""BEiT pretraining: masked image modeling on cached tokens.

    torchrun --nproc_per_node=8 beitfast/train.py --cfg base.yaml [section.key=value ...]
    python beitfast/train.py --cfg tiny.yaml data.cache=runs/demo/cache     (CPU)

Reads in data-flow order: config -> distributed setup -> data -> model -> optimizer ->
loop -> checkpoints. Writes to log.out_dir: config.yaml (resolved), metrics.jsonl, ckpt.pt
(atomic; `['model']` holds the reference key names; a re-run resumes from it).
"""
from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from beitfast import distributed
from beitfast.config import ConfigError, cli_config
from beitfast.data.cache import CacheError, TokenCache, expected_settings
from beitfast.data.loader import CachedViewLoader
from beitfast.data.prefetch import prefetch
from beitfast.model import Beit, BeitArgs
from beitfast.runlog import atomic_save, read_checkpoint, reset_metrics

CKPT_FORMAT = "beitfast-pretrain-ckpt/1"


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warmup from 0, then cosine to min_lr (per step, as the reference)."""
    if step < warmup:
        return lr * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def param_groups(model: Beit, weight_decay: float) -> list[dict]:
    """No decay for 1-D parameters (biases, norms, gammas, q/v biases), cls_token and
    pos_embed (REFERENCE.md section 4); like the reference, mask_token and the rel-pos table
    are decayed."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_table = name.endswith("relative_position_bias_table")
        (no_decay if (p.ndim == 1 or name in skip) and not is_table else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(groups, o, device):
    if o.fused in ("auto", "apex"):
        try:
            from apex.optimizers import FusedAdam

            if device.type == "cuda":
                return FusedAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps, adam_w_mode=True)
        except ImportError:
            if o.fused == "apex":
                raise RuntimeError("optim.fused=apex but Apex is not installed (see README)") from None
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)


def start_profiler(where, steps: int, cuda: bool):
    """torch.profiler over `steps` optimizer steps after 1 skipped and 2 warm-up ones; writes
    where/trace.json (chrome://tracing or Perfetto) and where/ops.txt (ops by total time)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    where.mkdir(parents=True, exist_ok=True)

    def done(p):
        p.export_chrome_trace(str(where / "trace.json"))
        key = "cuda_time_total" if cuda else "cpu_time_total"
        (where / "ops.txt").write_text(p.key_averages().table(sort_by=key, row_limit=40))
        print(f"[train] profile of {steps} steps written to {where} (trace.json, ops.txt)")

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    p = profile(activities=acts, schedule=schedule(wait=1, warmup=2, active=steps, repeat=1), on_trace_ready=done)
    p.start()
    return p


def main(argv=None) -> int:
    # --- config
    argv = list(sys.argv[1:] if argv is None else argv)
    stop_at = 0  # --stop-at N: exit after the checkpoint at step N, as if killed (resume tests)
    if "--stop-at" in argv:
        i = argv.index("--stop-at")
        stop_at = int(argv[i + 1])
        del argv[i:i + 2]
    try:
        cfg = cli_config(argv)
    except ConfigError as e:
        print(f"train: config error: {e}", file=sys.stderr)
        return 2
    if not cfg.data.cache:
        print("train: data.cache is empty: build a token cache with data_prep/tokenize_imagenet.py and pass "
              "data.cache=DIR", file=sys.stderr)
        return 2

    started = distributed.start_run(cfg, "train")
    if started is None:
        return 2
    world, rank, device, out = started
    cuda = device.type == "cuda"
    main_proc = rank == 0

    # --- data
    per_pass = cfg.data.batch_size * world
    if cfg.train.global_batch % per_pass:
        print(f"train: train.global_batch ({cfg.train.global_batch}) must be a multiple of data.batch_size "
              f"({cfg.data.batch_size}) x {world} processes; the difference is made up by gradient accumulation",
              file=sys.stderr)
        return 2
    accum = cfg.train.global_batch // per_pass
    if cfg.data.backend == "ffcv":
        print("train: data.backend=ffcv is not built yet; use data.backend=dali or reference", file=sys.stderr)
        return 2
    if main_proc:
        print(f"[train] {world} process(es) x data.batch_size {cfg.data.batch_size} x {accum} accumulation "
              f"step(s) = global batch {cfg.train.global_batch}; loader: cached views rendered through DALI on the "
              f"{'GPU' if cuda else 'CPU'}, {cfg.data.prefetch} batches ahead in a thread"
              + (" (the DALI GPU pipeline with its own queues is not built yet)" if cfg.data.backend == "dali" else ""))
    try:
        cache = TokenCache(cfg.data.cache)
        cache.check(expected_settings(cfg, cache.settings["tokenizer"]))
        if cache.settings["tokenizer"]["vocab_size"] != cfg.model.vocab_size:
            raise CacheError(f"{cache.path}: tokenizer vocabulary {cache.settings['tokenizer']['vocab_size']} "
                             f"!= model.vocab_size {cfg.model.vocab_size}")
        loader = CachedViewLoader(cache, cfg, rank, world, device, accum)
    except (CacheError, ValueError) as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    steps_per_epoch = loader.steps_per_epoch
    total = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    warmup = int(cfg.optim.warmup_epochs * steps_per_epoch)

    # --- model, optimizer
    model = Beit(BeitArgs.from_config(cfg.model)).to(device)
    opt = build_optimizer(param_groups(model, cfg.optim.weight_decay), cfg.optim, device)
    step = 0
    ckpt_path = out / "ckpt.pt"
    if ckpt_path.exists():
        try:
            ck = read_checkpoint(ckpt_path, CKPT_FORMAT, "move it away to start over")
        except ValueError as e:
            print(f"train: {e}", file=sys.stderr)
            return 2
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step = ck["step"]
        torch.set_rng_state(ck["rng"][rank] if rank < len(ck["rng"]) else ck["rng"][0])
        if main_proc:
            print(f"[train] resumed from {ckpt_path} at step {step}")
    if main_proc:
        reset_metrics(out / "metrics.jsonl", step)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    fwd = ddp
    if cfg.train.compile:  # the static mask budget keeps the step one graph (no data-dependent shapes)
        fwd = torch.compile(ddp)
        if main_proc:
            print("[train] model step compiled with torch.compile (first steps include compilation)")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision) if cuda else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    def checkpoint(at: int) -> None:
        rng = distributed.rng_states(world)
        if main_proc:
            atomic_save({"format": CKPT_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "step": at, "epoch": at // steps_per_epoch, "rng": rng, "config": cfg.to_dict()}, ckpt_path)

    # --- loop
    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, desc="pretrain", unit="step", disable=not (main_proc and cfg.log.progress))
    acc = torch.zeros(3, device=device)  # loss sum, correct, masked: reduced every log.every steps
    n_acc, t0 = 0, time.time()
    model.train()
    ckpt_every = max(1, cfg.log.ckpt_every_epochs * steps_per_epoch)
    prof = start_profiler(out / "profile", cfg.log.profile_steps, cuda) if (main_proc and cfg.log.profile_steps) else None
    while step < total:
        epoch = step // steps_per_epoch
        micro = prefetch(loader.epoch(epoch, start_step=step % steps_per_epoch), cfg.data.prefetch, device)
        for _ in range(step % steps_per_epoch, steps_per_epoch):
            lr = lr_at(step, total, warmup, cfg.optim.lr, cfg.optim.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            for m in range(accum):  # DDP averages over ranks; dividing by accum averages over micro-batches
                batch = next(micro)
                with ddp.no_sync() if (world > 1 and m < accum - 1) else nullcontext():
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        o = fwd(batch["images"], batch["mask"], batch["tokens"], cfg.mask.num_patches)
                    loss = o["loss"] / accum if accum > 1 else o["loss"]
                    (scaler.scale(loss) if scaler is not None else loss).backward()
                acc += torch.stack([loss.detach().float(), o["correct"].float(), o["n_masked"].float()])
            if scaler is not None:
                scaler.unscale_(opt)
            if cfg.optim.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            n_acc += 1
            step += 1
            bar.update()
            if prof is not None:
                prof.step()
            if step % cfg.log.every == 0 or step == total:
                if world > 1:
                    dist.all_reduce(acc)
                loss_sum, correct, masked = acc.tolist()  # the one host sync per report
                row = {"step": step, "epoch": epoch, "loss": round(loss_sum / (n_acc * world), 5),
                       "mim_acc": round(correct / max(1.0, masked), 5), "lr": lr,
                       "images_per_s": round(n_acc * cfg.train.global_batch / (time.time() - t0), 2)}
                if main_proc:
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(row) + "\n")
                    bar.set_postfix(loss=row["loss"], acc=row["mim_acc"])
                acc.zero_()
                n_acc, t0 = 0, time.time()
            if step % ckpt_every == 0 or step == total or step == stop_at:
                checkpoint(step)
            if step >= total or step == stop_at:
                break
        micro.close()  # stops the prefetch thread now, not when the generator is collected
        if stop_at and step == stop_at:
            break
    bar.close()
    if prof is not None:
        prof.stop()
    if main_proc:
        print(f"[train] {step} steps done; checkpoint {ckpt_path}, metrics {out / 'metrics.jsonl'}")
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
