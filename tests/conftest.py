import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # data_prep/ and benchmarks/ are scripts, not packages
if not torch.cuda.is_available():  # kernels run in Triton's interpreter; on a GPU, compiled for real
    os.environ.setdefault("TRITON_INTERPRET", "1")


def in_process(main, argv, threads: int | None = None):
    """A CLI's `main(argv)` run in this process, as a CompletedProcess (return code, the stdout
    and stderr it printed, file descriptors 1 and 2 included, so its worker processes' and C
    libraries' output too): an uncaught exception is return code 1 with its traceback, as the
    interpreter would give. `threads`: torch's thread count for the call (as OMP_NUM_THREADS
    gives a subprocess); the counts a CLI sets are put back after it. It saves the seconds of
    a fresh interpreter's imports (torch, timm, DALI, numba) on every run."""
    import io
    import subprocess
    import tempfile
    import traceback

    import numba

    kept, nb = torch.get_num_threads(), numba.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
    sys.stdout.flush()
    sys.stderr.flush()
    saved_fds, saved_streams = [os.dup(1), os.dup(2)], (sys.stdout, sys.stderr)
    for fd, f in zip((1, 2), files):
        os.dup2(f.fileno(), fd)
    sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), write_through=True)
                              for fd in (1, 2))
    try:
        try:
            rc = main(list(argv))
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 1
        except Exception:  # what a subprocess would print before exiting with 1
            traceback.print_exc()
            rc = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout, sys.stderr = saved_streams
        for fd, old in zip((1, 2), saved_fds):
            os.dup2(old, fd)
            os.close(old)
        torch.set_num_threads(kept)
        numba.set_num_threads(nb)
    text = []
    for f in files:
        f.seek(0)
        text.append(f.read().decode(errors="replace"))
        f.close()
    return subprocess.CompletedProcess(list(argv), rc, *text)


def ffcv_skip_reason() -> str | None:
    """Why FFCV is unavailable (written by scripts/setup_env.sh), or None."""
    from beitfast.data.ffcv_loader import ffcv_unavailable

    return ffcv_unavailable()


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """A small toy ImageNet with every oddity, corrupt files included."""
    from data_prep.make_toy_imagenet import make

    out = tmp_path_factory.mktemp("toy") / "imagenet"
    make(out, classes=4, per_class=30, val_per_class=5, seed=1, corrupt=True, progress=False)
    return out


@pytest.fixture(scope="session")
def small_toy(tmp_path_factory):
    """A smaller toy ImageNet (4 classes x 10 train, 3 val; 3 corrupt train files) for the
    evaluation CLIs' end-to-end tests."""
    from data_prep.make_toy_imagenet import make

    out = tmp_path_factory.mktemp("small_toy") / "imagenet"
    make(out, classes=4, per_class=10, val_per_class=3, seed=2, corrupt=True, progress=False)
    return out


VOCAB = 96  # the tiny test tokenizer's vocabulary


@pytest.fixture(scope="session")
def cache(toy_root, tmp_path_factory):
    """A token cache of the toy ImageNet (K = 2 views) made with a small random dVAE: (path,
    the config overrides that go with it)."""
    from beitfast.tokenizers.dvae import DVAE, DVAEArch
    from data_prep.tokenize_imagenet import main as tokenize

    d = tmp_path_factory.mktemp("cache")
    torch.manual_seed(0)
    torch.save(DVAE(DVAEArch(vocab_size=VOCAB, n_hid=16, n_init=16, n_blk_per_group=1, downsample=4)).export(32),
               d / "tok.pt")
    over = [f"tokenizer.path={d / 'tok.pt'}", "data.views=2", f"model.vocab_size={VOCAB}"]
    assert tokenize(["--data", str(toy_root), "--out", str(d / "cache"), "--cfg", "tiny.yaml", "--no-progress",
                     "--max-reject", "0.05", *over]) == 0
    return d / "cache", over


@pytest.fixture(scope="session")
def ffcv_cache(cache):
    """The same cache with its FFCV .beton written (skips where FFCV is unavailable)."""
    why = ffcv_skip_reason()
    if why:
        pytest.skip(why)
    from data_prep.cache_to_ffcv import main as to_ffcv

    assert to_ffcv(["--cache", str(cache[0]), "--workers", "2", "--stall-timeout", "120"]) == 0
    return cache


@pytest.fixture(scope="session")
def gpu_check_dry_run(tmp_path_factory):
    """scripts/gpu_check.sh --dry-run, once: (its $OUT, the summary rows by stage, the
    CompletedProcess). The benchmarks' tiny modes run inside it (tests/test_benchmarks.py)."""
    import json
    import subprocess

    out = tmp_path_factory.mktemp("gpu_check") / "out"
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                       env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=1500)
    rows = [json.loads(x) for x in (out / "summary.jsonl").read_text().splitlines()] if (out / "summary.jsonl").exists() else []
    return out, {row["stage"]: row for row in rows}, r


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_nodes(args: list[str], cwd=None, timeout: int = 900) -> list[tuple[int, str, str]]:
    """`args` (a script and its arguments) under torchrun as two 'nodes' of one process each on
    this machine, meeting through torchrun's c10d rendezvous as on a cluster: [(rc, stdout,
    stderr)] of node 0 and node 1."""
    import subprocess

    port, procs = free_port(), []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
               "--rdzv-id", f"beitfast-test-{port}", *args]
        procs.append(subprocess.Popen(cmd, cwd=cwd or ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=dict(os.environ, OMP_NUM_THREADS="1")))
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, o, e))
    return out


def sigterm_when_logged(log: Path, timeout: float = 300.0):
    """A thread that sends this process SIGTERM once `log` holds a line (the run has stepped):
    a preemption notice in the middle of an in-process run. Join it after the run."""
    import signal
    import threading
    import time

    def wait():
        deadline = time.time() + timeout
        while time.time() < deadline:
            if log.exists() and log.read_text().strip():
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    t = threading.Thread(target=wait, daemon=True)
    t.start()
    return t


@pytest.fixture(scope="session")
def uninterrupted_28(cache, tmp_path_factory):
    """28 fp32 pretraining steps that never stopped: the weights every resume test must reach."""
    from tests.trainrun import P28, train

    out = tmp_path_factory.mktemp("a28")
    r = train(cache, out, *P28)
    assert r.returncode == 0, r.stderr[-3000:]
    return out
