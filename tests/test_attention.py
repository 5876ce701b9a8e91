"""Dense attention, RMS norm, RoPE and the varlen attention core, against float64 references."""

from __future__ import annotations

import importlib.util
import math
import warnings

import pytest
import torch

from trellis.backends import BackendError
from trellis.modules.attention import (
    MultiHeadAttention,
    MultiHeadRMSNorm,
    RotaryPositionEmbedder,
    VarlenPlan,
    attention_with_plan,
    naive_varlen_attention,
    packed_attention_with_plan,
    select_backend,
    varlen_attention,
)


def _cu(lens: list[int]) -> torch.Tensor:
    return torch.tensor([0] + lens).cumsum(0).to(torch.int32)


def _rand(*shape: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("ATTN_BACKEND", raising=False)
    monkeypatch.delenv("SPARSE_ATTN_BACKEND", raising=False)


# ----------------------------------------------------------------------------- varlen core
@pytest.mark.parametrize("lens_q,lens_kv", [
    ([5, 0, 17, 30, 1, 100, 3], None),  # self, an empty sequence, several buckets
    ([4, 9, 0, 33], [7, 1, 5, 60]),  # cross, different key lengths
    ([1030, 7], None),  # a sequence above the padding ladder (exact bucket)
])
def test_varlen_torch_matches_naive_forward_backward(lens_q, lens_kv):
    torch.manual_seed(0)
    lens_kv = lens_q if lens_kv is None else lens_kv
    cu_q, cu_kv = _cu(lens_q), _cu(lens_kv)
    H, d = 2, 8
    q, k, v = _rand(sum(lens_q), H, d), _rand(sum(lens_kv), H, d), _rand(sum(lens_kv), H, d)
    out = varlen_attention(q, k, v, cu_q, cu_kv, max(lens_q), max(lens_kv))
    ref = naive_varlen_attention(q, k, v, cu_q, cu_kv)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_varlen_gathered_rows_match_permuted_reference():
    torch.manual_seed(1)
    lens = [3, 50, 12, 1, 64]
    cu = _cu(lens)
    T, H, d = sum(lens), 3, 16
    q, k, v = _rand(T, H, d), _rand(T, H, d), _rand(T, H, d)
    perm = torch.randperm(T)
    plan = VarlenPlan(cu, index_q=perm)
    out = attention_with_plan(q, k, v, plan)
    ref = torch.empty_like(q)
    ref[perm] = naive_varlen_attention(q[perm], k[perm], v[perm], cu, cu)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_varlen_float32_and_custom_scale():
    torch.manual_seed(2)
    lens = [10, 20]
    cu = _cu(lens)
    q, k, v = (torch.randn(30, 2, 8) for _ in range(3))
    out = varlen_attention(q, k, v, cu, cu, scale=0.3)
    ref = naive_varlen_attention(q.double(), k.double(), v.double(), cu, cu, scale=0.3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_varlen_plan_is_reused_and_validates():
    cu = _cu([4, 6])
    plan = VarlenPlan(cu)
    assert (plan.max_q, plan.num_q, plan.num_seqs) == (6, 10, 2)
    q = torch.randn(10, 1, 4)
    attention_with_plan(q, q, q, plan)
    key = ("torch", q.device)
    cached = plan._cache[key]
    attention_with_plan(q, q, q, plan)
    assert plan._cache[key] is cached
    with pytest.raises(ValueError, match="no keys"):
        VarlenPlan(_cu([2, 3]), _cu([2, 0]))
    with pytest.raises(ValueError, match="rows"):
        attention_with_plan(torch.randn(9, 1, 4), q, q, plan)
    with pytest.raises(ValueError, match="max_q"):
        varlen_attention(q, q, q, cu, cu, max_q=5)
    with pytest.raises(ValueError, match="1-D integer"):
        VarlenPlan(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="non-decreasing"):
        VarlenPlan(torch.tensor([0, 5, 3]))


def test_packed_attention_matches_unbound():
    torch.manual_seed(9)
    lens = [3, 9, 1]
    plan = VarlenPlan(_cu(lens), index_q=torch.randperm(13))
    qkv = _rand(13, 3, 2, 8)
    out = packed_attention_with_plan(qkv, plan)
    ref = attention_with_plan(*qkv.unbind(1), plan)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, qkv, g)[0], torch.autograd.grad(ref, qkv, g)[0])
    with pytest.raises(ValueError, match="3, H, d"):
        packed_attention_with_plan(qkv[:, :2], plan)


