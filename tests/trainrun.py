"""Running the pretraining driver in the tests (tests/test_train*.py): its command line on the
session's tiny cache, a run as a subprocess, its metrics rows, and bitwise weight equality."""
import json
import os
import subprocess
import sys

import torch

from tests.conftest import ROOT, in_process


def args(cache, out, *extra):
    path, over = cache
    # the micro model (4 blocks of width 96): the driver's machinery is what these tests check,
    # at a twelfth of the tiny model's step
    return ["--cfg", "tiny.yaml", f"data.cache={path}", f"log.out_dir={out}", "model.size=micro",
            "data.batch_size=8", "train.global_batch=8", "train.epochs=2", "log.every=2", "log.progress=false", "optim.warmup_epochs=0.5",
            *over, *extra]


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
