"""Fused element-wise regions of the sparse modulated block (``trellis.modules.fused``): the fused
path equals the original one (forward and every gradient), in the eager and the compiled mode, the
state dict does not change, and the trainer's ``compile`` compiles the SLat model's regions."""

import copy
import os

import pytest
import torch
from test_flow_demo_data import train_losses_of, write_flow_root

from trellis.config import load_config
from trellis.models.structured_latent_flow import ElasticSLatFlowModel
from trellis.modules import fused
from trellis.modules.sparse.basic import SparseTensor
from trellis.modules.sparse.transformer import ModulatedSparseTransformerCrossBlock
from trellis.trainers.base import compile_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, C_CTX, HEADS, L_CTX = 64, 48, 4, 5
COUNTS = [7, 1, 12]  # uneven batch items, one with a single voxel


def _can_inductor() -> bool:
    """Inductor compiles C++ on the CPU: it needs a working compiler (checked by compiling a tiny
    function once)."""
    try:
        fn = torch.compile(lambda a: a * 2 + 1)
        return bool(torch.equal(fn(torch.ones(3)), torch.full((3,), 3.0)))
    except Exception:  # noqa: BLE001 - any inductor / toolchain failure means "cannot run here"
        return False


_INDUCTOR = None


def inductor_ok() -> bool:
    global _INDUCTOR
    if _INDUCTOR is None:
        _INDUCTOR = _can_inductor()
    return _INDUCTOR


