"""Triton kernels for the fused element-wise regions of ``trellis.modules.fused`` (CUDA).

The same maths as the region bodies there (residual, float32 LayerNorm, adaLN modulation, gated
residual), as one kernel launch per region and direction. The compiled bodies (``torch.compile``)
run the same work on the GPU about as fast, but each call of a compiled region costs 150-350 us of
host time (guards, runtime wrappers, several launches); with the SLat flow model's 24 blocks and
``batch_split`` micro-batches that made the training step wait for the host
(docs/PERFORMANCE_flow.md). A Triton launch costs a few microseconds.

Rounding: ``res`` is rounded to the input dtype before the LayerNorm (as the original); the rest of
each row is computed in float32 and rounded once.

Per-batch gradients (shift, scale, gate) are segment sums over each batch item's rows. The backward
kernel runs over ``chunks``: ``[P, 3]`` int32 rows ``(start, end, batch)``, each a run of at most
``CHUNK_ROWS`` rows of one batch item (``trellis.modules.fused.row_chunks``, cached per coordinate set
by the callers).
Each program writes its float32 partial sums; a one-hot GEMM over the programs then gives ``[B, C]``
(deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["CHUNK_ROWS", "ln_forward", "ln_backward", "rms_forward", "rms_backward"]

CHUNK_ROWS = 128  # rows per backward program; fused.row_chunks builds the runs
_ROWS_FWD = 4  # rows per program of the forward kernel
_ROWS_BWD = 4  # rows per iteration of the backward kernel


@triton.jit
def _ln_fwd_kernel(X, H, GATE, IDS, W, BIAS, SHIFT, SCALE, RES, Y, MEAN, RSTD,
                   N, C, sx, sh, sres, sy, sv, eps,
                   HAS_H: tl.constexpr, HAS_GATE: tl.constexpr, AFFINE: tl.constexpr, MOD: tl.constexpr,
                   NORM: tl.constexpr, WRITE_RES: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = rows < N
    cmask = cols < C
    m = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * sx + cols[None, :], mask=m, other=0.0)
    if HAS_GATE or MOD:
        b = tl.load(IDS + rows, mask=rmask, other=0).to(tl.int64)[:, None]
    if HAS_H:
        h = tl.load(H + r64 * sh + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_GATE:
            gate = tl.load(GATE + b * sv + cols[None, :], mask=m, other=0.0).to(tl.float32)
            h = gate * h
        x = (x.to(tl.float32) + h).to(x.dtype)  # the residual stream keeps the input dtype
        if WRITE_RES:
            tl.store(RES + r64 * sres + cols[None, :], x, mask=m)
    if NORM:
        xf = x.to(tl.float32)
        mean = tl.sum(xf, 1) / C
        xc = tl.where(m, xf - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / C + eps)
        y = xc * rstd[:, None]
        if AFFINE:
            w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
            bias = tl.load(BIAS + cols, mask=cmask, other=0.0).to(tl.float32)
            y = y * w[None, :] + bias[None, :]
        if MOD:
            scale = tl.load(SCALE + b * sv + cols[None, :], mask=m, other=0.0).to(tl.float32)
            shift = tl.load(SHIFT + b * sv + cols[None, :], mask=m, other=0.0).to(tl.float32)
            y = y * (1.0 + scale) + shift
        tl.store(Y + r64 * sy + cols[None, :], y.to(Y.dtype.element_ty), mask=m)
        tl.store(MEAN + rows, mean, mask=rmask)
        tl.store(RSTD + rows, rstd, mask=rmask)


@triton.jit
def _ln_bwd_kernel(GRES, GY, RES, H, GATE, CHUNKS, MEAN, RSTD, W, SCALE, GX, GH,
                   P_SHIFT, P_SCALE, P_GATE, P_W, P_B,
                   C, sgr, sgy, sres, sh, sgx, sgh, sv,
                   HAS_GRES: tl.constexpr, HAS_H: tl.constexpr, HAS_GATE: tl.constexpr, AFFINE: tl.constexpr,
                   MOD: tl.constexpr, NORM: tl.constexpr, STORE_GX: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    start = tl.load(CHUNKS + pid * 3)
    end = tl.load(CHUNKS + pid * 3 + 1)
    b = tl.load(CHUNKS + pid * 3 + 2).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    if MOD:
        scale1 = 1.0 + tl.load(SCALE + b * sv + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_GATE:
        gate = tl.load(GATE + b * sv + cols, mask=cmask, other=0.0).to(tl.float32)
    if AFFINE:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    acc_shift = tl.zeros([BLOCK_C], tl.float32)
    acc_scale = tl.zeros([BLOCK_C], tl.float32)
    acc_gate = tl.zeros([BLOCK_C], tl.float32)
    acc_w = tl.zeros([BLOCK_C], tl.float32)
    acc_b = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < end
        m = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        if NORM:
            gy = tl.load(GY + r64 * sgy + cols[None, :], mask=m, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
            res = tl.load(RES + r64 * sres + cols[None, :], mask=m, other=0.0).to(tl.float32)
            xhat = tl.where(m, (res - mean[:, None]) * rstd[:, None], 0.0)
            gn = gy
            if MOD:
                acc_shift += tl.sum(gy, 0)
                acc_scale += tl.sum(gy * xhat, 0)
                gn = gy * scale1[None, :]
            gxh = gn
            if AFFINE:
                acc_w += tl.sum(gn * xhat, 0)
                acc_b += tl.sum(gn, 0)
                gxh = gn * w[None, :]
            c1 = tl.sum(gxh * xhat, 1) / C
            c2 = tl.sum(gxh, 1) / C
            gx = tl.where(m, rstd[:, None] * (gxh - c2[:, None] - xhat * c1[:, None]), 0.0)
            if HAS_GRES:
                gx += tl.load(GRES + r64 * sgr + cols[None, :], mask=m, other=0.0).to(tl.float32)
        else:
            gx = tl.load(GRES + r64 * sgr + cols[None, :], mask=m, other=0.0).to(tl.float32)
        if STORE_GX:
            tl.store(GX + r64 * sgx + cols[None, :], gx.to(GX.dtype.element_ty), mask=m)
        if HAS_H:
            gh = gx
            if HAS_GATE:
                h = tl.load(H + r64 * sh + cols[None, :], mask=m, other=0.0).to(tl.float32)
                acc_gate += tl.sum(gx * h, 0)
                gh = gx * gate[None, :]
            tl.store(GH + r64 * sgh + cols[None, :], gh.to(GH.dtype.element_ty), mask=m)
    out = pid.to(tl.int64) * C + cols
    if MOD:
        tl.store(P_SHIFT + out, acc_shift, mask=cmask)
        tl.store(P_SCALE + out, acc_scale, mask=cmask)
    if HAS_GATE:
        tl.store(P_GATE + out, acc_gate, mask=cmask)
    if AFFINE:
        tl.store(P_W + out, acc_w, mask=cmask)
        tl.store(P_B + out, acc_b, mask=cmask)


def _row_stride(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.stride(0)


def _check_rows_layout(*ts: torch.Tensor | None) -> None:
    for t in ts:
        if t is not None and t.stride(-1) != 1:
            raise ValueError("fused Triton regions need unit stride along the channels")


def _warps(C: int) -> int:
    return 4 if C <= 512 else 8


def ln_forward(x, h, gate, ids, weight, bias, shift, scale, eps: float, norm: bool = True):
    """Returns ``(res, y, mean, rstd)`` (``res`` is ``x`` without ``h``; ``y``, mean, rstd None without
    ``norm``). Shapes as :func:`trellis.modules.fused.add_layer_norm`."""
    N, C = x.shape
    _check_rows_layout(x, h, gate, shift, scale)
    vec = next((v for v in (gate, shift, scale) if v is not None), None)
    if vec is not None and any(v is not None and v.stride(0) != vec.stride(0) for v in (gate, shift, scale)):
        gate, shift, scale = (None if v is None else v.contiguous() for v in (gate, shift, scale))
        vec = next(v for v in (gate, shift, scale) if v is not None)
    res = torch.empty_like(x) if h is not None else x
    y = torch.empty_like(x) if norm else None
    mean = torch.empty(N, device=x.device, dtype=torch.float32) if norm else None
    rstd = torch.empty_like(mean) if norm else None
    dummy = x
    BLOCK_C = triton.next_power_of_2(C)
    grid = (triton.cdiv(N, _ROWS_FWD),)
    if N > 0:
        _ln_fwd_kernel[grid](
            x, dummy if h is None else h, dummy if gate is None else gate, ids,
            dummy if weight is None else weight, dummy if bias is None else bias,
            dummy if shift is None else shift, dummy if scale is None else scale,
            res, dummy if y is None else y, dummy if mean is None else mean, dummy if rstd is None else rstd,
            N, C, x.stride(0), _row_stride(h), res.stride(0), _row_stride(y), _row_stride(vec), float(eps),
            HAS_H=h is not None, HAS_GATE=gate is not None, AFFINE=weight is not None, MOD=scale is not None,
            NORM=norm, WRITE_RES=h is not None, BLOCK_R=_ROWS_FWD, BLOCK_C=BLOCK_C, num_warps=_warps(C),
        )
    return res, y, mean, rstd


def _per_batch(partial: torch.Tensor, chunk_batch: torch.Tensor, B: int, dtype: torch.dtype) -> torch.Tensor:
    """``[P, C]`` float32 partial sums -> ``[B, C]`` (one-hot GEMM over the chunks)."""
    one_hot = (chunk_batch[None, :] == torch.arange(B, device=partial.device)[:, None]).float()  # [B, P]
    return (one_hot @ partial).to(dtype)


def ln_backward(g_res, g_y, res, h, gate, chunks, mean, rstd, weight, scale, batch_size: int, x_dtype,
                norm: bool = True, store_gx: bool = True):
    """Gradients of :func:`ln_forward`: ``(g_x, g_h, g_gate, g_weight, g_bias, g_shift, g_scale)``.

    ``chunks`` from ``trellis.modules.fused.row_chunks``. Without ``norm`` (the gated residual ``x + gate * h``) the
    incoming gradient is ``g_res`` and ``g_x`` is not formed (None with ``store_gx`` False).
    """
    N, C = res.shape
    _check_rows_layout(g_res, g_y, res, h, gate, scale)
    if gate is not None and scale is not None and gate.stride(0) != scale.stride(0):
        gate, scale = gate.contiguous(), scale.contiguous()
    vec = gate if gate is not None else scale
    dev = res.device
    P = chunks.shape[0]
    g_x = torch.empty(N, C, device=dev, dtype=x_dtype) if store_gx else None
    g_h = torch.empty_like(h) if h is not None else None
    f32 = dict(device=dev, dtype=torch.float32)
    mod, aff, gated = scale is not None, weight is not None, gate is not None
    p_shift = torch.empty(P, C, **f32) if mod else None
    p_scale = torch.empty(P, C, **f32) if mod else None
    p_gate = torch.empty(P, C, **f32) if gated else None
    p_w = torch.empty(P, C, **f32) if aff else None
    p_b = torch.empty(P, C, **f32) if aff else None
    d = res
    if P > 0:
        _ln_bwd_kernel[(P,)](
            d if g_res is None else g_res, d if g_y is None else g_y, res, d if h is None else h,
            d if gate is None else gate, chunks, d if mean is None else mean, d if rstd is None else rstd,
            d if weight is None else weight, d if scale is None else scale,
            d if g_x is None else g_x, d if g_h is None else g_h,
            *(d if p is None else p for p in (p_shift, p_scale, p_gate, p_w, p_b)),
            C, _row_stride(g_res), _row_stride(g_y), res.stride(0), _row_stride(h), _row_stride(g_x),
            _row_stride(g_h), _row_stride(vec),
            HAS_GRES=g_res is not None, HAS_H=h is not None, HAS_GATE=gated, AFFINE=aff, MOD=mod, NORM=norm,
            STORE_GX=store_gx, BLOCK_R=_ROWS_BWD, BLOCK_C=triton.next_power_of_2(C), num_warps=_warps(C),
        )
    chunk_batch = chunks[:, 2].long()
    g_shift = _per_batch(p_shift, chunk_batch, batch_size, scale.dtype) if mod else None
    g_scale = _per_batch(p_scale, chunk_batch, batch_size, scale.dtype) if mod else None
    g_gate = _per_batch(p_gate, chunk_batch, batch_size, gate.dtype) if gated else None
    g_w = p_w.sum(0).to(weight.dtype) if aff else None
    g_b = p_b.sum(0).to(weight.dtype) if aff else None
    return g_x, g_h, g_gate, g_w, g_b, g_shift, g_scale


# ------------------------------------------------------------------------- q/k RMS norm
_RMS_ROWS = 32  # rows (tokens) per program; one head per program (64 spills in the backward)


@triton.jit
def _rms_fwd_kernel(X, GAMMA, Y, NRM, N, H, D, sx_n, sx_h, sy_n, sy_h, scale,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    m = (rows < N)[:, None] & (cols < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * sx_n + h * sx_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
    nrm = tl.sqrt(tl.sum(x * x, 1))
    g = tl.load(GAMMA + h * D + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = x / tl.maximum(nrm, 1e-12)[:, None] * g[None, :] * scale
    tl.store(Y + r64 * sy_n + h * sy_h + cols[None, :], y.to(Y.dtype.element_ty), mask=m)
    tl.store(NRM + rows.to(tl.int64) * H + h, nrm, mask=rows < N)


@triton.jit
def _rms_bwd_kernel(G, X, GAMMA, NRM, GX, P_GAMMA, N, H, D, sg_n, sg_h, sx_n, sx_h, sgx_n, sgx_h, scale,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    m = rmask[:, None] & (cols < D)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + r64 * sx_n + h * sx_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
    g = tl.load(G + r64 * sg_n + h * sg_h + cols[None, :], mask=m, other=0.0).to(tl.float32)
    nrm = tl.load(NRM + rows.to(tl.int64) * H + h, mask=rmask, other=1.0)
    inv = 1.0 / tl.maximum(nrm, 1e-12)
    gamma = tl.load(GAMMA + h * D + cols, mask=cols < D, other=0.0).to(tl.float32)
    xn = x * inv[:, None]
    tl.store(P_GAMMA + (tl.program_id(0).to(tl.int64) * H + h) * D + cols, tl.sum(g * xn, 0) * scale, mask=cols < D)
    gs = g * gamma[None, :] * scale  # gradient wrt the normalised x
    proj = tl.where(nrm > 1e-12, tl.sum(gs * xn, 1), 0.0)  # below eps the norm is the constant eps
    gx = (gs - xn * proj[:, None]) * inv[:, None]
    tl.store(GX + r64 * sgx_n + h * sgx_h + cols[None, :], gx.to(GX.dtype.element_ty), mask=m)


def _as_rows_heads(x: torch.Tensor) -> torch.Tensor:
    """``[..., H, d]`` -> a ``[N, H, d]`` view (a copy only when the leading dims do not flatten)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def rms_forward(x: torch.Tensor, gamma: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.normalize(x.float(), dim=-1) * gamma * scale`` cast to x's dtype, for ``x [..., H, d]``;
    also returns the norms ``[N, H]`` float32 for :func:`rms_backward`."""
    x3 = _as_rows_heads(x)
    N, H, D = x3.shape
    y = torch.empty(N, H, D, device=x.device, dtype=x.dtype)
    nrm = torch.empty(N, H, device=x.device, dtype=torch.float32)
    if N > 0:
        _rms_fwd_kernel[(triton.cdiv(N, _RMS_ROWS), H)](
            x3, gamma, y, nrm, N, H, D, x3.stride(0), x3.stride(1), y.stride(0), y.stride(1), float(scale),
            BLOCK_N=_RMS_ROWS, BLOCK_D=triton.next_power_of_2(D), num_warps=4)
    return y.view(x.shape), nrm


def rms_backward(g: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor, nrm: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients ``(g_x, g_gamma)`` of :func:`rms_forward`."""
    x3, g3 = _as_rows_heads(x), _as_rows_heads(g)
    N, H, D = x3.shape
    gx = torch.empty(N, H, D, device=x.device, dtype=x.dtype)
    P = triton.cdiv(N, _RMS_ROWS)
    partial = torch.empty(P, H, D, device=x.device, dtype=torch.float32)
    if N > 0:
        _rms_bwd_kernel[(P, H)](
            g3, x3, gamma, nrm, gx, partial, N, H, D, g3.stride(0), g3.stride(1), x3.stride(0), x3.stride(1),
            gx.stride(0), gx.stride(1), float(scale), BLOCK_N=_RMS_ROWS, BLOCK_D=triton.next_power_of_2(D),
            num_warps=4)
    return gx.view(x.shape), partial.sum(0).to(gamma.dtype)