@pytest.mark.parametrize("lens_q,lens_kv,gather", [
    ([5, 0, 17, 30, 1, 100, 3], None, False),  # self, an empty sequence
    ([4, 9, 0, 33], [7, 1, 5, 60], False),  # cross; sequence 2's keys have no queries (zero gradient)
    ([3, 50, 12, 1, 64], None, True),  # gathered rows
])
def test_per_sequence_backend_matches_naive(lens_q, lens_kv, gather):
    torch.manual_seed(3)
    lens_kv = lens_q if lens_kv is None else lens_kv
    cu_q, cu_kv = _cu(lens_q), _cu(lens_kv)
    H, d = 2, 8
    q, k, v = _rand(sum(lens_q), H, d), _rand(sum(lens_kv), H, d), _rand(sum(lens_kv), H, d)
    perm = torch.randperm(sum(lens_q)) if gather else None
    plan = VarlenPlan(cu_q, None if lens_kv is lens_q and gather else cu_kv, index_q=perm)
    out = attention_with_plan(q, k, v, plan, backend="torch_seq")
    ref = attention_with_plan(q, k, v, plan, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_per_sequence_packed_gradient_is_one_buffer():
    """The packed per-sequence path: same values as unbound q, k, v; qkv's gradient comes from one
    backward node writing all pieces (no stack of three gradients, no zero-filled slice gradients)."""
    torch.manual_seed(4)
    plan = VarlenPlan(_cu([6, 0, 11, 2]))
    qkv = _rand(19, 3, 2, 8)
    out = packed_attention_with_plan(qkv, plan, backend="torch_seq")
    ref = attention_with_plan(*qkv.unbind(1), plan, backend="torch")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, qkv, g)[0], torch.autograd.grad(ref, qkv, g)[0],
                               rtol=1e-10, atol=1e-10)
    node, seen = out.grad_fn, set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        stack.extend(f for f, _ in n.next_functions)
    names = {type(n).__name__ for n in seen}
    assert "_PiecesBackward" in names and "StackBackward0" not in names and "SliceBackward0" not in names


