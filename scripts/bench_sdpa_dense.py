"""Benchmark: the dense attention of the SS flow L step, by SDPA backend and q/k/v layout.

Shapes of ``ss_flow_img_dit_L_16l8_fp16`` at batch 8: self-attention over the 16^3 = 4096 latent
tokens and cross-attention from them to the 1374 DINOv2 tokens, 16 heads of 64, bf16. Each row times
``F.scaled_dot_product_attention`` forward and forward + backward (gradients of q, k, v) under one
backend (cuDNN, FlashAttention-2), with q, k, v either views of one packed projection output (as
the model makes them: ``[B, L, 3, H, d]`` transposed) or contiguous ``[B, H, L, d]``. ``cross1408``
pads the keys to 11 x 128 to show what the ragged last key tile costs (the padded result would
differ; a cost estimate only); ``cross1408m`` pads them the same way behind an additive ``-inf``
attention mask on the 34 pad keys, which keeps the result exact, and counts only the 1374 real keys'
FLOPs (whether a masked full tile beats the ragged one). FLOPs: forward 4 B H Lq Lk d, backward
counted as 2 x forward (``bench_train.py``'s convention); "bwd" = (forward + backward) - forward.

    python scripts/bench_sdpa_dense.py [--reps 20]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import cuda_time_ms  # noqa: E402

B, H, D, L, L_COND = 8, 16, 64, 4096, 1374
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def operands(lq: int, lk: int, layout: str, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(q, k, v) and the leaf tensors their gradients flow to."""
    def leaf(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=True)

    if layout == "contig":
        q, k, v = leaf(B, H, lq, D), leaf(B, H, lk, D), leaf(B, H, lk, D)
        return [q, k, v], [q, k, v]
    if lq == lk:  # packed self-attention projection [B, L, 3, H, d]
        qkv = leaf(B, lq, 3, H, D)
        return [t.transpose(1, 2) for t in qkv.unbind(2)], [qkv]
    q, kv = leaf(B, lq, H, D), leaf(B, lk, 2, H, D)  # cross: to_q [B, L, H, d], to_kv [B, Lc, 2, H, d]
    return [q.transpose(1, 2)] + [t.transpose(1, 2) for t in kv.unbind(2)], [q, kv]


def time_case(q, k, v, leaves, grad, backend: SDPBackend, reps: int,
              mask: torch.Tensor | None = None) -> tuple[float, float]:
    """Median ms of the forward and of forward + backward under ``backend``."""
    def attn():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    with sdpa_kernel(backend):
        fwd = cuda_time_ms(attn, reps)
        both = cuda_time_ms(lambda: torch.autograd.grad(attn(), leaves, grad), reps)
    return fwd, both


def pad_mask(lk: int, real: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive ``[1, 1, 1, lk]`` mask: 0 on the first ``real`` keys, -inf on the padding."""
    m = torch.zeros(1, 1, 1, lk, device="cuda", dtype=dtype)
    m[..., real:] = float("-inf")
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sdpa_dense.py needs a CUDA device")
    print(f"card: {torch.cuda.get_device_name()}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}")
    print(f"{'case':9s} {'layout':7s} {'backend':7s} {'fwd ms':>8s} {'TFLOP/s':>8s} {'fwd+bwd ms':>11s} "
          f"{'TFLOP/s':>8s} {'bwd ms':>8s} {'TFLOP/s':>8s}")
    cases = [("self", L, L, layout, be) for layout in ("packed", "contig") for be in BACKENDS]
    cases += [("cross", L, L_COND, layout, be) for layout in ("packed", "contig") for be in BACKENDS]
    cases += [("cross1408", L, 1408, "contig", "cudnn"), ("cross1408m", L, 1408, "contig", "cudnn")]
    for name, lq, lk, layout, be in cases:
        (q, k, v), leaves = operands(lq, lk, layout, torch.bfloat16)
        grad = torch.randn(B, H, lq, D, device="cuda", dtype=torch.bfloat16)
        masked = name.endswith("m")
        mask = pad_mask(lk, L_COND, torch.bfloat16) if masked else None
        flops = 4 * B * H * lq * (L_COND if masked else lk) * D
        try:
            fwd, both = time_case(q, k, v, leaves, grad, BACKENDS[be], args.reps, mask)
        except RuntimeError as e:  # a backend that does not take these inputs on this card
            print(f"{name:9s} {layout:7s} {be:7s} not available: {str(e).splitlines()[0][:80]}")
            continue
        bwd = both - fwd
        print(f"{name:9s} {layout:7s} {be:7s} {fwd:8.3f} {flops / fwd / 1e9:8.1f} {both:11.3f} "
              f"{3 * flops / both / 1e9:8.1f} {bwd:8.3f} {2 * flops / bwd / 1e9:8.1f}", flush=True)


if __name__ == "__main__":
    main()
