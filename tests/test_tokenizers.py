"""Tokenizers: DALL-E parity with the dall_e package, safe loading, our dVAE end to end."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from beitfast.config import load_config
from beitfast.tokenizers import build_tokenizer, weights_checksum
from beitfast.tokenizers.dalle import DalleEncoder, DalleTokenizer, load_dalle_weights
from beitfast.tokenizers.dvae import DVAE, DVAEArch, DVAETokenizer, load_export
from tests.conftest import ROOT, in_process

try:
    import dall_e
except ImportError:  # only the parity and pickle tests need it; the dVAE tests do not
    dall_e = None
needs_dall_e = pytest.mark.skipif(dall_e is None, reason="the dall-e package is not installed")


def _dalle_reference_tokens(enc, x_uint8):
    return enc(dall_e.map_pixels(x_uint8.float() / 255)).argmax(1)


@pytest.fixture(scope="module")
def small_pickle(tmp_path_factory):
    if dall_e is None:
        pytest.skip("the dall-e package is not installed")
    torch.manual_seed(int(np.random.randint(1 << 30)))
    enc = dall_e.Encoder(n_hid=64, vocab_size=512)
    path = tmp_path_factory.mktemp("dalle") / "encoder.pkl"
    torch.save(enc, path)  # the format of OpenAI's encoder.pkl: a whole pickled module
    return enc, path


@needs_dall_e
def test_pickle_parity_with_dall_e(small_pickle):
    enc, path = small_pickle
    tok = DalleTokenizer.from_file(path, input_size=64, batch_size=5)
    x = torch.randint(0, 256, (12, 3, 64, 64), dtype=torch.uint8)
    ours = tok.encode(x)
    assert ours.dtype == torch.int64 and ours.shape == (12, 8, 8)
    assert torch.equal(ours, _dalle_reference_tokens(enc, x))
    assert torch.equal(tok.encode(x.float() / 255), ours)  # [0, 1] floats give the same tokens


@needs_dall_e
def test_state_dict_parity(small_pickle, tmp_path):
    enc, _ = small_pickle
    torch.save(enc.state_dict(), tmp_path / "sd.pt")
    tok = DalleTokenizer.from_file(tmp_path / "sd.pt", input_size=32)
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(tok.encode(x), _dalle_reference_tokens(enc, x))


@needs_dall_e
def test_full_size_architecture_and_one_image():
    """The default encoder: 53.8M parameters, 112 -> 14x14 of 8192, tokens equal dall_e's."""
    torch.manual_seed(0)
    enc = dall_e.Encoder()
    ours = DalleEncoder()
    ours.load_state_dict(enc.state_dict())
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in enc.parameters()) and abs(n / 1e6 - 53.8) < 0.1
    x = torch.randint(0, 256, (1, 3, 112, 112), dtype=torch.uint8)
    tok = DalleTokenizer(ours)
    assert tok.grid == (14, 14) and tok.vocab_size == 8192
    assert torch.equal(tok.encode(x), _dalle_reference_tokens(enc, x))


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/beitfast-pwned",))


@needs_dall_e
@pytest.mark.parametrize("payload", ["evil", "linear", "list", "garbage"])
def test_refuses_unexpected_pickles(tmp_path, payload):
    path = tmp_path / "encoder.pkl"
    if payload == "evil":
        torch.save({"blocks.input.w": Evil()}, path)
    elif payload == "linear":
        torch.save(torch.nn.Linear(2, 2), path)
    elif payload == "list":
        torch.save([torch.zeros(1)], path)
    else:
        path.write_bytes(pickle.dumps("x")[:3] + b"not a pickle at all")
    if os.path.exists("/tmp/beitfast-pwned"):
        os.remove("/tmp/beitfast-pwned")
    with pytest.raises(ValueError, match="refusing to load .*encoder.pkl"):
        load_dalle_weights(path)
    assert not os.path.exists("/tmp/beitfast-pwned")


def test_wrong_state_dict_is_refused(tmp_path):
    torch.save({"weight": torch.zeros(3)}, tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="not a DALL-E encoder state dict"):
        load_dalle_weights(tmp_path / "sd.pt")
    with pytest.raises(FileNotFoundError):
        load_dalle_weights(tmp_path / "missing.pkl")


