"""BEiT pretraining: masked image modeling on cached tokens.

    torchrun --nproc_per_node=8 beitfast/train.py --cfg base.yaml [section.key=value ...]
    python beitfast/train.py --cfg tiny.yaml data.cache=runs/demo/cache     (CPU)

Reads in data-flow order: config -> start-up checks -> distributed setup -> data -> model ->
optimizer -> loop -> checkpoints. Writes to log.out_dir: config.yaml (resolved), metrics.jsonl
(a row every log.every steps), TensorBoard event files (log.tensorboard), ckpt.pt (atomic;
`['model']` holds the reference key names; a re-run resumes from it exactly).

Exit codes: 0 done; 1 the run failed in the loop (the message is the last line on stderr,
the last good checkpoint is kept); 2 it could not start (config, cache, checkpoint); 3 stopped
by SIGTERM or SIGUSR1 after finishing its step and writing its checkpoint: run it again to
resume (beitfast/preempt.py; log.ckpt_every_minutes bounds what a hard kill loses).
"""
from __future__ import annotations

import importlib.util
import json
import math
import resource
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numba
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runs from a bare checkout (no pip install)
import kernels  # noqa: E402
from beitfast import distributed, preempt, selfcheck  # noqa: E402
from beitfast.config import ConfigError, cli_config  # noqa: E402
from beitfast.data.cache import CacheError, TokenCache  # noqa: E402
from beitfast.data.loader import build_loader, resolve_backend, thread_plan  # noqa: E402
from beitfast.data.render import one_line  # noqa: E402
from beitfast.model import Beit, BeitArgs  # noqa: E402
from beitfast.preempt import EXIT_PREEMPTED, Preemption  # noqa: E402
from beitfast.runlog import atomic_save, read_checkpoint, reset_metrics  # noqa: E402
from beitfast.steploop import autocast  # noqa: E402

CKPT_FORMAT = "beitfast-pretrain-ckpt/2"  # 2: per-rank CPU and CUDA RNG states, world size, loss scaler


class StartError(Exception):
    """The run cannot start as configured; the message says why and what to do."""


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm stopped being finite."""


class LoopFailure(Exception):
    """Anything that went wrong once training had started (the cause is chained)."""

    def __init__(self, step: int):
        super().__init__(f"failed at step {step}")
        self.step = step


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """The reference's per-step schedule (unilm `cosine_scheduler`): warm-up linspace(0, lr,
    warmup), which reaches lr at step warmup - 1, then cosine from lr at step `warmup` towards
    min_lr at step `total`."""
    if step < warmup:
        return lr * step / (warmup - 1) if warmup > 1 else 0.0
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def param_groups(model: Beit, weight_decay: float) -> list[dict]:
    """The reference's rule: no decay for 1-D parameters (biases, norms, gammas, q/v biases)
    and the model's no_weight_decay() names (cls_token, pos_embed); the mask token and the
    rel-pos table (2-D and up) are decayed."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim == 1 or name.endswith(".bias") or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _apex_fused_adam():
    try:
        from apex.optimizers import FusedAdam

        return FusedAdam
    except ImportError:
        return None


def optimizer_choice(choice: str, device: torch.device) -> str:
    """optim.fused: auto = Apex FusedAdam on CUDA when installed, else torch's fused AdamW;
    apex / torch force one; none is torch's AdamW unfused (the reference's). Refuses an
    impossible choice naming the key."""
    have_apex, cuda = _apex_fused_adam() is not None, device.type == "cuda"
    if choice == "apex" and not (have_apex and cuda):
        raise ConfigError(f"optim.fused=apex needs NVIDIA Apex on a CUDA device (Apex installed: {have_apex}, "
                          f"device: {device}); optim.fused=auto uses it when it is there")
    if choice == "none":  # torch's AdamW without fusion, as the reference
        return "none"
    return "apex" if choice == "apex" or (choice == "auto" and have_apex and cuda) else "torch"


def build_optimizer(groups, o, device):
    choice = optimizer_choice(o.fused, device)
    if choice == "apex":
        return _apex_fused_adam()(groups, lr=o.lr, betas=o.betas, eps=o.eps, adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=choice == "torch")


