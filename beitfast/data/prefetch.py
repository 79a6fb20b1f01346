"""Run a batch iterator in a background thread, a few batches ahead of the training step.

`prefetch(iterable, depth)` yields exactly what `iterable` yields, in order; a background
thread produces up to `depth` items ahead, so reading the cache, building views and feeding
DALI overlap with the model's step. An exception in the producer is raised in the consumer
(after the items produced before it); when the consumer stops early (break, error, close),
the producer stops after its current item. depth 0 is the synchronous iterator itself.

The thread only reorders WHEN items are made, not WHAT they are: the loader draws no global
RNG (views, crops and masks are functions of seed, epoch and index), so runs stay bitwise
reproducible. CUDA work issued by the producer goes to the same default stream as the step's,
so it is ordered after the step's earlier kernels: the overlap is on the host side.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator

import torch

_END = object()


class _Raised:
    def __init__(self, exc: BaseException):
        self.exc = exc


def prefetch(iterable: Iterable, depth: int = 2, device=None) -> Iterator:
    """`device`: a CUDA device the producer thread makes current first (the current device
    is per thread; a new thread would otherwise start on GPU 0 under torchrun)."""
    if depth <= 0:
        yield from iterable
        return
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            if device is not None and torch.device(device).type == "cuda":
                torch.cuda.set_device(torch.device(device))
            for item in iterable:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            put(_Raised(e))

    worker = threading.Thread(target=work, name="beitfast-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.exc
            yield item
    finally:
        stop.set()
        worker.join()
