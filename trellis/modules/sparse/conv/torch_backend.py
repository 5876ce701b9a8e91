"""Pure-PyTorch sparse convolution: gather, GEMM per kernel offset, scatter-add.

The reference backend: runs on CPU and GPU, in float32, float16 and bfloat16 (accumulation in
float32), with a hand-written backward that recomputes the gathers instead of saving them.
For each offset ``k`` with pairs ``(i, o)``: ``out[o] += feats[i] @ W[k]``;
backward ``grad_feats[i] += grad_out[o] @ W[k].T`` and ``grad_W[k] = feats[i].T @ grad_out[o]``.
"""

from __future__ import annotations

import torch

from trellis.modules.sparse.conv.kernel_map import KernelMap

__all__ = ["conv_torch"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _GatherGemmScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
        in_idx, out_idx, bounds = kmap.pairs()
        K, _, C_out = weight.shape
        out = torch.zeros(kmap.n_out, C_out, dtype=_acc_dtype(feats.dtype), device=feats.device)
        for k in range(K):
            s, e = bounds[k], bounds[k + 1]
            if e > s:
                out.index_add_(0, out_idx[s:e], (feats[in_idx[s:e]] @ weight[k]).to(out.dtype))
        ctx.save_for_backward(feats, weight)
        ctx.kmap = kmap
        return out.to(feats.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        feats, weight = ctx.saved_tensors
        kmap: KernelMap = ctx.kmap
        in_idx, out_idx, bounds = kmap.pairs()
        grad_out = grad_out.to(feats.dtype)
        grad_feats = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_feats = torch.zeros(feats.shape, dtype=_acc_dtype(feats.dtype), device=feats.device)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros_like(weight)
        for k in range(weight.shape[0]):
            s, e = bounds[k], bounds[k + 1]
            if e == s:
                continue
            go = grad_out[out_idx[s:e]]  # [P_k, C_out]
            if grad_feats is not None:
                grad_feats.index_add_(0, in_idx[s:e], (go @ weight[k].T).to(grad_feats.dtype))
            if grad_weight is not None:
                grad_weight[k] = feats[in_idx[s:e]].T @ go
        if grad_feats is not None:
            grad_feats = grad_feats.to(feats.dtype)
        return grad_feats, grad_weight, None


def conv_torch(feats: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """``[N_in, C_in]`` feats, ``[K, C_in, C_out]`` weight -> ``[N_out, C_out]`` (no bias)."""
    return _GatherGemmScatter.apply(feats, weight, kmap)