@needs_dall_e
def test_identity_tracks_weights(small_pickle):
    _, path = small_pickle
    a = DalleTokenizer.from_file(path, input_size=32)
    b = DalleTokenizer.from_file(path, input_size=32)
    assert a.identity == b.identity and a.identity["kind"] == "dalle" and a.identity["vocab_size"] == 512
    with torch.no_grad():
        b.net.blocks.input.w[0, 0, 0, 0] += 1e-3
    b._checksum = None
    assert weights_checksum(b.net) != a.identity["weights_sha256"]


@needs_dall_e
def test_encode_rejects_wrong_size(small_pickle):
    tok = DalleTokenizer.from_file(small_pickle[1], input_size=32)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tok.encode(torch.zeros(2, 3, 30, 30))


@pytest.mark.parametrize("likelihood", ["logit_laplace", "mse"])
def test_dvae_forward_backward_and_export(tmp_path, likelihood):
    arch = DVAEArch(vocab_size=64, n_hid=16, n_init=16, n_blk_per_group=1, downsample=4, likelihood=likelihood)
    model = DVAE(arch)
    x = torch.rand(3, 3, 16, 16)
    o = model(x, tau=0.7, beta=1.0)
    assert torch.isfinite(o["loss"]) and o["recon"].shape == x.shape and o["logits"].shape == (3, 64, 4, 4)
    o["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    torch.save(model.export(16), tmp_path / "tokenizer.pt")
    tok = DVAETokenizer.from_file(tmp_path / "tokenizer.pt")
    assert tok.grid == (4, 4) and tok.vocab_size == 64 and tok.identity["kind"] == "dvae"
    codes, _ = model.reconstruct_hard(x)
    assert torch.equal(tok.encode(x), codes)
    cfg = load_config("tiny", ["tokenizer.kind=dvae", f"tokenizer.path={tmp_path / 'tokenizer.pt'}"])
    assert build_tokenizer(cfg.tokenizer, 16).identity == tok.identity
    with pytest.raises(ValueError, match="trained at 16 px"):
        build_tokenizer(cfg.tokenizer, 32)


def test_dvae_export_is_checked(tmp_path):
    torch.save({"format": "something-else"}, tmp_path / "t.pt")
    with pytest.raises(ValueError, match="format 'something-else'"):
        load_export(tmp_path / "t.pt")


def _train(toy_root, out, *extra, nproc=1, timeout=600):
    args = [f"data.root={toy_root}", f"log.out_dir={out}", "log.progress=false", "data.eval_images=16",
            "data.batch_size=16", *extra]
    script = str(ROOT / "data_prep" / "train_dvae.py")
    if nproc == 1:  # in this process (no interpreter start-up per run), one thread as OMP_NUM_THREADS=1 gave
        from data_prep.train_dvae import main

        r = in_process(main, ["--cfg", "dvae_tiny.yaml", *args], threads=1)
    else:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), script,
                            "--cfg", "dvae_tiny.yaml", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_dvae_training_beats_mean_image(toy_root, tmp_path):
    """A short schedule already reconstructs far better than the mean image and uses a real
    share of the codebook (the full tiny config is measured in the README)."""
    out = tmp_path / "run"
    _train(toy_root, out, "train.steps=300", "train.anneal_steps=240", "train.kl_warmup_steps=150",
           "log.eval_every=300", "log.ckpt_every=300", "optim.warmup_steps=20")
    ev = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in ev if r["kind"] == "eval"][-1]
    assert last["psnr"] > last["baseline_psnr"] + 2.5, last
    assert last["used_fraction"] > 0.05, last
    assert (out / "recon.png").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    tok = DVAETokenizer.from_file(out / "tokenizer.pt")
    assert tok.input_size == 32 and tok.grid == (8, 8)


def test_dvae_resume_is_equivalent(toy_root, tmp_path):
    common = ["train.steps=24", "log.ckpt_every=8", "log.eval_every=100", "log.every=4", "optim.warmup_steps=4"]
    _train(toy_root, tmp_path / "straight", *common)
    stopped = _train(toy_root, tmp_path / "resumed", *common, "--stop-at", "16")
    assert "stopped at step 16" in stopped.stdout
    assert not (tmp_path / "resumed" / "tokenizer.pt").exists()
    resumed = _train(toy_root, tmp_path / "resumed", *common)
    assert "resumed" in resumed.stdout
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=False)
    assert a["step"] == b["step"] == 24
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # bitwise: the data and RNG streams resume exactly
    rows = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == sorted(set(steps)) == [4, 8, 12, 16, 20, 24]  # nothing lost, nothing duplicated


