"""Running the pretraining driver in the tests (tests/test_train*.py): its command line on the
session's tiny cache, a run as a subprocess, its metrics rows, and bitwise weight equality."""
import json
import os
import subprocess
import sys

import torch

from tests.conftest import ROOT


def args(cache, out, *extra):
    path, over = cache
    # the micro model (4 blocks of width 96): the driver's machinery is what these tests check,
    # at a twelfth of the tiny model's step
    return ["--cfg", "tiny.yaml", f"data.cache={path}", f"log.out_dir={out}", "model.size=micro",
            "data.batch_size=8", "train.global_batch=8", "train.epochs=2", "log.every=2", "log.progress=false", "optim.warmup_epochs=0.5",
            *over, *extra]


def in_process(main, argv):
    """A CLI's `main(argv)` run in this process, as a CompletedProcess (return code, the stdout
    and stderr it printed, file descriptors 1 and 2 included, so its worker processes' and C
    libraries' output too): an uncaught exception is return code 1 with its traceback, as the
    interpreter would give. The thread counts the trainer sets are put back. It saves the
    seconds of a fresh interpreter's imports (torch, timm, DALI, numba) on every run."""
    import io
    import tempfile
    import traceback

    import numba

    threads, nb = torch.get_num_threads(), numba.get_num_threads()
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
        torch.set_num_threads(threads)
        numba.set_num_threads(nb)
    text = []
    for f in files:
        f.seek(0)
        text.append(f.read().decode(errors="replace"))
        f.close()
    return subprocess.CompletedProcess(list(argv), rc, *text)


def train(cache, out, *extra, nproc=1, cwd=None):
    """The pretraining driver on the session's cache: in this process when it is one process in
    the project root (beitfast.train.main, as the K study and the demo call it), else under
    torchrun / in `cwd` as a subprocess."""
    if nproc == 1 and cwd is None:
        from beitfast.train import main

        return in_process(main, args(cache, out, *extra))
    script = str(ROOT / "beitfast" / "train.py")
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), script] if nproc > 1
           else [sys.executable, script])
    r = subprocess.run(cmd + args(cache, out, *extra), cwd=cwd or ROOT, capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    return r


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def same_weights(a, b):
    a = torch.load(a / "ckpt.pt", weights_only=True)
    b = torch.load(b / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    return a, b


P28 = ["train.precision=fp32", "train.max_steps=28"]  # 2 epochs of 14 steps; a checkpoint at the end of each