def sparse_batch(counts=COUNTS, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for b, n in enumerate(counts):
        xyz = torch.randperm(8 ** 3, generator=g)[:n]
        rows.append(torch.stack([torch.full((n,), b), xyz // 64, (xyz // 8) % 8, xyz % 8], 1))
    return torch.cat(rows).int()


def make_block(share_mod=False, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"qk_rms_norm": True, "qk_rms_norm_cross": True, **kw}
    blk = ModulatedSparseTransformerCrossBlock(C, C_CTX, num_heads=HEADS, share_mod=share_mod, **kw)
    with torch.no_grad():
        for p in blk.parameters():  # away from the zero / ones init so every path carries gradient
            p.normal_(0.0, 0.3)
    return blk


def run_block(blk, mode, dtype=torch.float32, share_mod=False, checkpoint=False, autocast=False, seed=1,
              counts=COUNTS, device="cpu"):
    """Forward + backward of a copy of ``blk`` in ``mode``; returns (output, {name: grad}) on the CPU."""
    b = copy.deepcopy(blk).to(device, dtype)
    b.use_checkpoint = checkpoint
    fused.set_fused(b, mode)
    coords = sparse_batch(counts).to(device)
    g = torch.Generator().manual_seed(seed)
    B, N = len(counts), coords.shape[0]
    feats = torch.randn(N, C, generator=g).to(device, dtype).requires_grad_()
    mod = torch.randn(B, 6 * C if share_mod else C, generator=g).to(device, dtype).requires_grad_()
    ctx = torch.randn(B, L_CTX, C_CTX, generator=g).to(device, dtype).requires_grad_()
    w = torch.randn(N, C, generator=g).to(device)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
        out = b(SparseTensor(feats, coords), mod, ctx).feats
    (out.float() * w).sum().backward()
    grads = {"feats": feats.grad, "mod": mod.grad, "context": ctx.grad}
    grads.update({n: p.grad for n, p in b.named_parameters()})
    assert all(v is not None for v in grads.values()), [k for k, v in grads.items() if v is None]
    return out.detach().cpu(), {k: v.cpu() for k, v in grads.items()}


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def assert_all_close(got, ref, tol):
    out_g, grads_g = got
    out_r, grads_r = ref
    assert out_g.dtype == out_r.dtype
    assert rel(out_g, out_r) <= tol, ("output", rel(out_g, out_r))
    bad = {k: rel(grads_g[k], grads_r[k]) for k in grads_r if rel(grads_g[k], grads_r[k]) > tol}
    assert not bad, bad


# --------------------------------------------------------------------------------------- switch
def test_env_switch(monkeypatch):
    blk = make_block()
    monkeypatch.delenv("TRELLIS_FUSED", raising=False)
    assert fused.env_fused_mode() == "off" and fused.fused_kernels(blk) is None
    monkeypatch.setenv("TRELLIS_FUSED", "eager")
    assert fused.fused_kernels(blk).compiled is False
    monkeypatch.setenv("TRELLIS_FUSED", "1")
    assert fused.fused_kernels(blk).compiled is True
    assert fused.set_fused(blk, "off") == 5  # the block and the q/k RMS norms of both attentions
    assert fused.fused_kernels(blk) is None  # a module's own setting wins over the environment
    monkeypatch.setenv("TRELLIS_FUSED", "maybe")
    fused.set_fused(blk, None)
    with pytest.raises(ValueError, match="TRELLIS_FUSED"):
        fused.fused_kernels(blk)
    with pytest.raises(ValueError, match="mode"):
        fused.set_fused(blk, "fast")
    fused.set_fused(blk, "compile", backend="eager", options=None, dynamic=None)
    fused.set_fused(blk.self_attn, "compile", backend="inductor", options={"max_autotune": False})
    assert fused.fused_kernels(blk) is fused.fused_kernels(blk.cross_attn.q_rms_norm)
    assert dict(fused.fused_kernels(blk.self_attn.q_rms_norm).setting.compile_kwargs)["options"] == {"max_autotune": False}


def test_state_dict_unchanged():
    torch.manual_seed(0)
    model = ElasticSLatFlowModel(resolution=64, in_channels=8, model_channels=32, cond_channels=32,
                                 out_channels=8, num_blocks=2, num_heads=2, io_block_channels=[8],
                                 num_io_res_blocks=1, qk_rms_norm=True, use_fp16=True)
    before = model.state_dict()
    n = model.compile_fused_regions(backend="eager")
    assert n == 2 + 2 * 2  # two blocks, each with q/k RMS norms in the self-attention
    after = model.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert {b.fused_setting.mode for b in model.blocks} == {"compile"}


# ----------------------------------------------------------------------------------- functions
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_batch_rows_matches_index_gather(dtype):
    """PerBatchRows = v[ids] forward; its one-hot GEMM backward = the index gather's scatter-add."""
    ids = sparse_batch()[:, 0].long()
    g = torch.Generator().manual_seed(3)
    v = torch.randn(len(COUNTS), 6, generator=g).to(dtype)
    grad = torch.randn(ids.shape[0], 6, generator=g).to(dtype)
    a, b = v.clone().requires_grad_(), v.clone().requires_grad_()
    out = fused.PerBatchRows.apply(a, ids)
    assert torch.equal(out, b[ids])
    out.backward(grad)
    b[ids].backward(grad)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-5)


def test_segment_sum_is_deterministic_and_exact():
    ids = torch.tensor([0, 0, 0, 1, 2, 2])
    v = torch.arange(12.0).reshape(6, 2)
    out = fused.segment_sum(v, ids, 4)
    assert torch.equal(out, torch.tensor([[6.0, 9.0], [6.0, 7.0], [18.0, 20.0], [0.0, 0.0]]))


# --------------------------------------------------------------------------------------- block
@pytest.mark.parametrize("share_mod", [False, True])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_block_fused_eager_matches_original_fp32(share_mod, checkpoint):
    blk = make_block(share_mod)
    ref = run_block(blk, "off", share_mod=share_mod, checkpoint=checkpoint)
    got = run_block(blk, "eager", share_mod=share_mod, checkpoint=checkpoint)
    assert torch.equal(got[0], ref[0])  # forward bit for bit
    assert_all_close(got, ref, 2e-6)


@pytest.mark.parametrize("kw", [{"use_rope": True}, {"qk_rms_norm": False, "qk_rms_norm_cross": False},
                                {"use_rope": True, "qk_rms_norm": False}], ids=["rope", "no_qk_norm", "rope_no_norm"])
def test_block_fused_eager_variants(kw):
    """RoPE (applied between the first segment and the attention) and the packed-qkv path without
    q/k norms: the fused forward is the original bit for bit."""
    blk = make_block(**kw)
    ref, got = run_block(blk, "off"), run_block(blk, "eager")
    assert torch.equal(got[0], ref[0])
    assert_all_close(got, ref, 2e-6)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16_weights", "bf16_autocast"])
def test_block_fused_eager_bf16(autocast):
    """bf16: the fused gradients are no further from the fp32 result than the original ones."""
    blk = make_block()
    exact = run_block(blk, "off")
    dtype = torch.float32 if autocast else torch.bfloat16
    ref = run_block(blk, "off", dtype=dtype, autocast=autocast)
    got = run_block(blk, "eager", dtype=dtype, autocast=autocast)
    assert torch.equal(got[0], ref[0])
    for k in exact[1]:
        assert rel(got[1][k], exact[1][k]) <= 2 * rel(ref[1][k], exact[1][k]) + 1e-3, k


def test_fused_block_falls_back_inside_a_whole_compile(monkeypatch):
    """Under an outer torch.compile the modules run their original code (the outer compile fuses)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    blk = make_block()
    fused.set_fused(blk, "compile")
    assert fused.fused_kernels(blk) is None


# ------------------------------------------------------------------------------------ compiled
needs_inductor = pytest.mark.skipif("not inductor_ok()", reason="torch.compile (inductor) cannot build kernels here "
                                                                "(no working C++ compiler)")


@needs_inductor
def test_block_compiled_matches_original():
    torch._dynamo.reset()
    blk = make_block()
    ref = run_block(blk, "off")
    got = run_block(blk, "compile")
    assert_all_close(got, ref, 2e-6)
    # another batch layout (rows and batch size change) reuses the graphs: rows are dynamic
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    counts = [3, 9, 4, 6]
    ref2, got2 = run_block(blk, "off", counts=counts), run_block(blk, "compile", counts=counts)
    assert_all_close(got2, ref2, 2e-6)
    assert counters["stats"]["unique_graphs"] == graphs
    # under activation checkpointing (the elastic models) the compiled segments run again in backward
    ref3 = run_block(blk, "off", counts=counts, checkpoint=True)
    got3 = run_block(blk, "compile", counts=counts, checkpoint=True)
    assert_all_close(got3, ref3, 2e-6)
    assert_all_close(got3, ref2, 2e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", [False, True], ids=["fp16_weights", "bf16_autocast"])
def test_block_compiled_cuda(autocast):
    """On the GPU, in the torso's 16-bit precisions (fp16 weights as inflat_all, bf16 autocast): the
    compiled block is no further from the float32 result than the original code is. Several batch
    layouts, with and without checkpointing."""
    torch._dynamo.reset()
    blk = make_block()
    dtype = torch.float32 if autocast else torch.float16
    for counts, checkpoint in ((COUNTS, False), ([40, 3, 77, 19], True), ([5, 64], False)):
        exact = run_block(blk, "off", counts=counts, device="cuda")
        kw = dict(dtype=dtype, autocast=autocast, counts=counts, device="cuda", checkpoint=checkpoint)
        ref, got = run_block(blk, "off", **kw), run_block(blk, "compile", **kw)
        assert rel(got[0], exact[0]) <= 2 * rel(ref[0], exact[0]) + 1e-3
        for k in exact[1]:
            assert rel(got[1][k], exact[1][k]) <= 2 * rel(ref[1][k], exact[1][k]) + 2e-3, (counts, k)


# ------------------------------------------------------------------------------------- trainer
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_flow_root(str(tmp_path_factory.mktemp("fused_root")), num=8)


def train_losses(root, out, steps=3, **targs):
    """Losses of ``steps`` steps of the tiny SLat flow demo config (and the trainer)."""
    cfg = load_config(os.path.join(REPO, "configs", "demo", "slat_flow_img_tiny.json"))
    cfg["trainer"]["args"].update(num_workers=0, i_print=0, i_log=0, i_sample=0, i_save=0, **targs)
    cfg["dataset"]["args"]["image_size"] = 28
    return train_losses_of(cfg, root, out, steps)


@pytest.mark.parametrize("how", ["env_eager", "trainer_compile_eager_backend", "trainer_compile_inductor"])
def test_demo_training_same_losses(how, root, tmp_path, monkeypatch):
    monkeypatch.delenv("TRELLIS_FUSED", raising=False)
    base, tr0 = train_losses(root, tmp_path / "plain")
    if how == "env_eager":
        monkeypatch.setenv("TRELLIS_FUSED", "eager")
        got, tr = train_losses(root, tmp_path / "fused")
    else:
        if how == "trainer_compile_inductor" and not inductor_ok():
            pytest.skip("torch.compile (inductor) cannot build kernels here (no working C++ compiler)")
        torch._dynamo.reset()
        got, tr = train_losses(root, tmp_path / "fused",
                               compile={"backend": "eager"} if how.endswith("eager_backend") else True)
        model = tr.models["denoiser"]
        assert tr.training_models["denoiser"] is model  # regions compiled, not the whole model
        assert all(b.fused_setting.mode == "compile" for b in model.blocks)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(base), rtol=1e-4, atol=1e-6)
    for (k, a), (k2, b) in zip(tr0.models["denoiser"].state_dict().items(),
                               tr.models["denoiser"].state_dict().items()):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


def test_dense_models_still_compile_whole(monkeypatch):
    """The dense SS flow model is still compiled whole, in one graph even with TRELLIS_FUSED on (its
    RMS norms then run their original code inside the outer compile)."""
    from trellis.models.sparse_structure_flow import SparseStructureFlowModel

    monkeypatch.setenv("TRELLIS_FUSED", "1")
    torch.manual_seed(0)
    dense = SparseStructureFlowModel(resolution=8, in_channels=4, model_channels=32, cond_channels=32,
                                     out_channels=4, num_blocks=1, num_heads=2, patch_size=2, qk_rms_norm=True)
    wrapped = compile_model(dense, {"backend": "eager", "fullgraph": True})
    assert wrapped is not dense and wrapped._orig_mod is dense
    x, t, cond = torch.randn(2, 4, 8, 8, 8), torch.rand(2) * 1000, torch.randn(2, 5, 32)
    monkeypatch.setenv("TRELLIS_FUSED", "0")
    ref = dense(x, t, cond)
    monkeypatch.setenv("TRELLIS_FUSED", "1")
    torch.testing.assert_close(wrapped(x, t, cond), ref)  # fullgraph: a graph break would raise
    sparse = ElasticSLatFlowModel(resolution=64, in_channels=8, model_channels=32, cond_channels=32,
                                  out_channels=8, num_blocks=1, num_heads=2, io_block_channels=[8],
                                  num_io_res_blocks=1)
    assert compile_model(sparse, {"backend": "eager"}) is sparse


def test_block_with_per_sequence_attention_and_checkpointing(monkeypatch):
    """The block with every attention as one SDPA call per object (``torch_seq``, what ``auto`` picks
    for long objects on CUDA): same output and gradients as the padded torch path, with and without
    activation checkpointing (the elastic memory controller's switch)."""
    blk = make_block()
    monkeypatch.setenv("SPARSE_ATTN_BACKEND", "torch")
    ref = run_block(blk, "off")
    monkeypatch.setenv("SPARSE_ATTN_BACKEND", "torch_seq")
    assert_all_close(run_block(blk, "off"), ref, 1e-5)
    assert_all_close(run_block(blk, "off", checkpoint=True), ref, 1e-5)


def test_default_compile_kwargs_add_combo_kernels_only_when_the_caller_leaves_room():
    default = fused.default_compile_kwargs({})
    assert default == {"options": {"combo_kernels": True}}
    assert fused.default_compile_kwargs({"dynamic": None}) == {"dynamic": None, **default}
    for own in ({"mode": "max-autotune-no-cudagraphs"}, {"options": {"max_autotune": False}}, {"backend": "eager"}):
        assert fused.default_compile_kwargs(dict(own)) == own
