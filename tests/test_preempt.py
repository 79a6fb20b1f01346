"""The preemption flag and the timed checkpoint on one process (the trainers' end-to-end tests
send real signals to real runs: tests/test_train.py, test_finetune.py, test_segment.py,
test_token_cache.py)."""
import os
import signal
import time

import torch

from beitfast.preempt import Preemption


def test_a_signal_stops_after_the_step_and_the_timer_asks_for_a_checkpoint():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    pre = Preemption("test", 1, torch.device("cpu"), every_minutes=0.5 / 60, verbose=False)
    try:
        assert pre.poll(1) == (False, False)
        time.sleep(0.6)
        assert pre.poll(2) == (False, True)  # half a second passed: a timed checkpoint, no stop
        pre.saved()
        assert pre.poll(3) == (False, False)
        os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs in this (main) thread before the next line
        assert pre.requested == "SIGUSR1" and pre.poll(4) == (True, True)
    finally:
        pre.close()
    assert {s: signal.getsignal(s) for s in before} == before  # the handlers are given back
    untimed = Preemption("test", 1, torch.device("cpu"), verbose=False)
    try:
        time.sleep(0.05)
        assert untimed.poll(1) == (False, False)  # every_minutes=0: never timed
    finally:
        untimed.close()
