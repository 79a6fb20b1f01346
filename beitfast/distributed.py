"""Process-group and device setup shared by the torchrun-capable scripts."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def setup(device_pref: str = "auto") -> tuple[int, int, torch.device]:
    """(world size, rank, device) from torchrun's variables; joins the process group (NCCL on
    GPU, gloo on CPU). `device_pref`: auto | cuda | cpu; asking for cuda without one fails."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no GPU is visible")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(device)
    return world, rank, device


def rng_states(world: int) -> list[torch.Tensor]:
    """Every rank's torch RNG state (collective when world > 1), for checkpoints."""
    if world == 1:
        return [torch.get_rng_state()]
    out = [None] * world
    dist.all_gather_object(out, torch.get_rng_state())
    return out


def start_run(cfg, prog: str) -> tuple[int, int, torch.device, Path] | None:
    """The opening of every trainer: join the process group, pick the device, make the run
    directory and write the resolved config there (rank 0), seed torch per rank. Returns
    (world, rank, device, out_dir), or None after printing why it cannot start."""
    try:
        world, rank, device = setup(cfg.train.device)
    except RuntimeError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None
    out = Path(cfg.log.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.dump(out / "config.yaml")
    torch.manual_seed(cfg.train.seed + rank)
    return world, rank, device, out
