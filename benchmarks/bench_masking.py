"""Masks per second: the Numba generator vs the plain-Python reference twin.

    python benchmarks/bench_masking.py [--tiny]

Reports one thread and all threads, and the time for one 2048-mask global batch (the
paper's batch) with all threads. Targets (issue 3): >= 100x the reference on one core and a
2048-mask batch in < 2 ms. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import numba
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import emit, time_median  # noqa: E402
from beitfast.masking import MaskGenerator, MaskSpec, reference_masks  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a few seconds, for the test suite")
    a = ap.parse_args(argv)
    n_ref, n_fast, reps = (200, 4096, 3) if a.tiny else (2000, 65536, 9)
    spec, seed = MaskSpec(), 0
    gen = MaskGenerator(spec, seed)
    all_threads = numba.config.NUMBA_NUM_THREADS

    idx = np.arange(n_fast)
    out = np.empty((n_fast, spec.height, spec.width), bool)
    gen(idx, 1, out)  # compile outside the clock
    # The CPUs are shared and noisy: interleave reference and Numba rounds so that both see
    # the same load, and report medians (and the median of per-round ratios).
    t_ref, t_one, t_all = [], [], []
    for r in range(reps):
        t_ref.append(time_median(lambda: reference_masks(spec, seed, r, np.arange(n_ref)), 1, warmup=0))
        numba.set_num_threads(1)
        t_one.append(time_median(lambda: gen(idx, r, out), 1, warmup=0))
        numba.set_num_threads(all_threads)
        t_all.append(time_median(lambda: gen(idx, r, out), 1, warmup=0))
    ratios = [(n_fast / o) / (n_ref / f) for f, o in zip(t_ref, t_one)]
    t_ref, t_one, t_all = (statistics.median(t) for t in (t_ref, t_one, t_all))
    idx2048, out2048 = np.arange(2048), np.empty((2048, spec.height, spec.width), bool)
    t_2048 = time_median(lambda: gen(idx2048, 2, out2048), reps * 10)

    ref_rate, one_rate, all_rate = n_ref / t_ref, n_fast / t_one, n_fast / t_all
    result = {
        "bench": "masking",
        "grid": [spec.height, spec.width],
        "budget": spec.num_patches,
        "reference_masks_per_s": round(ref_rate, 1),
        "numba_masks_per_s": round(one_rate, 1),
        "numba_all_threads_masks_per_s": round(all_rate, 1),
        "threads": all_threads,
        "speedup": round(statistics.median(ratios), 1),
        "speedup_all_threads": round(all_rate / ref_rate, 1),
        "batch2048_ms": round(t_2048 * 1e3, 3),
        "tiny": a.tiny,
    }
    print(f"reference {ref_rate:,.0f} masks/s | numba 1 thread {one_rate:,.0f} masks/s "
          f"({result['speedup']}x) | {all_threads} threads {all_rate:,.0f} masks/s | "
          f"2048-mask batch {result['batch2048_ms']} ms")
    emit(result)
    return result


if __name__ == "__main__":
    main()
