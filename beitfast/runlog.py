"""Run-directory helpers shared by the trainers: atomic checkpoints, resumable metric logs."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def atomic_save(obj, path: Path) -> None:
    """torch.save under a temporary name, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path, fmt: str, fix: str) -> dict:
    """A checkpoint written by atomic_save with {"format": fmt}; anything else (not a torch
    file, another trainer's, foreign pickled classes) raises ValueError naming the file and
    `fix`, what the user can do. The file is left as it is."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain types only
    except Exception as e:
        raise ValueError(f"cannot read the checkpoint {path} ({type(e).__name__}: {str(e).splitlines()[0]}); {fix}") from None
    if not isinstance(ck, dict) or ck.get("format") != fmt:
        raise ValueError(f"{path} is not a checkpoint of this version (format {fmt}); {fix}")
    return ck


def read_metrics(path: Path, upto_step: int) -> list[dict]:
    """Metric rows at or before `upto_step` (rows written after the last checkpoint by a
    killed run are dropped, so a resumed run does not duplicate them)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if r["step"] <= upto_step:
            rows.append(r)
    return rows


def reset_metrics(path: Path, upto_step: int) -> list[dict]:
    """Rewrite the log with only the rows up to `upto_step` (the resume point); return them."""
    rows = read_metrics(path, upto_step)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)
    return rows


def resume_job(path: Path, fmt: str, global_batch: int, states: dict, rank: int, world: int, device) -> dict | None:
    """Continue a fine-tuning-style job from its checkpoint when there is one: load each of
    `states` (name in the checkpoint -> object with load_state_dict) and restore this rank's RNG
    streams. A checkpoint of another global batch is refused (ValueError naming the value).
    Returns the checkpoint, or None when there is none."""
    from beitfast.distributed import restore_rng

    if not path.exists():
        return None
    ck = read_checkpoint(path, fmt, "move it away to start over")
    if ck["config"]["train"]["global_batch"] != global_batch:
        raise ValueError(f"{path} was trained with train.global_batch={ck['config']['train']['global_batch']}; "
                         f"resume with the same value (or move it away to start over)")
    for name, obj in states.items():
        obj.load_state_dict(ck[name])
    restore_rng(ck["rng_states"], rank, world, device)
    return ck
