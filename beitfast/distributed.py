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


def shutdown(clean: bool = True) -> None:
    """Tear the process group down (a no-op without one). After a clean run the ranks first
    meet at a barrier, so that no rank closes its connections and exits while a peer is still
    writing its last files: a gloo rank that left early once aborted in its teardown
    ("terminate called without an active exception", CI, train_dvae under torchrun)."""
    if not dist.is_initialized():
        return
    if clean and dist.get_world_size() > 1:
        try:
            dist.barrier()
        except RuntimeError:  # a peer is gone already: nothing left to wait for
            pass
    dist.destroy_process_group()


def rng_states(world: int, device: torch.device) -> list[dict]:
    """Every rank's RNG states, {"cpu": ..., "cuda": ... or None} (collective when world > 1),
    for checkpoints: drop path and dropout draw from the CUDA generator on a GPU."""
    mine = {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
    if world == 1:
        return [mine]
    out = [None] * world
    dist.all_gather_object(out, mine)
    return out


class WorldSizeChanged(ValueError):
    """A checkpoint written by another number of processes than this run has."""


def restore_rng(states: list, rank: int, world: int, device: torch.device, reseed: int | None = None) -> None:
    """Restore this rank's RNG states from a checkpoint's `rng_states` list. A checkpoint of
    another world size is refused (WorldSizeChanged) unless `reseed` is given: then every rank
    seeds its generators from `reseed` + rank, and says so, instead of silently taking another
    rank's stream."""
    if len(states) != world:
        if reseed is None:
            raise WorldSizeChanged(
                f"the checkpoint was written by {len(states)} process(es) and this run has {world}: its per-rank "
                f"random streams cannot be continued exactly; resume with {len(states)} process(es)")
        torch.manual_seed(reseed + rank)  # seeds the CUDA generators too
        return
    st = states[rank]
    if isinstance(st, torch.Tensor):  # checkpoints written before CUDA states were kept
        st = {"cpu": st, "cuda": None}
    torch.set_rng_state(st["cpu"])
    if device.type == "cuda" and st.get("cuda") is not None:
        torch.cuda.set_rng_state(st["cuda"], device)


def start_run(cfg, prog: str) -> tuple[int, int, torch.device, Path] | None:
    """The opening of every trainer: join the process group, pick the device, resolve
    train.precision for it (beitfast/precision.py; said on a start line), make the run
    directory and write the resolved config there (rank 0), seed torch per rank. Returns
    (world, rank, device, out_dir), or None after printing why it cannot start."""
    try:
        world, rank, device = setup(cfg.train.device)
    except RuntimeError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None
    from beitfast.precision import resolve

    try:
        cfg.train.precision, why = resolve(cfg.train.precision, device)
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None
    if rank == 0:
        print(f"[{prog}] precision {why}")
    out = Path(cfg.log.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        cfg.dump(out / "config.yaml")
    torch.manual_seed(cfg.train.seed + rank)
    return world, rank, device, out


def trainer_main(argv, doc: str, prog: str, default_cfg: str, schema, run, expected: tuple = ()) -> int:
    """The command line of a torchrun-capable job: `--cfg NAME` plus overrides (help from
    `doc`), start_run, `run(cfg, world, rank, device, out)` -> result dict printed as JSON by
    rank 0. Config errors and `expected` exceptions exit 2 with the message, a non-finite loss
    (FloatingPointError) exits 1 naming the last good checkpoint; the process group is always
    torn down."""
    import argparse
    import json

    from beitfast.config import ConfigError, cli_config
    from beitfast.selfcheck import SelfCheckFailed

    ap = argparse.ArgumentParser(prog=f"{prog}.py", description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc.split("\n\n", 1)[1])
    ap.add_argument("--cfg", default=default_cfg, help=f"config (default {default_cfg}; a name under configs/ or a path)")
    ap.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    a = ap.parse_args(argv)
    try:
        cfg = cli_config(["--cfg", a.cfg, *a.overrides], schema=schema)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    started = start_run(cfg, prog)
    if started is None:
        return 2
    world, rank, device, out = started
    try:
        res = run(cfg, world, rank, device, out)
    except (ConfigError, FileNotFoundError, ValueError, WorldSizeChanged, SelfCheckFailed, *expected) as e:
        print(f"{prog}: {e}", file=sys.stderr)
        shutdown(clean=False)
        return 2
    except FloatingPointError as e:
        print(f"{prog}: {e}; {out / 'ckpt.pt'} is the last good checkpoint", file=sys.stderr)
        shutdown(clean=False)
        return 1
    except BaseException:
        shutdown(clean=False)
        raise
    shutdown()
    if rank == 0:
        print(json.dumps(res))
    from beitfast.preempt import EXIT_PREEMPTED

    return EXIT_PREEMPTED if "preempted_at" in res else 0