def test_per_sequence_warns_once_about_many_sequences(monkeypatch):
    """Forced onto hundreds of windows, torch_seq still computes the right thing, and says once that
    it is the wrong backend for it."""
    from trellis.modules.attention import per_sequence

    monkeypatch.setattr(per_sequence, "_warned_many", False)
    monkeypatch.setattr(per_sequence, "MANY_SEQUENCES", 8)
    plan = VarlenPlan(_cu([3] * 9))
    qkv = _rand(27, 3, 2, 4)
    with pytest.warns(UserWarning, match="one SDPA call per sequence and got 9 sequences"):
        out = packed_attention_with_plan(qkv, plan, backend="torch_seq")
    torch.testing.assert_close(out, attention_with_plan(*qkv.unbind(1), plan, backend="torch"), rtol=1e-10, atol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second call is silent
        attention_with_plan(*qkv.unbind(1), plan, backend="torch_seq")


# ----------------------------------------------------------------------------- backend choice
def test_auto_backend_by_sequence_lengths():
    from trellis.modules.attention import backend as bk

    cuda = torch.device("cuda")  # only the choice is made here; nothing runs on the device
    n = bk.PER_SEQUENCE_MIN_MEAN_LEN
    few_long = VarlenPlan(_cu([n + 5, n // 2, 2 * n] * 3))  # self-attention, one short sequence among long ones
    assert select_backend(cuda, torch.bfloat16, varlen=True, sparse=True, plan=few_long) == "torch_seq"
    assert select_backend(cuda, torch.float32, varlen=True, sparse=True, plan=few_long) != "torch_seq"
    cross = VarlenPlan(_cu([4000] * 8), _cu([1374] * 8))
    windows = VarlenPlan(_cu([100] * 500))
    short = VarlenPlan(_cu([n - 1] * 8))
    many = VarlenPlan(_cu([2 * n] * (bk.PER_SEQUENCE_MAX_SEQS + 1)))
    for plan in (cross, windows, short, many, None):
        assert select_backend(cuda, torch.bfloat16, varlen=True, sparse=True, plan=plan) != "torch_seq"
    assert select_backend(torch.device("cpu"), torch.bfloat16, varlen=True, sparse=True, plan=few_long) == "torch"


def test_backend_env_read_at_call_time(monkeypatch):
    cpu = torch.device("cpu")
    assert select_backend(cpu, torch.float32, varlen=True, sparse=True) == "torch"
    monkeypatch.setenv("SPARSE_ATTN_BACKEND", "not_a_backend")
    with pytest.raises(BackendError, match="not_a_backend"):
        select_backend(cpu, torch.float32, varlen=True, sparse=True)
    monkeypatch.setenv("SPARSE_ATTN_BACKEND", "flash_attn")
    with pytest.raises(BackendError, match="CUDA"):
        select_backend(cpu, torch.float16, varlen=True, sparse=True)
    monkeypatch.setenv("SPARSE_ATTN_BACKEND", "sdpa")
    assert select_backend(cpu, torch.float32, varlen=True, sparse=True) == "torch"
    monkeypatch.setenv("ATTN_BACKEND", "xformers")
    with pytest.raises(BackendError, match="CUDA"):
        MultiHeadAttention(8, 2)(torch.randn(1, 3, 8))


# ----------------------------------------------------------------------------- norm / rope
def test_multihead_rms_norm_formula_and_dtype():
    torch.manual_seed(3)
    norm = MultiHeadRMSNorm(8, 3)
    with torch.no_grad():
        norm.gamma.copy_(torch.rand(3, 8) + 0.5)
    x = torch.randn(2, 5, 3, 8)
    ref = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12) * norm.gamma * math.sqrt(8)
    torch.testing.assert_close(norm(x), ref)
    xh = x.half()
    y = norm(xh)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), ref, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="MultiHeadRMSNorm"):
        norm(torch.randn(2, 4, 8))


def test_rope_is_relative_and_norm_preserving():
    torch.manual_seed(4)
    rope = RotaryPositionEmbedder(16, in_channels=3)
    q, k = torch.randn(1, 2, 16, dtype=torch.float64), torch.randn(1, 2, 16, dtype=torch.float64)
    p1, p2 = torch.tensor([[3, 5, 7]]), torch.tensor([[1, 9, 2]])
    shift = torch.tensor([[4, -2, 6]])
    a1 = rope.angles(p1).double()
    a2 = rope.angles(p2).double()
    b1 = rope.angles(p1 + shift).double()
    b2 = rope.angles(p2 + shift).double()
    dot_a = (rope.rotate(q, a1) * rope.rotate(k, a2)).sum(-1)
    dot_b = (rope.rotate(q, b1) * rope.rotate(k, b2)).sum(-1)
    torch.testing.assert_close(dot_a, dot_b, rtol=1e-5, atol=1e-5)  # fp32 angles
    torch.testing.assert_close(rope.rotate(q, a1).norm(dim=-1), q.norm(dim=-1))
    assert not torch.allclose(rope.rotate(q, a1), q)


# ----------------------------------------------------------------------------- dense module
def _manual_mha(m: MultiHeadAttention, x: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
    """Float64 oracle built from the module's weights with explicit softmax."""
    B, L, C = x.shape
    H, d = m.num_heads, m.head_dim
    if ctx is None:
        qkv = x @ m.to_qkv.weight.T + m.to_qkv.bias
        q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    else:
        q = x @ m.to_q.weight.T + m.to_q.bias
        kv = ctx @ m.to_kv.weight.T + m.to_kv.bias
        k, v = kv[..., :C], kv[..., C:]
    q, k, v = (t.reshape(B, -1, H, d) for t in (q, k, v))
    if m.qk_rms_norm:
        q = q / q.norm(dim=-1, keepdim=True) * m.q_rms_norm.gamma * math.sqrt(d)
        k = k / k.norm(dim=-1, keepdim=True) * m.k_rms_norm.gamma * math.sqrt(d)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    o = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(B, L, C)
    return o @ m.to_out.weight.T + m.to_out.bias


@pytest.mark.parametrize("kind,qk_norm", [("self", False), ("self", True), ("cross", True)])
def test_dense_mha_matches_manual(kind, qk_norm):
    torch.manual_seed(5)
    C, H = 32, 4
    m = MultiHeadAttention(C, H, ctx_channels=24 if kind == "cross" else None, type=kind, qk_rms_norm=qk_norm)
    m = m.double()
    if qk_norm:
        with torch.no_grad():
            m.q_rms_norm.gamma.uniform_(0.5, 1.5)
            m.k_rms_norm.gamma.uniform_(0.5, 1.5)
    x = _rand(2, 7, C)
    ctx = _rand(2, 5, 24) if kind == "cross" else None
    out = m(x, ctx) if ctx is not None else m(x)
    ref = _manual_mha(m, x, ctx)
    tol = 1e-5 if qk_norm else 1e-9  # the RMS norm computes in float32 by contract
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    params = [p for p in m.parameters()]
    g = torch.randn_like(out)
    inputs = [x] + ([ctx] if ctx is not None else [])
    ga = torch.autograd.grad(out, params + inputs, g)
    gb = torch.autograd.grad(ref, params + inputs, g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_dense_mha_keys_and_errors():
    m = MultiHeadAttention(1280, 16, ctx_channels=768, type="cross", qk_rms_norm=True)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "to_q.weight": (1280, 1280), "to_q.bias": (1280,), "to_kv.weight": (2560, 768), "to_kv.bias": (2560,),
        "q_rms_norm.gamma": (16, 80), "k_rms_norm.gamma": (16, 80), "to_out.weight": (1280, 1280),
        "to_out.bias": (1280,),
    }
    assert list(MultiHeadAttention(64, 4).state_dict()) == ["to_qkv.weight", "to_qkv.bias", "to_out.weight",
                                                            "to_out.bias"]
    with pytest.raises(ValueError, match="attn_mode"):
        MultiHeadAttention(64, 4, attn_mode="windowed")
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(65, 4)
    with pytest.raises(ValueError, match="context"):
        MultiHeadAttention(64, 4, type="cross")(torch.randn(1, 3, 64))


def test_dense_mha_rope_changes_output_and_runs_backward():
    torch.manual_seed(6)
    m = MultiHeadAttention(32, 2, use_rope=True)
    x = torch.randn(2, 6, 32, requires_grad=True)
    y = m(x)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    plain = MultiHeadAttention(32, 2)
    plain.load_state_dict(m.state_dict())
    assert not torch.allclose(plain(x), y)


# ----------------------------------------------------------------------------- triton kernel
def _triton_compare(device: str, dtype: torch.dtype, tol: float, lens: list[int], lens_kv: list[int] | None,
                    H: int, d: int, gather: bool, packed: bool = False) -> None:
    """Triton forward and backward against the float64 torch path on one plan (self or cross)."""
    cu = _cu(lens).to(device)
    T = sum(lens)
    qkv = torch.randn(T, 3, H, d, device=device, dtype=dtype, requires_grad=True)
    q, k, v = qkv.unbind(1)
    perm = torch.randperm(T, device=device) if gather else None
    if lens_kv is None:
        plan, leaves = VarlenPlan(cu, index_q=perm), (qkv,)
    else:
        plan = VarlenPlan(cu, _cu(lens_kv).to(device), index_q=perm)
        k, v = (torch.randn(sum(lens_kv), H, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        leaves = (qkv, k, v)
    if packed:
        from trellis.modules.attention.triton_varlen import triton_packed_attention

        out = triton_packed_attention(qkv, plan)
    else:
        out = attention_with_plan(q, k, v, plan, backend="triton")
    ref = attention_with_plan(q.double(), k.double(), v.double(), plan, backend="torch")
    g = torch.randn_like(out)
    ga = torch.autograd.grad(out, leaves, g)
    gb = torch.autograd.grad(ref, leaves, g.double())
    for what, a, b in [("out", out, ref), *zip(("dqkv", "dk", "dv"), ga, gb)]:
        err = (a.double() - b).norm() / b.norm()
        assert err < tol, f"{what}: relative error {err:.2e} (lens={lens}, lens_kv={lens_kv}, H={H}, gather={gather})"


def _triton_check(device: str, dtype: torch.dtype, tol: float, block: int | None) -> None:
    """The long path alone (window path off), as before it existed."""
    from trellis.modules.attention import triton_varlen as tv

    old, old_win, old_mid = dict(tv.BLOCK_CONFIG), dict(tv.WINDOW_CONFIG), dict(tv.MID_CONFIG)
    tv.WINDOW_CONFIG["buckets"] = ()
    if block is not None:
        tv.BLOCK_CONFIG.update({k: (block, block, 4) for k in old})
        tv.MID_CONFIG.update({k: (block, block, 4) for k in ("fwd", "bwd_kv", "bwd_q")})
    try:
        torch.manual_seed(7)
        cases = [([5, 0, 17, 40, 1, 130], [3, 2, 20, 33, 7, 64], True),  # short (fused) and long sequences
                 ([5, 3, 1], [2, 6, 4], False)]  # only short ones: fused backward alone
        # no mid-length blocks; 33-64 on them (130 on the long blocks)
        for mid in (0, 64):
            tv.MID_CONFIG["max_len"] = mid
            for lens, lens_kv, both in cases:
                for gather in (False, True) if both else (True,):
                    _triton_compare(device, dtype, tol, lens, None, 2, 64, gather)
                    _triton_compare(device, dtype, tol, lens, lens_kv, 2, 64, gather)
    finally:
        tv.BLOCK_CONFIG.update(old)
        tv.WINDOW_CONFIG.update(old_win)
        tv.MID_CONFIG.update(old_mid)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernel_interpreter(monkeypatch):
    """Runs the Triton kernels on the CPU through TRITON_INTERPRET when triton is installed."""
    if torch.cuda.is_available():
        pytest.skip("covered by the GPU test")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _triton_check("cpu", torch.float32, 1e-5, block=16)


# Windows of length 1, at and just over each bucket boundary (16, 64; 32 for the fused backward),
# an empty sequence; cross plans with key lengths on either side of the query lengths, and keys
# without queries.
_WIN_LENS = [1, 16, 17, 32, 33, 64, 65, 0, 2]
_WIN_LENS_KV = [3, 16, 9, 32, 20, 64, 4, 40, 1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
@pytest.mark.parametrize("heads_per_prog,H,fused,delta_from_p,split", [
    (2, 3, 0, True, 0), (0, 1, 32, True, 0), (2, 3, 0, False, 0), (0, 1, 32, False, 0), (2, 3, 0, True, 1)])
def test_triton_window_path_interpreter(monkeypatch, heads_per_prog, H, fused, delta_from_p, split):
    """The window path beside the long path, in fp32 on the CPU through TRITON_INTERPRET: buckets 16
    (one tile) and 64 (queries in 1-4 chunks of 16), 3 heads in programs of 2 (a partial head group),
    two-kernel long path above 64; or bucket 16 alone, 1 head, the fused long-path backward taking
    lengths 17..32 and the two-kernel one the rest. The one-tile backwards take delta = rowsum(dO * O)
    from P and dP, or from O; with ``split`` the 64 bucket's forward runs each query chunk in a program
    of its own."""
    if torch.cuda.is_available():
        pytest.skip("covered by the GPU test")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from trellis.modules.attention import triton_varlen as tv

    buckets = (tv.WindowBucket(16, 16, 1, 16, 1, 2), tv.WindowBucket(64, 16, 1, 16, 1, 1, split))
    monkeypatch.setattr(tv, "WINDOW_CONFIG", {"buckets": buckets[:1] if fused else buckets, "heads": heads_per_prog,
                                              "delta_from_p": delta_from_p})
    monkeypatch.setattr(tv, "BLOCK_CONFIG", {"fwd": (16, 16, 4), "bwd_kv": (16, 16, 4), "bwd_q": (16, 16, 4),
                                             "bwd_fused": (fused, fused, 4)})
    torch.manual_seed(11)
    d = 16
    _triton_compare("cpu", torch.float32, 1e-5, _WIN_LENS, None, H, d, gather=False)
    _triton_compare("cpu", torch.float32, 1e-5, _WIN_LENS, None, H, d, gather=True, packed=True)
    _triton_compare("cpu", torch.float32, 1e-5, _WIN_LENS, _WIN_LENS_KV, H, d, gather=True)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_window_path_wide_rows_interpreter(monkeypatch):
    """float32 with head dim 80 (rows of 512 bytes) keeps the window buckets up to 64: windows of 65-128
    go to the long path although a 128 bucket is configured; results match the reference."""
    if torch.cuda.is_available():
        pytest.skip("covered by the GPU test")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from trellis.modules.attention import triton_varlen as tv

    buckets = (tv.WindowBucket(16, 16, 1, 16, 1, 2), tv.WindowBucket(64, 16, 1, 16, 1, 2),
               tv.WindowBucket(128, 32, 1, 32, 1, 2))
    monkeypatch.setattr(tv, "WINDOW_CONFIG", {"buckets": buckets, "heads": 0, "delta_from_p": True})
    monkeypatch.setattr(tv, "BLOCK_CONFIG", {"fwd": (16, 16, 4), "bwd_kv": (16, 16, 4), "bwd_q": (16, 16, 4),
                                             "bwd_fused": (0, 0, 4)})
    launched = []  # (block, sequences) of every window launch, forward and backward
    win_launches = tv._win_launches

    def spy(rt, H, dev, buckets):
        out = win_launches(rt, H, dev, buckets)
        launched.extend((b.block, seqs.tolist()) for b, seqs, *_ in out)
        return out

    monkeypatch.setattr(tv, "_win_launches", spy)
    torch.manual_seed(14)
    _triton_compare("cpu", torch.float32, 1e-5, [1, 16, 40, 64, 65, 100], None, 2, 80, gather=True)
    assert launched and all(block <= 64 for block, _ in launched)
    assert {s for _, seqs in launched for s in seqs} == {0, 1, 2, 3}  # 65 and 100: the long path
    launched.clear()
    _triton_compare("cpu", torch.float32, 1e-5, [1, 16, 40, 64, 65, 100], None, 2, 64, gather=True)
    assert {block for block, _ in launched} == {16, 64, 128}  # 256-byte rows: every bucket


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_packed_gradient_is_one_buffer(monkeypatch):
    """With q, k, v packed in one [T, 3, H, d] tensor the backward stacks nothing; with three views of
    it autograd stacks their gradients (the copy the packed entry point saves)."""
    if torch.cuda.is_available():
        pytest.skip("needs the interpreter (CPU)")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from trellis.modules.attention import packed_attention_with_plan

    plan = VarlenPlan(_cu([3, 5]))
    qkv = torch.randn(8, 3, 1, 16, requires_grad=True)
    stacks = []
    for packed in (True, False):
        out = (packed_attention_with_plan(qkv, plan, backend="triton") if packed
               else attention_with_plan(*qkv.unbind(1), plan, backend="triton"))
        with torch.profiler.profile() as prof:
            torch.autograd.grad(out, qkv, torch.ones_like(out))
        stacks.append(sum(e.name in ("aten::stack", "aten::cat") for e in prof.events()))
    assert stacks[0] == 0 and stacks[1] > 0, stacks


def test_triton_variants_are_valid():
    """Every named variant has well-formed window buckets (checked without running a kernel)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    from trellis.modules.attention import triton_varlen as tv

    saved = (dict(tv.WINDOW_CONFIG), dict(tv.BLOCK_CONFIG), dict(tv.MID_CONFIG))
    try:
        for name in tv.VARIANTS:
            tv.use_variant(name)
            assert len(tv._window_buckets()) == len(tv.WINDOW_CONFIG["buckets"])
        with pytest.raises(ValueError, match="unknown"):
            tv.use_variant("nope")
        tv.use_variant("old")  # the code before the window path: no window buckets, no mid-length blocks
        assert not tv.WINDOW_CONFIG["buckets"] and tv.MID_CONFIG["max_len"] == 0 and not tv._delta_from_p()
    finally:
        for cfg, old in zip((tv.WINDOW_CONFIG, tv.BLOCK_CONFIG, tv.MID_CONFIG), saved):
            cfg.clear()
            cfg.update(old)
    # the module starts as its default variant: the window path on (faster on an H100, session 7) with
    # the 128 bucket's forward split into query-chunk programs (session 8)
    assert tv.DEFAULT_VARIANT == "win_split" and tv.WINDOW_CONFIG == tv.VARIANTS["win_split"]["window"]
    assert tv.WINDOW_CONFIG["buckets"][-1].block == 128 and tv.WINDOW_CONFIG["buckets"][-1].fwd_split == 1
    assert tv.MID_CONFIG == tv.VARIANTS["win_split"]["mid"] and tv.MID_CONFIG["max_len"] == 256
    ok = tv.check_buckets([(32, 32, 4, 32, 4), (128, 64, 4, 64, 8, 1, 1)])
    assert ok[1].stages == 1 and ok[1].fwd_split == 1 and ok[0].fwd_split == 0
    for bad, msg in (([(48, 32, 4, 32, 4)], "powers of two >= 16"), ([(64, 64, 4, 64, 4), (32, 32, 4, 32, 4)], "increasing"),
                     ([(64, 128, 4, 64, 4)], "from 16 to block"), ([(64, 64, 4, 64, 4, 0)], "stages"),
                     ([(64, 32, 4, 64, 4, 2, 2)], "fwd_split")):
        with pytest.raises(ValueError, match=msg):
            tv.check_buckets(bad)


def test_triton_long_path_blocks_by_dtype_and_head_dim():
    """16-bit inputs with head dim <= 64 get the tuned larger tiles; float32 and wider heads the base ones;
    ``use_variant`` restores the tuned values after a benchmark override."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    from trellis.modules.attention import triton_varlen as tv

    for kind in ("fwd", "bwd_kv", "bwd_q"):
        assert tv._long_blocks(kind, torch.empty(1, 2, 64, dtype=torch.bfloat16)) == tv.BLOCK_CONFIG_16BIT_D64[kind]
        assert tv._long_blocks(kind, torch.empty(1, 2, 64, dtype=torch.float16)) == tv.BLOCK_CONFIG_16BIT_D64[kind]
        assert tv._long_blocks(kind, torch.empty(1, 2, 64)) == tv.BLOCK_CONFIG[kind]
        assert tv._long_blocks(kind, torch.empty(1, 2, 80, dtype=torch.bfloat16)) == tv.BLOCK_CONFIG[kind]
    tuned = dict(tv.BLOCK_CONFIG_16BIT_D64)
    tv.BLOCK_CONFIG_16BIT_D64["fwd"] = (16, 16, 1)
    tv.use_variant(tv.DEFAULT_VARIANT)
    assert tv.BLOCK_CONFIG_16BIT_D64 == tuned


def test_triton_routing_by_length():
    """Sequences go to the smallest window bucket that holds max(queries, keys), longest first; the
    rest to the fused, the mid-length or the long two-kernel path; the long path's delta covers only
    its own rows; each long-path launch group gets the sequences of its routes."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    from trellis.modules.attention import triton_varlen as tv

    lens_q, lens_kv = [1, 16, 17, 0, 64, 65, 70, 3, 90, 200], [1, 16, 3, 5, 64, 2, 70, 80, 100, 150]
    perm = torch.randperm(sum(lens_q))
    plan = VarlenPlan(_cu(lens_q), _cu(lens_kv), index_q=perm)
    cpu = torch.device("cpu")
    rt = tv._Routing(plan, (16, 64), 70, 120, cpu)
    assert rt.routes == [0, 0, 1, 0, 1, tv._FUSED, tv._FUSED, tv._MID, tv._MID, tv._LONG]
    assert [(b, ids.tolist()) for b, ids in rt.win] == [(1, [4, 2]), (0, [1, 3, 0])]
    assert rt.fused.tolist() == [5, 6] and rt.n_long == 3
    start = sum(lens_q[:7])
    assert rt.delta_rows().tolist() == perm[start:].tolist()
    (mid, fwd_mid, bwd_mid), (long, fwd_long, bwd_long) = rt.long_groups
    assert mid and not long
    seq, first = rt.table("fwd", 64, fwd_mid)
    assert seq.tolist() == [5, 5, 6, 6, 7, 8, 8] and first.tolist() == [0, 64, 0, 64, 0, 0, 64]
    assert rt.table("kv", 64, bwd_mid)[0].tolist() == [7, 7, 8, 8]
    assert rt.table("q", 64, bwd_mid)[0].tolist() == [7, 8, 8]
    seq, first = rt.table("fwd", 128, fwd_long)
    assert seq.tolist() == [9, 9] and first.tolist() == [0, 128]
    assert rt.table("kv", 128, bwd_long)[0].tolist() == [9, 9]
    rt0 = tv._Routing(plan, (16, 64), 70, 0, cpu)  # no mid-length blocks: one long-path group
    assert rt0.routes[7:] == [tv._LONG] * 3 and len(rt0.long_groups) == 1
    assert rt0.table("fwd", 64, rt0.long_groups[0][1])[0].tolist() == [5, 5, 6, 6, 7, 8, 8, 9, 9, 9, 9]
    assert tv._Routing(plan, (), 70, 120, cpu).delta_rows() is None  # window path off: all rows


def test_triton_window_tiles_by_row_bytes():
    """Window buckets and pipeline depth follow a tile row's bytes (element size x BLOCK_D): 2-byte heads
    up to 64 as configured; wider rows (float32, head dim 80 of the XL flow models) unpipelined; rows over
    256 bytes only the buckets up to 64 (the 128 tiles would not fit in shared memory)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    from trellis.modules.attention import triton_varlen as tv

    b128 = tv.WINDOW_CONFIG["buckets"][-1]
    assert b128.block == 128 and b128.stages == 2
    cases = [(torch.bfloat16, 64, 128, 2), (torch.float16, 40, 128, 2), (torch.bfloat16, 80, 128, 1),
             (torch.bfloat16, 128, 128, 1), (torch.float32, 64, 128, 1), (torch.float32, 80, 64, 1),
             (torch.bfloat16, 160, 64, 1)]
    for dtype, d, largest, stages in cases:
        q = torch.empty(1, 2, d, dtype=dtype)
        buckets = tv._buckets_for(q)
        assert max(b.block for b in buckets) == largest, (dtype, d)
        assert tv._stages_for(b128, q) == stages, (dtype, d)
        assert all(b in tv.WINDOW_CONFIG["buckets"] for b in buckets)


def test_triton_heads_per_program(monkeypatch):
    """"auto" splits the heads of a bucket with few windows so that it fills the GPU."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton not installed")
    from trellis.modules.attention import triton_varlen as tv

    monkeypatch.setattr(tv, "WINDOW_CONFIG", {"buckets": (), "heads": "auto"})
    monkeypatch.setattr(tv, "AUTO_PROGRAMS_PER_SM", 4)
    assert tv._head_groups(12, 2000, 132) == (12, 1)  # enough windows: all heads in one program
    assert tv._head_groups(12, 330, 132) == (6, 2)  # 660 programs
    assert tv._head_groups(12, 100, 132) == (2, 6)
    assert tv._head_groups(12, 5, 132) == (1, 12)
    assert tv._head_groups(3, 5, None) == (3, 1)  # the interpreter: all heads
    tv.WINDOW_CONFIG["heads"] = 4
    assert tv._head_groups(3, 5, 132) == (3, 1) and tv._head_groups(12, 5, 132) == (4, 3)


def _dtype_ids(value):
    """Test ids that name the dtype (``-k float16`` selects by it); other values keep pytest's ids."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 1e-2)],
                         ids=_dtype_ids)
def test_triton_kernel_gpu(dtype, tol):
    _triton_check("cuda", dtype, tol, block=None)


# Lengths at and just over every default bucket boundary (16 ... 256), 1 and 0.
_GPU_LENS = [1, 16, 17, 32, 33, 64, 65, 128, 129, 200, 256, 257, 0, 7]
_GPU_LENS_KV = [5, 16, 40, 1, 33, 100, 65, 90, 129, 64, 256, 3, 20, 300]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant,dtype,tol", [
    *[(v, torch.bfloat16, 2e-2) for v in ("win", "old", "old_mid", "win_s1", "win_max64", "win256", "win_o", "win_split")],
    ("win", torch.float32, 1e-5), ("win", torch.float16, 1e-2), ("win_split", torch.float16, 1e-2),
], ids=_dtype_ids)
def test_triton_window_path_gpu(variant, dtype, tol):
    from trellis.modules.attention import triton_varlen as tv

    assert variant in tv.VARIANTS
    tv.use_variant(variant)
    try:
        torch.manual_seed(12)
        for H in (1, 3):
            _triton_compare("cuda", dtype, tol, _GPU_LENS, None, H, 64, gather=False)
            _triton_compare("cuda", dtype, tol, _GPU_LENS, None, H, 64, gather=True)
            _triton_compare("cuda", dtype, tol, _GPU_LENS, None, H, 64, gather=True, packed=True)
            _triton_compare("cuda", dtype, tol, _GPU_LENS, _GPU_LENS_KV, H, 64, gather=True)
        _triton_compare("cuda", dtype, tol, _GPU_LENS, None, 2, 40, gather=True)  # head dim below BLOCK_D
    finally:
        tv.use_variant(tv.DEFAULT_VARIANT)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 1e-2), (torch.float32, 1e-5)],
                         ids=_dtype_ids)
