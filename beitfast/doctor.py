"""What to run first on a new machine: one report of the environment and the fast paths.

    python -m beitfast.doctor [--cfg base.yaml] [--cache DIR] [--steps 20] [section.key=value ...]

Reports the GPUs (name, compute capability, memory), driver and CUDA versions; the versions of
torch, triton, DALI, FFCV, timm, transformers, numba and whether each imports; cores per GPU;
free disk at the cache; what the config's `auto` keys resolve to here (precision, kernels,
optimizer); every start-up self-check (beitfast/selfcheck.py) on this device; a throughput probe
of the configured model on synthetic batches (`--steps` timed steps after warm-up, compilation
excluded): images/s, MFU against a matmul peak measured here, peak memory; and, with --cache,
the loader alone on it (images/s). The last line is one JSON object; the exit code is 1 when a
check failed, 0 otherwise.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

PACKAGES = ("torch", "triton", "nvidia.dali", "ffcv", "timm", "transformers", "numba", "apex")


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            mod = importlib.import_module(name)
            out[name] = {"imports": True, "version": getattr(mod, "__version__", "?")}
        except Exception as e:  # noqa: BLE001 - any import failure is a finding, not a crash
            out[name] = {"imports": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    return out


def gpus() -> dict:
    if not torch.cuda.is_available():
        return {"count": 0, "cuda": torch.version.cuda}
    devs = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        devs.append({"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1)})
    driver = None
    try:
        import subprocess

        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        pass
    return {"count": len(devs), "devices": devs, "cuda": torch.version.cuda, "driver": driver,
            "cudnn": torch.backends.cudnn.version()}


def throughput(cfg, device, steps: int) -> dict:
    """The configured model's training step on synthetic batches, compiled when the config says."""
    from benchmarks.bench_model import matmul_peak, step_flops
    from beitfast.model import Beit, BeitArgs
    from beitfast.precision import amp_dtype
    from beitfast.selfcheck import _budget_mask

    dt = amp_dtype(cfg.train.precision)
    b = cfg.data.batch_size
    model = Beit(BeitArgs.from_config(cfg.model)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    grid = cfg.model.img_size // cfg.model.patch_size
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(b, 3, cfg.model.img_size, cfg.model.img_size, device=device, generator=g)
    mask = torch.cat([_budget_mask(grid * grid, cfg.mask.num_patches, device, g) for _ in range((b + 1) // 2)])[:b]
    mask = mask.view(b, grid, grid)
    tgt = torch.randint(0, cfg.model.vocab_size, (b, grid, grid), device=device, generator=g)
    fwd = torch.compile(model) if cfg.train.compile else model

    def step():
        with torch.autocast(device.type, dtype=dt, enabled=dt != torch.float32):
            loss = fwd(x, mask, tgt, cfg.mask.num_patches)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t = time.perf_counter()
    for _ in range(3):  # compilation and warm-up
        step()
    sync()
    warm = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt_s = (time.perf_counter() - t) / steps
    flops = step_flops(model, x, mask, tgt)
    peak = matmul_peak(device.type, dt if device.type == "cuda" else torch.float32)
    res = {"batch": b, "steps": steps, "warmup_s": round(warm, 2), "step_ms": round(1000 * dt_s, 2),
           "images_per_s": round(b / dt_s, 2), "mfu": round(flops / dt_s / peak, 4),
           "matmul_peak_tflops": round(peak / 1e12, 2)}
    if device.type == "cuda":
        res["peak_mem_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return res


def loader_probe(cfg, cache, device, batches: int = 10) -> dict:
    from beitfast.data.loader import build_loader, resolve_backend

    s = build_loader(cfg, cache, device=device).stream(0)
    try:
        next(s)
        t = time.perf_counter()
        for _ in range(batches):
            b = next(s)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt_s = time.perf_counter() - t
    finally:
        s.close()
    return {"backend": resolve_backend(cfg.data), "batches": batches,
            "images_per_s": round(batches * b["images"].shape[0] / dt_s, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m beitfast.doctor", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--cfg", default="base.yaml", help="pretraining config (default base.yaml)")
    ap.add_argument("--cache", default=None, help="a token cache to time the loader on (and check DALI's GPU graph)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps of the throughput probe (0: skip it)")
    ap.add_argument("overrides", nargs="*", help="config overrides section.key=value")
    a = ap.parse_args(argv)
    from beitfast import selfcheck
    from beitfast.config import ConfigError, load_config
    from beitfast.precision import resolve
    from beitfast.train import check_choices

    report = {"doctor": 1, "python": sys.version.split()[0], "packages": versions(), "gpus": gpus(),
              "cores": len(os.sched_getaffinity(0))}
    report["cores_per_gpu"] = round(report["cores"] / max(1, report["gpus"]["count"]), 1)
    failed = []
    try:
        cfg = load_config(a.cfg, (["data.cache=" + a.cache] if a.cache else []) + a.overrides)
    except ConfigError as e:
        print(f"doctor: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = Path(a.cache or cfg.data.cache or ".")
    where = where if where.exists() else Path(".")
    report["free_disk_gib"] = {str(where): round(shutil.disk_usage(where).free / 2**30, 1)}
    print(f"[doctor] {report['gpus'].get('count', 0)} GPU(s) {[d['name'] for d in report['gpus'].get('devices', [])]}"
          f", CUDA {report['gpus']['cuda']}, {report['cores']} cores; "
          + ", ".join(f"{k} {v.get('version', 'MISSING')}" for k, v in report["packages"].items()))
    try:
        prec, why = resolve(cfg.train.precision, device)
        cfg.train.precision = prec
        report["auto"] = {"precision": why, **check_choices(cfg, device)}
    except (ValueError, ConfigError) as e:
        failed.append(f"config: {e}")
        report["auto"] = {"error": str(e)}
    print(f"[doctor] choices here: {report['auto']}")
    cache = None
    if a.cache:
        from beitfast.data.cache import TokenCache

        cache = TokenCache(a.cache)
    try:
        rows, notes = selfcheck.startup_pretrain(cfg, device, cache)
        report["self_check"] = rows
        print(f"[doctor] {'; '.join(notes)}")
    except selfcheck.SelfCheckFailed as e:
        failed.append(str(e))
        report["self_check"] = {"failed": str(e)}
        print(f"[doctor] {e}")
    if a.steps:
        try:
            report["throughput"] = throughput(cfg, device, a.steps)
            print(f"[doctor] throughput: {report['throughput']}")
        except Exception as e:  # noqa: BLE001 - report it and fail the run at the end
            traceback.print_exc()
            failed.append(f"throughput probe: {type(e).__name__}: {e}")
    if cache is not None:
        try:
            report["loader"] = loader_probe(cfg, cache, device)
            print(f"[doctor] loader alone: {report['loader']}")
        except Exception as e:  # noqa: BLE001
            failed.append(f"loader: {type(e).__name__}: {e}")
    report["failed"] = failed
    report["ok"] = not failed
    print(json.dumps(report, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
