"""The pretraining driver across processes and nodes, and when it is stopped: DDP and gradient
accumulation against one process, two torchrun 'nodes' under the c10d rendezvous, the SLURM
script, SIGTERM and a torchrun restart resuming bitwise."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tests.conftest import ROOT
from tests.trainrun import P28, args as _args, rows as _rows, same_weights as _same_weights, train as _train


GB16 = ["train.global_batch=16", "train.max_steps=4", "mask.exact=true", "log.every=1"]


@pytest.fixture(scope="module")
def one_process_16(cache, tmp_path_factory):
    """Global batch 16 on one process (batch 16): the reference run for DDP and accumulation.
    Masks of exactly N patches, so a mean of per-micro-batch means is the global mean."""
    out = tmp_path_factory.mktemp("one16")
    r = _train(cache, out, *GB16, "data.batch_size=16")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _same_run(out, ref):
    np.testing.assert_allclose([r["loss"] for r in _rows(out)], [r["loss"] for r in _rows(ref)], rtol=1e-4)
    w, want = (torch.load(d / "ckpt.pt", weights_only=True)["model"] for d in (out, ref))
    for k, v in want.items():
        torch.testing.assert_close(w[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_ddp_two_processes_equal_one_process(cache, tmp_path, one_process_16):
    """Two gloo DDP processes x 8 images train like one process x 16: same losses every step,
    same weights; then the checkpoint (written by 2 processes) refuses a 1-process resume
    unless train.allow_world_change is set."""
    r = _train(cache, tmp_path / "ddp", *GB16, "data.num_threads=0", "data.workers=-1", nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    cores = len(os.sched_getaffinity(0))  # two ranks share this node's cores instead of each taking them all
    assert f"{max(1, cores // 2)} thread(s) and {max(1, cores // 2)} worker process(es) per rank" in r.stdout
    _same_run(tmp_path / "ddp", one_process_16)
    more = ["train.max_steps=6"]
    r = _train(cache, tmp_path / "ddp", *GB16, *more)
    assert r.returncode == 2 and "written by 2 process(es) and this run has 1" in r.stderr, r.stderr[-2000:]
    assert "train.allow_world_change" in r.stderr.strip().splitlines()[-1]
    r = _train(cache, tmp_path / "ddp", *GB16, *more, "train.allow_world_change=true")
    assert r.returncode == 0 and "reseeded" in r.stdout, r.stderr[-2000:]
    assert torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["step"] == 6


def test_two_nodes_under_c10d_rendezvous_equal_one_process(cache, tmp_path, one_process_16):
    """torchrun --nnodes 2 --rdzv-backend c10d, one gloo process a 'node' (both on this machine):
    the same losses and weights as one process at the same global batch."""
    from tests.conftest import run_two_nodes

    res = run_two_nodes([str(ROOT / "beitfast" / "train.py"), *_args(cache, tmp_path / "nodes", *GB16)])
    assert [rc for rc, _, _ in res] == [0, 0], "\n".join(e[-2000:] for _, _, e in res)
    assert any("2 process(es) x data.batch_size 8" in o for _, o, _ in res)
    _same_run(tmp_path / "nodes", one_process_16)


def test_the_slurm_script_launches_torchrun_with_a_rendezvous(cache, tmp_path):
    """scripts/slurm/pretrain.sbatch on one 'node' (SRUN empty: its command runs here): torchrun
    with the c10d rendezvous trains, writing into OUT_DIR; without OUT_DIR it says what to set."""
    from tests.conftest import free_port

    script = str(ROOT / "scripts" / "slurm" / "pretrain.sbatch")
    env = dict(os.environ, SRUN="", GPUS_PER_NODE="1", CFG="tiny.yaml", PORT=str(free_port()), PYTHON=sys.executable,
               OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1")
    r = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "set OUT_DIR" in r.stderr
    out = tmp_path / "slurm"
    extra = [a for a in _args(cache, out, "train.max_steps=2") if not a.startswith(("--cfg", "tiny.yaml", "log.out_dir"))]
    r = subprocess.run(["bash", script, *extra], env=dict(env, OUT_DIR=str(out)), capture_output=True, text=True,
                       timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rendezvous 127.0.0.1" in r.stdout and torch.load(out / "ckpt.pt", weights_only=True)["step"] == 2


def test_gradient_accumulation_equals_a_larger_batch(cache, tmp_path, one_process_16):
    """Global batch 16 as one process x 8 x 2 accumulation steps: the same images per step (the
    loader's slicing), so the same losses and weights as one process x 16."""
    r = _train(cache, tmp_path / "accum", *GB16)
    assert r.returncode == 0 and "2 accumulation step(s)" in r.stdout, r.stderr[-3000:]
    _same_run(tmp_path / "accum", one_process_16)
    # control: global batch 8 (the first half of each step's images) trains to other weights
    assert _train(cache, tmp_path / "one_8", *GB16, "train.global_batch=8").returncode == 0
    other = torch.load(tmp_path / "one_8" / "ckpt.pt", weights_only=True)["model"]
    ref = torch.load(one_process_16 / "ckpt.pt", weights_only=True)["model"]
    assert max(float((other[k] - w).abs().max()) for k, w in ref.items()) > 1e-3


def test_preempted_and_restarted_runs_resume_bitwise(cache, tmp_path, uninterrupted_28):
    """SIGTERM mid-epoch: the step finishes, the checkpoint is written, exit 3; re-run, the weights
    of a run that never stopped. Under torchrun --max-restarts 1 a worker killed (SIGKILL) after
    its first checkpoint is restarted and resumes from it, to the same weights."""
    p, last = P28, 28
    c = tmp_path / "c"
    proc = subprocess.Popen([sys.executable, str(ROOT / "beitfast" / "train.py"), *_args(cache, c, *p)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    while not ((c / "metrics.jsonl").exists() and (c / "metrics.jsonl").read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    o, e = proc.communicate(timeout=300)
    at = torch.load(c / "ckpt.pt", weights_only=True)["step"]
    assert proc.returncode == 3 and "SIGTERM received" in e and f"stopped at step {at} on SIGTERM" in o, e[-2000:]
    assert 2 <= at < last, at  # before the end: mid-epoch but for a 1-in-14 chance
    assert json.loads((c / "PREEMPTED").read_text()) == {"step": at, "signal": "SIGTERM"}
    r = _train(cache, c, *p)
    assert r.returncode == 0 and f"resumed from {c / 'ckpt.pt'} at step {at}" in r.stdout, r.stderr[-2000:]
    _same_weights(uninterrupted_28, c)
    assert not (c / "PREEMPTED").exists()  # the resumed run took the marker away
    # under torchrun --max-restarts 1, a worker killed (SIGKILL) after its first checkpoint is restarted and resumes
    d = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "--max-restarts",
                             "1", str(ROOT / "beitfast" / "train.py"), *_args(cache, d, *p)],
                            cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    while not (d / "ckpt.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    workers = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
    assert len(workers) == 1
    os.kill(int(workers[0]), signal.SIGKILL)
    o, e = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "resumed from" in o, e[-3000:]
    _same_weights(uninterrupted_28, d)