def test_triton_window_path_wide_heads_gpu(dtype, tol):
    """Head dims over 64 on the default variant: 80 (the XL flow models; its 128-bucket backward with
    two pipeline stages asked for more shared memory than an H100 or H200 SM has) and 128 (float32: buckets up to
    64 only), self and cross, every bucket boundary."""
    torch.manual_seed(13)
    for d in (80, 128):
        _triton_compare("cuda", dtype, tol, _GPU_LENS, None, 2, d, gather=True)
        _triton_compare("cuda", dtype, tol, _GPU_LENS, _GPU_LENS_KV, 2, d, gather=True, packed=False)


def _cuda_backend(backend: str) -> torch.device:
    """The CUDA device, or a skip when ``backend`` cannot run bf16 varlen attention here."""
    from trellis.modules.attention.backend import backend_unavailable_reason

    dev = torch.device("cuda")
    reason = backend_unavailable_reason(backend, dev, torch.bfloat16, varlen=True)
    if reason is not None:
        pytest.skip(reason)
    return dev


def _assert_output_and_grads_close(out, ref, inputs, tol=2e-2):
    """Relative error of the output and of each input's gradient (same random output gradient)."""
    g = torch.randn_like(out)
    for a, b in [(out, ref), *zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g.double()))]:
        assert (a.double() - b).norm() / b.norm() < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "torch_varlen", "triton", "torch_seq"])
