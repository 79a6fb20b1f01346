"""Preemption and timed checkpoints, shared by every trainer and the tokenization stage.

SIGTERM or SIGUSR1 (SLURM's `--signal`, a spot instance's notice, torchrun forwarding its own
SIGTERM) sets a flag; the loop finishes the step it is in, and at the next check every rank
agrees (one all-reduce) to write the checkpoint, rank 0 writes <out>/PREEMPTED (the step and the
signal: torchrun's agent exits 1 whatever its workers' codes, so launchers read the marker), and
the process leaves with EXIT_PREEMPTED. Re-running the same command resumes from that checkpoint
and takes the marker away. `log.ckpt_every_minutes` asks for a checkpoint when
that much wall time has passed since the last one, decided by rank 0 and agreed the same way,
so a hard kill (SIGKILL, a node lost) costs at most that many minutes beside the epoch cadence.

On one process the flag is read every step (a Python bool, no device sync); with several,
every `check_every` steps (default 10) and at every step the loop syncs anyway, to keep the
all-reduce off the hot path.
"""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 3  # the checkpoint is written; run the same command again to resume
MARKER = "PREEMPTED"  # <out>/PREEMPTED: torchrun's agent exits 1 whatever its worker's code, so a launcher reads this
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self, prog: str, world: int, device: torch.device, every_minutes: float = 0.0,
                 check_every: int = 10, verbose: bool = True):
        self.prog, self.world, self.device, self.every_s = prog, world, device, 60.0 * every_minutes
        self.check_every, self.verbose = max(1, check_every), verbose
        self.requested: str | None = None
        self.last_save = time.monotonic()
        self._old = {}
        for s in SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: signals are not ours to take
                pass

    def _handle(self, signum, frame) -> None:
        if self.requested is None and self.verbose:
            print(f"[{self.prog}] {signal.Signals(signum).name} received: finishing this step, then a checkpoint "
                  f"and exit {EXIT_PREEMPTED}", file=sys.stderr, flush=True)
        self.requested = signal.Signals(signum).name

    def poll(self, step: int, force: bool = False) -> tuple[bool, bool]:
        """(stop, save) after `step`: stop = a signal reached any rank; save = stop, or the timed
        checkpoint is due. Collective when world > 1 (every rank calls it at the same steps)."""
        due = bool(self.every_s) and time.monotonic() - self.last_save >= self.every_s
        if self.world == 1:
            stop = self.requested is not None
            return stop, stop or due
        if not force and step % self.check_every:
            return False, False
        flags = torch.tensor([float(self.requested is not None), float(due)],
                             device=self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # any rank signalled, or any rank's timer is due
        stop = bool(flags[0].item())
        return stop, stop or bool(flags[1].item())

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def close(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}


def mark(out: Path, step: int, why: str | None) -> None:
    """<out>/PREEMPTED, written atomically by rank 0 after the checkpoint: what a launcher checks
    to requeue (scripts/slurm/pretrain.sbatch)."""
    from beitfast.data.cache import atomic_write_json

    atomic_write_json(out / MARKER, {"step": step, "signal": why or "another rank's"})


def announce(prog: str, out: Path, at: int, unit: str, requested: str | None) -> None:
    """Rank 0, after the checkpoint at `at`: the marker, and the line that says what happened."""
    mark(out, at, requested)
    print(f"[{prog}] stopped at {unit} {at} on {requested or 'another rank'}'s signal; checkpoint {out / 'ckpt.pt'} "
          f"written; run the same command again to resume (exit {EXIT_PREEMPTED})")


def clear(out: Path) -> None:
    """A run that starts again takes the marker away (rank 0)."""
    (out / MARKER).unlink(missing_ok=True)


def ignore_in_worker(_worker_id: int = 0) -> None:
    """worker_init_fn of DataLoader workers: a signal meant for the job (SLURM signals every
    process of a step) must not kill a worker under the trainer, which stops them itself."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)
