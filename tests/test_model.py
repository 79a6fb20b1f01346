"""The BEiT model: faithfulness facts, gradients, options, interop parity with timm and HF."""
import math

import pytest
import torch

from beitfast.model import SIZES, Beit, BeitArgs, load_reference, relative_position_index, to_hf, to_timm


def _perturbed(model, seed=0):
    """Random weights everywhere (the init leaves tables at 0 and gammas constant)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


@pytest.mark.parametrize("size", list(SIZES))
def test_every_size_trains(size):
    # drop path off: a block dropped for every sample rightly leaves its gamma without gradient
    m = Beit(BeitArgs(size=size, img_size=32, patch_size=16, vocab_size=50, depth=2, kernels="torch", drop_path=0.0))
    x = torch.randn(2, 3, 32, 32)
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=torch.bool).reshape(2, 2, 2)
    out = m(x, mask, torch.randint(0, 50, (2, 2, 2)))
    assert torch.isfinite(out["loss"]) and int(out["n_masked"]) == 4
    out["loss"].backward()
    for name, p in m.named_parameters():
        if name == "pos_embed":
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "mask_token":
            assert p.grad.abs().sum() > 0, name
    assert m.mask_token.grad.abs().sum() > 0
    dim, depth, heads, ls = SIZES[size]
    assert m.cls_token.shape == (1, 1, dim) and m.blocks[0].gamma_1.eq(ls).all()


def test_drop_path_drops_whole_samples():
    torch.manual_seed(0)
    m = Beit(BeitArgs(size="tiny", img_size=32, depth=2, drop_path=0.5, kernels="torch"))
    blk = m.blocks[1]
    assert blk.drop_path == 0.5
    keep = blk._keep(torch.zeros(4000, 1, 1))
    assert set(keep.unique().tolist()) == {0.0, 2.0} and abs(float((keep > 0).float().mean()) - 0.5) < 0.03
    m.eval()
    assert blk._keep(torch.zeros(3, 1, 1)).eq(1).all()


def test_base_structure_and_init():
    torch.manual_seed(0)
    m = Beit(BeitArgs(size="base"))
    sd = m.state_dict()
    assert sd["rel_pos_bias.relative_position_bias_table"].shape == (732, 12)
    assert sd["rel_pos_bias.relative_position_bias_table"].eq(0).all()
    assert sd["blocks.0.attn.qkv.weight"].shape == (2304, 768) and "blocks.0.attn.qkv.bias" not in sd
    assert m.blocks[0].norm1.eps == 1e-6 and m.norm.eps == 1e-6 and m.lm_head.weight.shape == (8192, 768)
    assert len(m.blocks) == 12 and m.blocks[0].gamma_1.eq(0.1).all()
    assert [round(b.drop_path, 4) for b in m.blocks] == [round(0.1 * i / 11, 4) for i in range(12)]
    for name in ("cls_token", "mask_token", "lm_head.weight", "blocks.0.mlp.fc1.weight", "patch_embed.proj.weight"):
        t = sd[name]
        assert t.abs().max() <= 0.02 + 1e-7 and 0.008 < t.std() < 0.012, name  # trunc normal std 0.02 at +-0.02
    for layer in (1, 6, 12):  # 1/sqrt(2l) rescale
        w = sd[f"blocks.{layer - 1}.attn.proj.weight"]
        assert w.abs().max() <= 0.02 / math.sqrt(2 * layer) + 1e-7
        assert abs(w.std() * math.sqrt(2 * layer) / sd["blocks.0.mlp.fc1.weight"].std() - 1) < 0.05
    assert sd["blocks.3.attn.q_bias"].eq(0).all() and sd["norm.weight"].eq(1).all()
    assert Beit(BeitArgs(size="large", depth=1)).blocks[0].gamma_1.eq(1e-5).all()


def test_relative_position_index():
    idx = relative_position_index(14, 14)
    assert idx.shape == (197, 197)
    assert idx[0, 0] == 731 and (idx[0, 1:] == 729).all() and (idx[1:, 0] == 730).all()
    # patch (r1, c1) -> (r2, c2): (r1 - r2 + 13) * 27 + (c1 - c2 + 13)
    p = lambda r, c: 1 + r * 14 + c  # noqa: E731
    assert idx[p(0, 0), p(13, 13)] == 0 and idx[p(13, 13), p(0, 0)] == 26 * 27 + 26
    assert idx[p(5, 7), p(5, 7)] == 13 * 27 + 13 and idx[p(2, 3), p(4, 9)] == 11 * 27 + 7


def test_masked_positions_carry_the_mask_token():
    m = Beit(BeitArgs(size="tiny", img_size=64, patch_size=16, depth=1, kernels="torch"))
    seen = {}
    m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(x=args[0].detach()))
    mask = torch.rand(2, 4, 4) < 0.5
    m.forward_features(torch.randn(2, 3, 64, 64), mask)
    tokens = seen["x"][:, 1:]  # cls dropped
    assert torch.equal(tokens[mask.reshape(2, -1)], m.mask_token[0].expand(int(mask.sum()), -1).detach())
    assert not torch.equal(tokens[~mask.reshape(2, -1)][:1], m.mask_token[0].detach())
    assert torch.equal(seen["x"][:, 0], m.cls_token[0].expand(2, -1).detach())


def test_fused_head_equals_plain_cross_entropy():
    torch.manual_seed(1)
    m = _perturbed(Beit(BeitArgs(size="tiny", img_size=64, vocab_size=90, depth=2, kernels="torch")))
    m.eval()
    x, mask = torch.randn(3, 3, 64, 64), torch.rand(3, 4, 4) < 0.4
    tgt = torch.randint(0, 90, (3, 4, 4))
    out = m(x, mask, tgt)
    logits = m.masked_logits(x, mask)
    ref = torch.nn.functional.cross_entropy(logits, tgt[mask])
    torch.testing.assert_close(out["loss"], ref)
    assert int(out["correct"]) == int((logits.argmax(-1) == tgt[mask]).sum())
    empty = m(x, torch.zeros_like(mask), tgt)
    assert float(empty["loss"]) == 0 and int(empty["n_masked"]) == 0


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_static_masked_head_in_the_model(kernels):
    """The sync-free path (max_masked = the mask budget) gives the loss, counts and gradients of
    the exact-size gather, whether the batch is under the budget or at it."""
    torch.manual_seed(3)
    m = _perturbed(Beit(BeitArgs(size="tiny", img_size=32, vocab_size=40, depth=1, kernels=kernels, drop_path=0)))
    x, tgt = torch.randn(3, 3, 32, 32), torch.randint(0, 40, (3, 2, 2))
    mask = torch.tensor([[[1, 0], [0, 1]], [[0, 0], [1, 0]], [[1, 1], [0, 0]]]).bool()  # 2, 1, 2 of budget 2
    grads = []
    for max_masked in (None, 2, 3):
        m.zero_grad()
        out = m(x, mask, tgt, max_masked=max_masked)
        out["loss"].backward()
        grads.append((out["loss"].detach(), int(out["correct"]), int(out["n_masked"]),
                      [p.grad.clone() for p in m.parameters() if p.grad is not None]))
    for g in grads[1:]:
        torch.testing.assert_close(g[0], grads[0][0], rtol=1e-5, atol=1e-6)
        assert g[1:3] == grads[0][1:3] and g[2] == 5
        for a, b in zip(g[3], grads[0][3]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_triton_kernels_in_the_model_match_torch():
    torch.manual_seed(2)
    base = _perturbed(Beit(BeitArgs(size="tiny", img_size=32, vocab_size=40, depth=1, kernels="torch", drop_path=0)))
    fast = Beit(BeitArgs(size="tiny", img_size=32, vocab_size=40, depth=1, kernels="triton", drop_path=0))
    fast.load_state_dict(base.state_dict())
    x, mask, tgt = torch.randn(2, 3, 32, 32), torch.tensor([[[1, 0], [0, 1]], [[0, 1], [1, 1]]]).bool(), \
        torch.randint(0, 40, (2, 2, 2))
    for mdl in (base, fast):
        mdl(x, mask, tgt)["loss"].backward()
    torch.testing.assert_close(fast(x, mask, tgt)["loss"], base(x, mask, tgt)["loss"], rtol=1e-5, atol=1e-6)
    for (n, a), (_, b) in zip(base.named_parameters(), fast.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_flex_attention_equals_sdpa():
    torch.manual_seed(3)
    a = _perturbed(Beit(BeitArgs(size="tiny", img_size=32, depth=1, kernels="torch"))).eval()
    b = Beit(BeitArgs(size="tiny", img_size=32, depth=1, kernels="torch", attention="flex")).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(b.forward_features(x), a.forward_features(x), rtol=1e-4, atol=1e-5)


def test_options_per_block_table_and_abs_pos():
    torch.manual_seed(4)
    shared = _perturbed(Beit(BeitArgs(size="tiny", img_size=32, depth=2, kernels="torch"))).eval()
    per = Beit(BeitArgs(size="tiny", img_size=32, depth=2, kernels="torch", rel_pos_bias="per_block")).eval()
    assert per.rel_pos_bias is None and per.blocks[1].attn.relative_position_bias_table.shape == (12, 3)
    per.load_state_dict(to_timm(shared), strict=False)
    per.mask_token.data.copy_(shared.mask_token)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(per.forward_features(x), shared.forward_features(x))
    ab = Beit(BeitArgs(size="tiny", img_size=32, depth=1, abs_pos_emb=True, rel_pos_bias="none", kernels="torch"))
    assert ab.pos_embed.shape == (1, 5, 192) and ab.forward_features(x).shape == (1, 5, 192)


def test_reference_checkpoint_keys_load():
    m = Beit(BeitArgs(size="base", depth=2))
    keys = set(m.state_dict())
    for k in ("cls_token", "mask_token", "patch_embed.proj.weight", "rel_pos_bias.relative_position_bias_table",
              "rel_pos_bias.relative_position_index", "blocks.1.attn.q_bias", "blocks.1.attn.v_bias",
              "blocks.1.gamma_2", "blocks.1.mlp.fc2.bias", "norm.weight", "lm_head.bias"):
        assert k in keys, k
    other = Beit(BeitArgs(size="base", depth=2))
    load_reference(other, {k: v.clone() for k, v in _perturbed(m).state_dict().items()})
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), other.state_dict().values()))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_parity_with_timm():
    from timm.models.beit import Beit as TimmBeit

    torch.manual_seed(5)
    m = _perturbed(Beit(BeitArgs(size="base", img_size=64, depth=2, drop_path=0, kernels="torch"))).eval()
    t = TimmBeit(img_size=64, patch_size=16, embed_dim=768, depth=2, num_heads=12, qkv_bias=True,
                 use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1, num_classes=0).eval()
    missing, unexpected = t.load_state_dict(to_timm(m), strict=False)
    assert set(missing) == {"fc_norm.weight", "fc_norm.bias"} and not unexpected
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert _rel(m.forward_features(x), t.forward_features(x)) < 1e-5


@pytest.mark.parametrize("rel_pos", ["shared", "per_block"])
def test_parity_with_huggingface(rel_pos):
    """to_hf in the installed transformers' naming (5.x renamed BEiT's parameters; the
    compatibility run, scripts/compat_check.sh, takes 4.x): every key loads, logits agree."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    m = _perturbed(Beit(BeitArgs(size="base", img_size=64, vocab_size=300, depth=2, drop_path=0, kernels="torch",
                                 rel_pos_bias=rel_pos, abs_pos_emb=rel_pos == "per_block"))).eval()
    cfg = transformers.BeitConfig(image_size=64, patch_size=16, hidden_size=768, num_hidden_layers=2,
                                  num_attention_heads=12, intermediate_size=3072, use_mask_token=True,
                                  use_shared_relative_position_bias=rel_pos == "shared",
                                  use_relative_position_bias=rel_pos == "per_block",
                                  use_absolute_position_embeddings=rel_pos == "per_block", layer_norm_eps=1e-6,
                                  vocab_size=300, layer_scale_init_value=0.1, hidden_act="gelu")
    hf = transformers.BeitForMaskedImageModeling(cfg).eval()
    missing, unexpected = hf.load_state_dict(to_hf(m), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    x, mask = torch.randn(2, 3, 64, 64), torch.rand(2, 4, 4) < 0.4
    with torch.no_grad():
        ours = m.masked_logits(x, mask)
        theirs = hf(pixel_values=x, bool_masked_pos=mask.reshape(2, -1)).logits[mask.reshape(2, -1)]
    assert ours.shape == theirs.shape and _rel(ours, theirs) < 1e-5


def test_hf_namings_differ_only_in_names():
    """The v4 and v5 dicts hold the same tensors under other names (one key for one key)."""
    m = Beit(BeitArgs(size="tiny", img_size=32, vocab_size=50, depth=2, kernels="torch"))
    v4, v5 = to_hf(m, "v4"), to_hf(m, "v5")
    assert len(v4) == len(v5) and set(v4) != set(v5)
    assert "beit.encoder.layer.1.attention.attention.query.weight" in v4 and "beit.layers.1.attention.q_proj.weight" in v5
    assert sorted(float(t.double().sum()) for t in v4.values()) == sorted(float(t.double().sum()) for t in v5.values())
    with pytest.raises(ValueError, match="naming"):
        to_hf(m, "v3")


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_step_with_triton_kernels_is_one_graph(backend):
    """The fused kernels are torch custom ops, so torch.compile(fullgraph=True) takes the
    whole step with them (here through Triton's interpreter) and gives eager's loss and
    gradients."""
    torch.manual_seed(5)
    m = _perturbed(Beit(BeitArgs(size="tiny", img_size=32, vocab_size=40, depth=1, kernels="triton", drop_path=0)))
    x, tgt = torch.randn(2, 3, 32, 32), torch.randint(0, 40, (2, 2, 2))
    mask = torch.tensor([[[1, 0], [0, 1]], [[0, 0], [1, 0]]]).bool()
    loss = m(x, mask, tgt, max_masked=2)["loss"]
    loss.backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    try:
        out = torch.compile(m, fullgraph=True, backend=backend)(x, mask, tgt, max_masked=2)
        out["loss"].backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out["loss"], loss, rtol=1e-5, atol=1e-6)
    for p, g in zip(m.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


def test_mim_step_traces_as_one_graph_with_the_mask_budget():
    """With max_masked the whole MIM step (forward and backward) is one torch.compile graph: no
    data-dependent shape, no host read. Without it the boolean gather breaks the graph (control)."""
    torch.manual_seed(4)
    m = _perturbed(Beit(BeitArgs(size="tiny", img_size=32, vocab_size=40, depth=1, kernels="torch", drop_path=0)))
    x, tgt = torch.randn(2, 3, 32, 32), torch.randint(0, 40, (2, 2, 2))
    mask = torch.tensor([[[1, 0], [0, 1]], [[0, 0], [1, 0]]]).bool()
    eager = m(x, mask, tgt)["loss"]
    try:
        compiled = torch.compile(m, fullgraph=True, backend="eager")
        out = compiled(x, mask, tgt, max_masked=2)
        out["loss"].backward()
        torch.testing.assert_close(out["loss"], eager, rtol=1e-5, atol=1e-6)
        torch._dynamo.reset()
        with pytest.raises(Exception, match="data-dependent|depends on input Tensor data"):  # torch 2.14 | 2.8
            torch.compile(m, fullgraph=True, backend="eager")(x, mask, tgt)
    finally:
        torch._dynamo.reset()


def _bf16_model(kernels, gamma, seed=7):
    """A tiny 2-block model with random weights but the given layer scale (BEiT-L's 1e-5)."""
    torch.manual_seed(seed)
    m = Beit(BeitArgs(size="tiny", img_size=32, vocab_size=40, depth=2, kernels=kernels, drop_path=0,
                      layer_scale_init=gamma))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "gamma" not in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return m


def _stream_update(m, x, mask, autocast: bool):
    """(dtype of the stream after the blocks, what the blocks added to the embedded tokens)."""
    seen = {}
    hook = m.blocks[0].register_forward_pre_hook(lambda mod, args: seen.update(x0=args[0].detach()))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = m.forward_features(x, mask).detach()
    finally:
        hook.remove()
    return out.dtype, (out.float() - seen["x0"].float())


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_bf16_residual_stream_keeps_the_branch_updates(kernels):
    """Residual-dtype policy: under bf16 autocast the stream stays fp32, so BEiT-L's 1e-5 *
    branch updates survive (in a bf16 stream they are far below its resolution and vanish).
    What the blocks add must match the fp32 model's within bf16 branch rounding."""
    m = _bf16_model(kernels, 1e-5)
    x, mask = torch.randn(2, 3, 32, 32), torch.rand(2, 2, 2) < 0.5
    dtype, upd = _stream_update(m, x, mask, autocast=True)
    _, ref = _stream_update(m, x, mask, autocast=False)
    assert dtype == torch.float32
    assert ref.norm() > 0 and _rel(upd, ref) < 3e-2, _rel(upd, ref)


def test_bf16_fused_matches_unfused_per_tensor_at_large_layer_scale():
    """Fused (Triton, interpreted here) vs unfused under bf16 autocast at BEiT-L's gamma 1e-5:
    the loss and EVERY parameter's gradient, each compared on its own (one norm over all
    gradients would be dominated by the largest tensors)."""
    x, mask, tgt = torch.randn(2, 3, 32, 32), torch.rand(2, 2, 2) < 0.6, torch.randint(0, 40, (2, 2, 2))
    mask[0, 0, 0] = True
    out = {}
    for k in ("torch", "triton"):
        m = _bf16_model(k, 1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o = m(x, mask, tgt, max_masked=4)
        o["loss"].backward()
        out[k] = (o["loss"].detach(), {n: p.grad.float() for n, p in m.named_parameters() if p.grad is not None})
    assert _rel(out["triton"][0], out["torch"][0]) < 1e-2
    assert out["triton"][1].keys() == out["torch"][1].keys() and len(out["torch"][1]) > 20
    errs = {n: _rel(out["triton"][1][n], g) for n, g in out["torch"][1].items() if g.norm() > 0}
    assert max(errs.values()) < 2e-2, sorted(errs.items(), key=lambda kv: -kv[1])[:5]


def test_pixel_target_regresses_the_masked_patches():
    """model.target=pixels (the paper's ablation): the loss equals the mean squared error
    between the head's outputs and the masked patches' pixels, computed patch by patch."""
    from beitfast.model import Beit, BeitArgs

    torch.manual_seed(int(torch.randint(1 << 20, (1,))))
    m = Beit(BeitArgs(size="tiny", img_size=32, patch_size=8, vocab_size=16, target="pixels", depth=2)).eval()
    assert m.lm_head.out_features == 192
    x = torch.randn(3, 3, 32, 32)
    mask = torch.rand(3, 4, 4) < 0.4
    mask[0, 0, 0] = True
    out = m(x, mask, torch.zeros(3, 4, 4, dtype=torch.long))
    with torch.no_grad():
        pred = m.lm_head(m.norm(m.forward_features(x, mask))[:, 1:])
        errs = []
        for b, i, j in mask.nonzero().tolist():
            patch = x[b, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8].reshape(-1)
            errs.append(((pred[b, 4 * i + j] - patch) ** 2).mean())
    torch.testing.assert_close(out["loss"].detach(), torch.stack(errs).mean())
    assert int(out["n_masked"]) == int(mask.sum())
