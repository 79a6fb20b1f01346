"""The background prefetcher: same items in the same order, errors delivered, early stop clean."""
import threading
import time

import pytest
import torch

from beitfast.data.prefetch import prefetch


def _batches(n, made=None, fail_at=None, delay=0.0):
    g = torch.Generator().manual_seed(int(torch.randint(0, 1 << 30, ())))
    for i in range(n):
        if i == fail_at:
            raise KeyError(f"bad item {i}")
        time.sleep(delay)
        if made is not None:
            made.append(i)
        yield {"i": i, "x": torch.randn(3, 4, generator=g)}


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_same_items_in_order(depth):
    torch.manual_seed(depth)
    want = list(_batches(20))
    torch.manual_seed(depth)
    got = list(prefetch(_batches(20), depth))
    assert [b["i"] for b in got] == list(range(20))
    for a, b in zip(got, want):
        assert torch.equal(a["x"], b["x"])


def test_producer_error_reaches_the_consumer_after_earlier_items():
    seen = []
    with pytest.raises(KeyError, match="bad item 5"):
        for b in prefetch(_batches(10, fail_at=5), 2):
            seen.append(b["i"])
    assert seen == [0, 1, 2, 3, 4]


def test_early_stop_ends_the_thread_and_bounds_the_lookahead():
    made = []
    before = {t.ident for t in threading.enumerate()}
    it = prefetch(_batches(1000, made=made, delay=0.002), 2)
    for b in it:
        if b["i"] == 3:
            break
    it.close()
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.ident not in before and t.name == "beitfast-prefetch"]
    assert len(made) <= 4 + 2 + 1  # consumed + queue depth + the one in hand


@pytest.mark.parametrize("depth", [0, 2])
def test_producer_runs_while_the_consumer_holds_an_item(depth):
    """The next item is made while the consumer is still busy with the current one (with
    depth 0 it cannot be: the control)."""
    second_started = threading.Event()

    def producer():
        yield 0
        second_started.set()
        yield 1

    it = prefetch(producer(), depth)
    assert next(it) == 0
    assert second_started.wait(timeout=5.0 if depth else 0.2) == (depth > 0)
    assert list(it) == [1]
