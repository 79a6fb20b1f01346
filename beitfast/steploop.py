"""The training loop that fine-tuning (beitfast/finetune.py) and segmentation
(beitfast/segment.py) share: per-group lr scaling, gradient accumulation under DDP's
`no_sync`, the GradScaler, the train log, evaluation and checkpoint cadence, timed
checkpoints and preemption (beitfast/preempt.py). A plain function: what differs between the
two jobs comes in as arguments (the loss, the schedule, when to evaluate and what a checkpoint
holds); pretraining keeps its own loop (beitfast/train.py), whose step is a different shape.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from beitfast import preempt
from beitfast.config import ConfigError
from beitfast.distributed import rng_states
from beitfast.precision import amp_dtype
from beitfast.runlog import atomic_save, reset_metrics, resume_job


def accumulation(global_batch: int, batch: int, world: int) -> int:
    """Micro-batches a step accumulates so that `batch` a process x `world` processes make
    `global_batch`; a global batch that is not such a product is a config error."""
    accum = global_batch // (batch * world)
    if accum < 1 or accum * batch * world != global_batch:
        raise ConfigError(f"train.global_batch ({global_batch}) must be data.batch_size ({batch}) x "
                          f"{world} process(es) x a whole number of accumulation steps")
    return accum


def autocast(precision: str, device: torch.device):
    """A factory of the autocast context of a resolved precision (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext
    return partial(torch.autocast, device.type, dtype=amp_dtype(precision))


def resume_run(out: Path, fmt: str, global_batch: int, model: nn.Module, opt, scaler, rank: int, world: int,
               device: torch.device, counter: str) -> tuple[dict | None, int, nn.Module]:
    """(the checkpoint out/ckpt.pt resumed from or None, its `counter` (0 when new), the model to
    step: DDP's wrapper when world > 1). Rank 0 cuts metrics.jsonl back to that step and takes a
    preemption marker away."""
    ck = resume_job(out / "ckpt.pt", fmt, global_batch, {"model": model, "optimizer": opt, "scaler": scaler},
                    rank, world, device)
    start = ck[counter] if ck is not None else 0
    if rank == 0:
        reset_metrics(out / "metrics.jsonl", start)
        preempt.clear(out)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return ck, start, net


class _Log:
    """Rank 0's metrics.jsonl rows and the progress bar's messages; other ranks write nothing."""

    def __init__(self, path: Path, bar, on: bool):
        self.f, self.bar = (open(path, "a") if on else None), bar

    def row(self, row: dict) -> None:
        if self.f is not None:
            self.f.write(json.dumps(row) + "\n")
            self.f.flush()

    def say(self, msg: str) -> None:
        if self.f is not None:
            self.bar.write(msg)

    def close(self) -> None:
        if self.f is not None:
            self.f.close()


def train_steps(*, prog: str, unit: str, out: Path, rank: int, world: int, device: torch.device,
                net: nn.Module, model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                lr_scales: list[float], lr_at: Callable[[int], float], batches: Iterator, accum: int,
                loss_of: Callable, autocast_ctx, global_batch: int, start: int, total: int, stop_at: int,
                report_due: Callable[[int], bool], eval_due: Callable[[int], bool], ckpt_due: Callable[[int], bool],
                evaluate: Callable[[int], tuple[dict, str]], checkpoint: Callable[[int, list], dict],
                train_row: Callable[[int], dict] = lambda step: {}, prepare: Callable | None = None,
                clip_grad: float = 0.0, ckpt_every_minutes: float = 0.0,
                progress: bool = True) -> tuple[int, bool]:
    """Steps `start` .. `total` (or `stop_at`, when set). A step: lr = lr_at(step) x the group's
    scale; `accum` micro-batches x, y = next(batches), (x, y) = prepare(x, y, step, micro) outside
    autocast, loss = loss_of(net, x, y) under it, backward of loss / accum (DDP syncs on the last
    micro-batch only); gradient clipping, the scaler's step. After step s (1-based): a train row
    ({"kind": "train", "step": s, **train_row(s), loss, lr, images_per_s}) when report_due(s) or at
    the end, one host sync each; evaluate(s) -> (row, message) when eval_due(s) or at the end;
    the checkpoint checkpoint(s, every rank's RNG states) -> state, written by rank 0 to
    out/ckpt.pt when ckpt_due(s), at the end, at stop_at, on the timer or on a preemption signal.
    Returns (the last step, whether a signal stopped the run: the caller exits 3)."""
    from beitfast.progress import progress_bar

    bar = progress_bar(total=total, initial=start, desc=prog, unit=unit, disable=rank != 0 or not progress)
    log = _Log(out / "metrics.jsonl", bar, rank == 0)
    pre = preempt.Preemption(prog, world, device, ckpt_every_minutes, verbose=rank == 0)
    win_loss, win_steps, t0 = torch.zeros((), device=device), 0, time.perf_counter()
    step = start
    net.train()
    try:
        while step < total:
            lr = lr_at(step)
            for g, s in zip(opt.param_groups, lr_scales):
                g["lr"] = lr * s
            for micro in range(accum):
                x, y = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if prepare is not None:
                    x, y = prepare(x, y, step, micro)
                sync = contextlib.nullcontext() if micro == accum - 1 or world == 1 else net.no_sync()
                with sync:
                    with autocast_ctx():
                        loss = loss_of(net, x, y)
                    scaler.scale(loss / accum).backward()
                win_loss += loss.detach().float() / accum
            if clip_grad:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            win_steps += 1
            bar.update()
            last = step == total
            report = report_due(step) or last
            if report:
                loss_v = win_loss.item() / win_steps
                if not math.isfinite(loss_v):
                    raise FloatingPointError(f"the loss is {loss_v} at {unit} {step}; lower optim.lr")
                row = {"kind": "train", "step": step, **train_row(step), "loss": round(loss_v, 5), "lr": lr,
                       "images_per_s": round(win_steps * global_batch / (time.perf_counter() - t0), 2)}
                log.row(row)
                bar.set_postfix(loss=f"{loss_v:.3f}", img_s=row["images_per_s"])
                win_loss, win_steps, t0 = torch.zeros((), device=device), 0, time.perf_counter()
            if eval_due(step) or last:
                row, msg = evaluate(step)
                log.row(row)
                log.say(msg)
            stop, timed = pre.poll(step, force=report)
            if ckpt_due(step) or last or step == stop_at or timed:
                state = checkpoint(step, rng_states(world, device))
                if rank == 0:
                    atomic_save(state, out / "ckpt.pt")
                pre.saved()
            if stop:
                if rank == 0:
                    preempt.announce(prog, out, step, unit, pre.requested)
                return step, True
            if step == stop_at:
                break
    finally:
        pre.close()
        bar.close()
        log.close()
    return step, False
