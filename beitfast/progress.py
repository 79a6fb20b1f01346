"""Progress for a terminal and for a batch system's log file.

`progress_bar(...)` takes tqdm's arguments. On a terminal it is a tqdm bar, as always. When the
bar's stream (stderr) is not a terminal (a SLURM log, `> run.log 2>&1`, a pipe) it is a
`PlainProgress`: no carriage-return refreshes, only whole lines,

    [pretrain] 1200/6000 step (20.0%) | 3.41 step/s | elapsed 0:05:52 | ETA 0:23:28 | loss=2.31 acc=0.41 img_s=6980

one at every report of a trainer (each `set_postfix`, that is every `log.every` steps), and for
the other loops one every BEITFAST_PROGRESS_EVERY seconds (default 60) and one at the end. A
five-day run then writes a few MB of log, not hundreds. BEITFAST_PROGRESS=bar or plain forces
either.
"""
from __future__ import annotations

import os
import sys
import time


def _fmt_s(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class PlainProgress:
    """tqdm's interface (iterate, update, set_postfix, set_description, close, n, total), writing
    whole lines instead of redrawing one."""

    def __init__(self, iterable=None, total=None, initial: int = 0, desc: str = "", unit: str = "it",
                 disable: bool = False, file=None, every_s: float | None = None, **_tqdm_options):
        self.iterable, self.desc, self.unit, self.disable = iterable, desc or "progress", unit, disable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.start_n = total, initial, initial
        self.file = file or sys.stderr
        self.every_s = float(os.environ.get("BEITFAST_PROGRESS_EVERY", "60")) if every_s is None else every_s
        self.postfix: dict = {}
        self.reports = 0  # set_postfix calls: a reporting loop prints at its reports, not on a timer
        self.t0 = self.last = time.monotonic()
        self.closed = False

    def line(self) -> str:
        dt = time.monotonic() - self.t0
        rate = (self.n - self.start_n) / dt if dt > 0 else 0.0
        parts = [f"[{self.desc}] {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
                 + (f" ({100 * self.n / self.total:.1f}%)" if self.total else ""),
                 f"{rate:.2f} {self.unit}/s", f"elapsed {_fmt_s(dt)}"]
        if self.total and rate > 0:
            parts.append(f"ETA {_fmt_s((self.total - self.n) / rate)}")
        if self.postfix:
            parts.append(" ".join(f"{k}={v}" for k, v in self.postfix.items()))
        return " | ".join(parts)

    def _write(self) -> None:
        if not self.disable:
            self.file.write(self.line() + "\n")
            self.file.flush()
            self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        if not self.reports and time.monotonic() - self.last >= self.every_s:
            self._write()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kw) -> None:
        self.postfix = {**(ordered_dict or {}), **kw}
        self.reports += 1
        self._write()

    def write(self, s: str, file=None, end: str = "\n") -> None:
        """tqdm.write: a message line of its own."""
        f = file or self.file
        f.write(s + end)
        f.flush()

    def set_description(self, desc: str = "", refresh: bool = True) -> None:
        self.desc = desc

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update()

    def __len__(self):
        return self.total or 0

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.n != self.start_n or not self.reports:
                self._write()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def plain_wanted(file=None) -> bool:
    force = os.environ.get("BEITFAST_PROGRESS", "")
    if force in ("bar", "plain"):
        return force == "plain"
    f = file or sys.stderr
    try:
        return not f.isatty()
    except (AttributeError, ValueError):
        return True


def progress_bar(*args, **kw):
    """A tqdm bar on a terminal, a PlainProgress elsewhere (same arguments)."""
    if plain_wanted(kw.get("file")):
        return PlainProgress(*args, **kw)
    from tqdm import tqdm

    return tqdm(*args, **kw)