def test_cuda_backends_match_reference(backend):
    dev = _cuda_backend(backend)
    torch.manual_seed(8)
    lens = [100, 7, 300, 64, 2000]
    cu = _cu(lens).to(dev)
    T, H, d = sum(lens), 4, 64
    q, k, v = (torch.randn(T, H, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    perm = torch.randperm(T, device=dev)
    plan = VarlenPlan(cu, index_q=perm)
    out = attention_with_plan(q, k, v, plan, backend=backend)
    ref = attention_with_plan(q.double(), k.double(), v.double(), plan, backend="torch")
    _assert_output_and_grads_close(out, ref, (q, k, v))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch_varlen", "triton", "torch_seq"])
def test_cuda_backends_cross_attention(backend):
    """Queries and keys of different lengths per sequence (the sparse cross-attention layout)."""
    dev = _cuda_backend(backend)
    torch.manual_seed(9)
    lens_q, lens_kv = [1500, 33, 4100], [77, 1374, 200]
    H, d = 8, 64
    q = torch.randn(sum(lens_q), H, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(sum(lens_kv), H, d, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    plan = VarlenPlan(_cu(lens_q).to(dev), _cu(lens_kv).to(dev))
    out = attention_with_plan(q, k, v, plan, backend=backend)
    ref = naive_varlen_attention(q.double(), k.double(), v.double(), plan.cu_q, plan.cu_kv)
    _assert_output_and_grads_close(out, ref, (q, k, v))
