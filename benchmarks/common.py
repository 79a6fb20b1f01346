"""Shared benchmark plumbing: hardware and version info, median timing, the JSON row."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time


def machine_info() -> dict:
    """CPU, cores, GPU and library versions, recorded with every result."""
    info = {"python": platform.python_version(), "cores": os.cpu_count(), "cpu": platform.processor()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    for mod in ("numpy", "numba", "torch", "nvidia.dali", "triton", "timm"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            info[mod.replace("nvidia.", "")] = m.__version__
        except Exception:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
    except Exception:
        pass
    return info


def time_median(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of `fn()` over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def emit(result: dict, show: bool = False) -> None:
    """The last line of every benchmark: one JSON object (after `key: value` lines for a
    person when `show`)."""
    if show:
        for k in sorted(result):
            print(f"{k}: {result[k]}")
    result = dict(result, machine=machine_info())
    print(json.dumps(result, sort_keys=True))