def test_dvae_ddp_two_processes(toy_root, tmp_path):
    _train(toy_root, tmp_path / "ddp", "train.steps=6", "log.every=3", "log.eval_every=6", "log.ckpt_every=6",
           nproc=2)
    assert DVAETokenizer.from_file(tmp_path / "ddp" / "tokenizer.pt").vocab_size == 512


def test_dvae_config_errors(toy_root, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "data_prep" / "train_dvae.py"), "--cfg", "dvae_tiny.yaml",
                        "model.downsample=3"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "model.downsample" in r.stderr


def test_missing_dalle_weights_say_where_to_get_them(tmp_path):
    from beitfast.tokenizers.dalle import load_dalle_weights

    with pytest.raises(FileNotFoundError, match=r"nope.pkl .*cdn.openai.com/dall-e/encoder.pkl.*tokenizer.kind=dvae"):
        load_dalle_weights(tmp_path / "nope.pkl")


def test_precision_is_honoured_and_recorded(tmp_path):
    """tokenizer.precision: fp32 (the default, as the reference runs DALL-E) computes in fp32
    on every device; bf16 runs the encoder under bf16 autocast (the output conv stays fp32, as
    in dall_e). The identity a cache records carries it, the weights checksum does not change."""
    torch.manual_seed(0)
    model = DVAE(DVAEArch(vocab_size=64, n_hid=16, n_init=16, n_blk_per_group=1, downsample=4))
    torch.save(model.export(16), tmp_path / "tokenizer.pt")
    x = torch.rand(3, 3, 16, 16)
    ids, seen = {}, {}
    for p in ("fp32", "bf16"):
        cfg = load_config("tiny", [f"tokenizer.path={tmp_path / 'tokenizer.pt'}", f"tokenizer.precision={p}"])
        tok = build_tokenizer(cfg.tokenizer, 16)
        dtypes = []
        hooks = [tok.net.blocks.input.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype)),
                 tok.net.blocks.output.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))]
        codes = tok.encode(x)
        for h in hooks:
            h.remove()
        ids[p], seen[p] = tok.identity, dtypes
        assert codes.shape == (3, 4, 4)
    assert seen["fp32"] == [torch.float32, torch.float32] and seen["bf16"] == [torch.bfloat16, torch.float32]
    assert ids["fp32"]["precision"] == "fp32" and ids["bf16"]["precision"] == "bf16"
    assert ids["fp32"]["weights_sha256"] == ids["bf16"]["weights_sha256"]
    with pytest.raises(ValueError, match="precision"):
        DVAETokenizer(model, 16, precision="fp16")


@needs_dall_e
def test_a_pickled_dalle_decoder_draws_as_its_own_code_and_nothing_else_loads(small_pickle, tmp_path):
    """OpenAI's decoder.pkl format (a whole pickled dall_e.Decoder) loads through its allow-list
    into our decoder and decodes tokens to the pixels dall_e's own code gives; its state dict
    does too; a pickled encoder offered as a decoder is refused."""
    from beitfast.tokenizers.dvae import decode_tokens, load_decoder

    torch.manual_seed(int(np.random.randint(1 << 30)))
    dec = dall_e.Decoder(n_init=16, n_hid=32, vocab_size=512, n_blk_per_group=1)
    torch.save(dec, tmp_path / "decoder.pkl")
    torch.save(dec.state_dict(), tmp_path / "decoder_sd.pt")
    codes = torch.randint(0, 512, (2, 4, 4))
    with torch.no_grad():
        want = dall_e.unmap_pixels(torch.sigmoid(dec(F.one_hot(codes, 512).permute(0, 3, 1, 2).float())[:, :3]))
    for path in (tmp_path / "decoder.pkl", tmp_path / "decoder_sd.pt"):
        model = load_decoder(path)
        assert model.arch.vocab_size == 512 and model.arch.downsample == 8
        torch.testing.assert_close(decode_tokens(model, codes), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="refusing to load"):
        load_decoder(small_pickle[1])