def check_choices(cfg, device: torch.device) -> dict:
    """Start-up checks of the choices only this machine can judge; a ConfigError names the
    key. Returns what they resolve to (for the start line)."""
    try:
        kernel_impls = kernels.policy(cfg.model.kernels, device)
    except RuntimeError as e:
        raise ConfigError(f"model.kernels={cfg.model.kernels}: {e}") from None
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("log.tensorboard=true needs the tensorboard package (pip install tensorboard)")
    if cfg.model.attention == "flex" and device.type != "cuda":
        raise ConfigError("model.attention=flex needs a CUDA device to train (torch has no FlexAttention backward "
                          "on CPU); use model.attention=sdpa")
    return {"kernels": kernel_impls, "optimizer": optimizer_choice(cfg.optim.fused, device)}


def configured_tokenizer(cfg) -> dict | None:
    """The identity (kind, weights checksum, sizes, precision) of the tokenizer the config names,
    or None when its weights are not on this machine (the cache's tokens then go unchecked)."""
    if not cfg.tokenizer.path or not Path(cfg.tokenizer.path).exists():
        return None
    from beitfast.tokenizers import build_tokenizer

    try:
        return build_tokenizer(cfg.tokenizer, cfg.data.tokenizer_img_size, "cpu").identity
    except (ValueError, ImportError) as e:
        raise StartError(f"tokenizer.path={cfg.tokenizer.path}: {e}") from None


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


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: allocated on the GPU, or the process's maximum resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@dataclass
class Run:
    """What the named steps of a pretraining run share, filled in data-flow order by pretrain():
    open_data (loader, accumulation, schedule), build_model (model, optimizer, precision),
    resume (step, DDP wrapper). A record, not a trainer: the steps are plain functions."""
    cfg: object
    world: int
    rank: int
    device: torch.device
    out: Path
    loader: object = None
    accum: int = 1
    steps_per_epoch: int = 0
    total: int = 0
    warmup: int = 0
    model: Beit | None = None
    ddp: torch.nn.Module | None = None
    fwd: object = None  # ddp, or torch.compile(ddp)
    opt: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    autocast: object = None  # the autocast context factory of the resolved precision (steploop.autocast)
    step: int = 0
    last_good: int | None = None  # the step of the checkpoint on disk

    @property
    def main_proc(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_path(self) -> Path:
        return self.out / "ckpt.pt"


def open_data(r: Run) -> dict:
    """The data step: the accumulation that makes the global batch, the token cache checked
    against the config (or, online, the tokenizer's weights), the start-up self-check of the
    fast paths, this rank's threads and the loader; the schedule's lengths. Returns what the
    start line says."""
    cfg, world = r.cfg, r.world
    resolved = check_choices(cfg, r.device)
    per_pass = cfg.data.batch_size * world
    if cfg.train.global_batch % per_pass:
        raise ConfigError(f"train.global_batch ({cfg.train.global_batch}) must be a multiple of data.batch_size "
                          f"({cfg.data.batch_size}) x {world} processes; the difference is made up by gradient "
                          f"accumulation")
    r.accum = cfg.train.global_batch // per_pass
    online = cfg.data.targets == "online"
    cache = tokenizer = None
    if online:  # the original recipe: no cache; the tokenizer runs on this device every step
        if not cfg.tokenizer.path or not Path(cfg.tokenizer.path).exists():
            raise ConfigError(f"data.targets=online tokenizes every step: tokenizer.path="
                              f"{cfg.tokenizer.path or '(empty)'} must name the tokenizer's weights")
    elif not cfg.data.cache:
        raise ConfigError("data.cache is empty: build a token cache with data_prep/tokenize_imagenet.py and pass "
                          "data.cache=DIR (or train with data.targets=online, the original recipe)")
    else:
        cache = TokenCache(cfg.data.cache)
        tokenizer = configured_tokenizer(cfg)
        cache.check_config(cfg, tokenizer)
    checked = []
    if cfg.train.self_check:  # the fast paths against their twins, on this device, before anything trains
        _, checked = selfcheck.startup_pretrain(cfg, r.device, cache, seed=cfg.train.seed)
        resolved = check_choices(cfg, r.device)  # model.kernels may have fallen back to torch
    threads, workers = thread_plan(cfg.data)  # this node's cores divided among its ranks, not multiplied
    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        r.loader = build_loader(cfg, cache, r.rank, world, r.device, r.accum, threads=threads, workers=workers)
    except (ValueError, FileNotFoundError, ImportError) as e:
        if not online:
            raise
        raise StartError(f"data.targets=online: {e}") from None
    r.steps_per_epoch = r.loader.steps_per_epoch
    r.total = cfg.train.epochs * r.steps_per_epoch
    if cfg.train.max_steps:
        r.total = min(r.total, cfg.train.max_steps)
    r.warmup = int(cfg.optim.warmup_epochs * r.steps_per_epoch)
    return {"resolved": resolved, "checked": checked, "threads": threads, "workers": workers, "cache": cache,
            "tokenizer": tokenizer, "online": online}


def say_start(r: Run, info: dict) -> None:
    """The start line (rank 0): the batch's make-up, the loader, kernels, optimizer, precision, targets."""
    cfg, online, cuda = r.cfg, info["online"], r.device.type == "cuda"
    if not r.main_proc:
        return
    print(f"[train] {r.world} process(es) x data.batch_size {cfg.data.batch_size} x {r.accum} accumulation "
          f"step(s) = global batch {cfg.train.global_batch}; loader: {resolve_backend(cfg.data)}"
          + (" (data.backend=auto; online targets render with the reference backend)"
             if online and cfg.data.backend == "auto" else "") + f" on the "
          f"{'GPU' if cuda else 'CPU'}, {info['threads']} thread(s) and {info['workers']} worker process(es) per "
          f"rank, {cfg.data.prefetch} batches ahead; kernels {info['resolved']['kernels']}; optimizer "
          f"{info['resolved']['optimizer']}; precision {cfg.train.precision}; targets "
          + (f"online ({cfg.tokenizer.kind} tokenizer on the {'GPU' if cuda else 'CPU'} every step, "
             f"{cfg.tokenizer.precision}, images from {cfg.data.root})" if online else f"from {cfg.data.cache}"))
    for note in info["checked"]:
        print(f"[train] {note}")
    if info["tokenizer"] is None and not online:
        tok = info["cache"].settings["tokenizer"]
        print(f"[train] note: tokenizer.path={cfg.tokenizer.path or '(empty)'} is not on this machine, so the "
              f"cache's tokenizer ({tok['kind']}, weights {tok['weights_sha256'][:12]}) is not checked against the "
              f"config")


def build_model(r: Run) -> None:
    """The model step: the BEiT, its optimizer over the reference's decay groups, the autocast
    dtype (None: fp32) and the fp16 GradScaler."""
    cfg = r.cfg
    r.model = Beit(BeitArgs.from_config(cfg.model)).to(r.device)
    r.opt = build_optimizer(param_groups(r.model, cfg.optim.weight_decay), cfg.optim, r.device)
    r.autocast = autocast(cfg.train.precision, r.device)
    r.scaler = torch.amp.GradScaler(r.device.type) if cfg.train.precision == "fp16" else None


def resume(r: Run) -> None:
    """The resume step: model, optimizer, scaler and every rank's RNG streams from out/ckpt.pt
    when it is there (refused when its global batch or world size differ, naming the fix); the
    metrics log cut back to the checkpoint's step; the DDP wrapper and torch.compile."""
    cfg, ckpt_path = r.cfg, r.ckpt_path
    if ckpt_path.exists():
        try:
            ck = read_checkpoint(ckpt_path, CKPT_FORMAT, "move it away to start over")
        except ValueError as e:
            raise StartError(str(e)) from None
        if ck["config"]["train"]["global_batch"] != cfg.train.global_batch:
            raise StartError(f"{ckpt_path} was trained with train.global_batch={ck['config']['train']['global_batch']}"
                             f", this config has {cfg.train.global_batch}: its steps would replay other images; "
                             f"resume with the same global batch or move the checkpoint away")
        try:
            distributed.restore_rng(ck["rng"], r.rank, r.world, r.device,
                                    reseed=cfg.train.seed * 1_000_003 + ck["step"] if cfg.train.allow_world_change
                                    else None)
        except distributed.WorldSizeChanged as e:
            raise StartError(f"{ckpt_path}: {e}, or set train.allow_world_change=true to go on with fresh per-rank "
                             f"random streams (the images and masks of every step stay the same)") from None
        r.model.load_state_dict(ck["model"])
        r.opt.load_state_dict(ck["optimizer"])
        if r.scaler is not None and ck.get("scaler"):
            r.scaler.load_state_dict(ck["scaler"])
        r.step = r.last_good = ck["step"]
        if r.main_proc:
            print(f"[train] resumed from {ckpt_path} at step {r.step}"
                  + (f" (written by {len(ck['rng'])} process(es); per-rank random streams reseeded)"
                     if len(ck["rng"]) != r.world else ""))
    if r.main_proc:
        reset_metrics(r.out / "metrics.jsonl", r.step)
        preempt.clear(r.out)
    r.ddp = torch.nn.parallel.DistributedDataParallel(
        r.model, find_unused_parameters=cfg.train.find_unused_parameters) if r.world > 1 else r.model
    r.fwd = r.ddp
    if cfg.train.compile:  # the static mask budget keeps the step one graph (no data-dependent shapes)
        r.fwd = torch.compile(r.ddp)
        if r.main_proc:
            print("[train] model step compiled with torch.compile (first steps include compilation)")


def save_checkpoint(r: Run, at: int) -> None:
    """out/ckpt.pt at step `at` (collective: every rank's RNG streams; rank 0 writes, atomically)."""
    rng = distributed.rng_states(r.world, r.device)
    if r.main_proc:
        atomic_save({"format": CKPT_FORMAT, "model": r.model.state_dict(), "optimizer": r.opt.state_dict(),
                     "scaler": r.scaler.state_dict() if r.scaler is not None else None, "step": at,
                     "epoch": at // r.steps_per_epoch, "world": r.world, "rng": rng, "config": r.cfg.to_dict()},
                    r.ckpt_path)
    r.last_good = at


class Window:
    """A report window's sums on the device (no host sync until the report): loss, correct,
    masked tokens, grad-norm sum, grad norms counted, non-finite steps; the host seconds spent
    waiting for batches; steps; start time; first step."""

    def __init__(self, device: torch.device, step: int):
        self.acc = torch.zeros(6, device=device)
        self.reset(step)

    def reset(self, step: int) -> None:
        self.acc.zero_()
        self.waited, self.steps, self.t0, self.first = 0.0, 0, time.time(), step + 1

    def non_finite(self, r: Run, last: int) -> NonFiniteError:
        kept = (f"{r.ckpt_path} (step {r.last_good}) is the last good checkpoint, kept as it was"
                if r.last_good is not None else "no checkpoint had been written yet")
        return NonFiniteError(f"non-finite loss or gradient norm in steps {self.first}..{last}; stopped without "
                              f"saving: {kept}. Lower optim.lr, lengthen optim.warmup_epochs or tighten "
                              f"optim.clip_grad")


def train_step(r: Run, batches, win: Window, lr: float) -> None:
    """One optimizer step: r.accum micro-batches (DDP syncs on the last), the gradient norm
    (clipped at optim.clip_grad), the scaler's or the optimizer's step; sums into `win`."""
    cfg, acc, scaler = r.cfg, win.acc, r.scaler
    for g in r.opt.param_groups:
        g["lr"] = lr
    for m in range(r.accum):  # DDP averages over ranks; dividing by accum averages over micro-batches
        t_wait = time.perf_counter()
        batch = next(batches)
        win.waited += time.perf_counter() - t_wait
        with r.ddp.no_sync() if (r.world > 1 and m < r.accum - 1) else nullcontext():
            with r.autocast():
                o = r.fwd(batch["images"], batch["mask"], batch["tokens"], cfg.mask.num_patches)
            loss = o["loss"] / r.accum if r.accum > 1 else o["loss"]
            (scaler.scale(loss) if scaler is not None else loss).backward()
        acc[:3] += torch.stack([loss.detach().float(), o["correct"].float(), o["n_masked"].float()])
        acc[5] += (~torch.isfinite(loss.detach())).float()
    if scaler is not None:
        scaler.unscale_(r.opt)
    params = [p for p in r.model.parameters() if p.grad is not None]
    gn = (torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_grad) if cfg.optim.clip_grad
          else torch.nn.utils.get_total_norm([p.grad for p in params]))
    finite = torch.isfinite(gn)
    acc[3] += torch.where(finite, gn, 0.0)
    acc[4] += finite.float()
    if scaler is not None:  # an overflowed step is skipped by the scaler, not an error
        scaler.step(r.opt)
        scaler.update()
    else:
        acc[5] += (~finite).float()
        r.opt.step()
    r.opt.zero_grad(set_to_none=True)
    if cfg.train.sync_each_step:  # as the reference logs: the host waits for every step
        loss.item()
    win.steps += 1


def report(r: Run, win: Window, lr: float, writer, bar) -> None:
    """The report after step r.step: the window's sums over every rank (the one host sync),
    a row of metrics.jsonl (and TensorBoard), the bar's figures; a non-finite step fails here."""
    if r.world > 1:
        dist.all_reduce(win.acc)
    loss_sum, correct, masked, gn_sum, gn_n, bad = win.acc.tolist()
    if bad:
        raise win.non_finite(r, r.step)
    dt, n = time.time() - win.t0, win.steps
    row = {"step": r.step, "epoch": (r.step - 1) // r.steps_per_epoch, "steps": n,
           "loss": round(loss_sum / (n * r.world), 5), "mim_acc": round(correct / max(1.0, masked), 5),
           "lr": lr, "grad_norm": round(gn_sum / max(1.0, gn_n), 5), "step_time_ms": round(1000 * dt / n, 2),
           "images_per_s": round(n * r.cfg.train.global_batch / dt, 2), "data_wait": round(win.waited / dt, 4),
           "peak_mem_mib": round(peak_memory_mib(r.device), 1)}
    if r.scaler is not None:
        row["loss_scale"] = r.scaler.get_scale()
    if r.main_proc:
        with open(r.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if writer is not None:
            for k, v in row.items():
                if k not in ("step", "epoch"):
                    writer.add_scalar(f"train/{k}", v, r.step)
        bar.set_postfix(loss=row["loss"], acc=row["mim_acc"], img_s=row["images_per_s"])
    win.reset(r.step)


def open_observers(r: Run):
    """(TensorBoard writer, memorisation probe, profiler): each None unless configured; rank 0 only."""
    cfg, writer, probe, prof = r.cfg, None, None, None
    if r.main_proc and cfg.log.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(r.out), purge_step=r.step + 1)  # a resumed run drops events past its checkpoint
    if cfg.log.mim_eval and r.main_proc:  # fixed views of the same images: the memorisation probe
        from beitfast.mim_eval import MimProbe, append_row

        try:
            probe = MimProbe(cfg, r.device)
        except ValueError as e:  # CacheError included
            raise StartError(str(e)) from None
        reset_metrics(r.out / "mim_eval.jsonl", r.step)
        if r.step == 0:
            append_row(r.out / "mim_eval.jsonl", {"step": 0, "epoch": 0, **probe(r.model)})
    if r.main_proc and cfg.log.profile_steps:
        prof = start_profiler(r.out / "profile", cfg.log.profile_steps, r.device.type == "cuda")
    return writer, probe, prof


def pretrain(cfg, world: int, rank: int, device: torch.device, out: Path) -> bool:
    """The run, in data-flow order: data, model and optimizer, resume, loop (train_step,
    report, memorisation probe, checkpoint, preemption). True when it stopped early on a
    signal (its checkpoint written)."""
    from beitfast.progress import progress_bar

    r = Run(cfg, world, rank, device, out)
    info = open_data(r)
    say_start(r, info)
    build_model(r)
    resume(r)
    win = Window(device, r.step)
    ckpt_every = max(1, cfg.log.ckpt_every_epochs * r.steps_per_epoch)
    eval_every = max(1, cfg.log.mim_eval_every_epochs * r.steps_per_epoch)
    writer, probe, prof = open_observers(r)
    if probe is not None:
        from beitfast.mim_eval import append_row
    bar = progress_bar(total=r.total, initial=r.step, desc="pretrain", unit="step",
                       disable=not (r.main_proc and cfg.log.progress))
    batches = r.loader.stream(r.step)  # the backend prepares data.prefetch batches ahead on its own
    r.model.train()
    pre = Preemption("train", world, device, cfg.log.ckpt_every_minutes, verbose=r.main_proc)
    stopped = False
    try:
        while r.step < r.total:
            lr = lr_at(r.step, r.total, r.warmup, cfg.optim.lr, cfg.optim.min_lr)
            train_step(r, batches, win, lr)
            r.step += 1
            step, last = r.step, r.step == r.total
            bar.update()
            if prof is not None:
                prof.step()
            if step % cfg.log.every == 0 or last:
                report(r, win, lr, writer, bar)
            if probe is not None and (step % eval_every == 0 or last):  # before a checkpoint at this step
                append_row(out / "mim_eval.jsonl", {"step": step, "epoch": round(step / r.steps_per_epoch, 3),
                                                    **probe(r.model)})
            stopped, timed = pre.poll(step, force=step % cfg.log.every == 0 or last)
            if step % ckpt_every == 0 or last or step == cfg.train.stop_at or timed:
                bad = win.acc[5:].clone()  # steps since the last report: never save non-finite weights
                if world > 1:
                    dist.all_reduce(bad)
                if bad.item():
                    raise win.non_finite(r, step)
                save_checkpoint(r, step)
                pre.saved()
            if stopped:
                if r.main_proc:
                    preempt.announce("train", out, step, "step", pre.requested)
                break
            if step == cfg.train.stop_at:
                if r.main_proc:
                    print(f"[train] stopped at step {step} as asked (train.stop_at); re-run to resume")
                break
    except Exception as e:
        raise LoopFailure(r.step + 1) from e
    finally:
        pre.close()
        batches.close()  # stops the backend's threads and worker processes before anything else goes
        r.loader.close()
        bar.close()
        if writer is not None:
            writer.close()
        if prof is not None:
            prof.stop()
    if r.main_proc and not stopped:
        print(f"[train] {r.step} steps done; checkpoint {r.ckpt_path}, metrics {out / 'metrics.jsonl'}")
    return stopped


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(argv):
        print(f"usage: train.py --cfg NAME [section.key=value ...]\n\n{__doc__.strip()}\n\nThe keys, their types "
              f"and defaults: beitfast/config.py (model, data, tokenizer, mask, optim, train, log).")
        return 0
    try:
        cfg = cli_config(argv)
    except ConfigError as e:
        print(f"train: config error: {e}", file=sys.stderr)
        return 2
    started = distributed.start_run(cfg, "train")
    if started is None:
        return 2
    world, rank, device, out = started
    clean = False  # a rank that failed does not wait for its peers at the teardown's barrier
    try:
        code = EXIT_PREEMPTED if pretrain(cfg, world, rank, device, out) else 0
        clean = True
        return code
    except (ConfigError, CacheError, StartError, selfcheck.SelfCheckFailed) as e:
        print(f"train: cannot start: {e}", file=sys.stderr)
        return 2
    except LoopFailure as f:  # the traceback for a bug report where it helps, the message last
        e = f.__cause__
        if not isinstance(e, (NonFiniteError, CacheError)):
            traceback.print_exception(e)
        print(f"train: {f}: {type(e).__name__}: {one_line(e, 2000)}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown(clean)


if __name__ == "__main__":
    sys.exit(main())
