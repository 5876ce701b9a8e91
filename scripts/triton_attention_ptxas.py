"""Compile the Triton attention kernels for sm_90a without a GPU and print ptxas's resource use.

For each kernel of each window-path bucket of the named variants (``triton_varlen.VARIANTS``), and the
long-path kernels: registers per thread, spill stores (bytes), shared memory and whether the loop's
loads became asynchronous copies (software pipelining). Shared memory above 227 KB per block would
fail at launch on an H100/H200. Needs ``triton`` (its wheel ships ``ptxas``); no CUDA device.

    python scripts/triton_attention_ptxas.py                    # every variant, bf16
    python scripts/triton_attention_ptxas.py --variants win old --dtype fp16

Shapes are those of the benchmark: q, k, v views of one ``[N, 3, 12, 64]`` tensor, gathered rows.
The numbers describe the compiled code only; timings need the GPU (``scripts/bench_attention.py``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from trellis.modules.attention import triton_varlen as tv  # noqa: E402

_H, _D = 12, 64
_INTS = {"sq_r": 3 * _H * _D, "sk_r": 3 * _H * _D, "sv_r": 3 * _H * _D, "so_r": _H * _D, "sdo_r": _H * _D,
         "sdq_r": 3 * _H * _D, "sdk_r": 3 * _H * _D, "sdv_r": 3 * _H * _D, "n_heads": _H, "D": _D}
_INTS.update({f"s{t}_h": _D for t in ("q", "k", "v", "o", "do", "dq", "dk", "dv")})
_PTRS = {"LSE": "fp32", "DELTA": "fp32", "IDXQ": "i64", "IDXK": "i64", "CUQ": "i32", "CUK": "i32", "SEQS": "i32",
         "BLK_SEQ": "i32", "BLK_START": "i32"}


def _signature(fn, dtype: str, ints: dict, consts: dict):
    sig, cx, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name], cx[name] = "constexpr", consts[name]
        elif name in ("Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV") or name in _PTRS:
            sig[name] = "*" + _PTRS.get(name, dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        elif ints[name] == 1:  # Triton specializes integer arguments equal to 1
            sig[name], cx[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, cx, attrs


def report(label: str, fn, dtype: str, consts: dict, num_warps: int, heads_per_prog: int = _H) -> None:
    ints = dict(_INTS, heads_per_prog=heads_per_prog)
    sig, cx, attrs = _signature(fn, dtype, ints, consts)
    k = triton.compile(ASTSource(fn, sig, cx, attrs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": 3})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        Path(src).write_text(k.asm["ptx"])
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    smem = k.metadata.shared
    print(f"{label:<40} warps {num_warps:2d}  regs {regs.group(1) if regs else '?':>3}  "
          f"spill {spill.group(1) if spill else '?':>5} B  smem {smem / 1024:6.1f} KB  "
          f"async copies {'yes' if 'async_copy_global_to_local' in k.asm['ttgir'] else 'no '}"
          f"{'  OVER THE 227 KB LIMIT' if smem > 227 * 1024 else ''}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="*", default=list(tv.VARIANTS))
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    args = ap.parse_args()
    common = dict(GATHER_Q=True, GATHER_K=True, IEEE=False, BLOCK_D=_D)
    seen = set()
    for name in args.variants:
        win = tv.VARIANTS[name]["window"]
        heads = win["heads"]  # "auto" picks a count at run time: compiled as for all heads unless it is 1
        hpp = heads if isinstance(heads, int) and heads > 0 else _H
        for b in win["buckets"]:
            for which, fn, m, warps in (("fwd", tv._win_fwd_kernel, b.fwd_m, b.fwd_warps),
                                        ("bwd", tv._win_bwd_kernel, b.bwd_m, b.bwd_warps)):
                key = (which, b.block, m, warps, b.stages, hpp)
                if key in seen:
                    continue
                seen.add(key)
                report(f"window {which} {b.block} chunk {m} stages {b.stages} heads/prog {hpp}", fn, args.dtype,
                       dict(common, EVEN_D=True, BLOCK_M=m, BLOCK_N=b.block, STAGES=b.stages), warps, hpp)
    blocks = tv.BLOCK_CONFIG
    kernels = {"fwd": tv._fwd_kernel, "bwd_kv": tv._bwd_kv_kernel, "bwd_q": tv._bwd_q_kernel}
    # the base tiles (float32, head dim > 64) and the tuned ones for 16-bit inputs with head dim <= 64
    for label, table in (("", blocks), (" (16-bit, d<=64)", tv.BLOCK_CONFIG_16BIT_D64)):
        for which, fn in kernels.items():
            bm, bn, warps = table[which]
            report(f"long {which} {bm}x{bn}{label}", fn, args.dtype, dict(common, BLOCK_M=bm, BLOCK_N=bn), warps)
    f = blocks["bwd_fused"]
    if f[0] > 0:
        report(f"long bwd_fused {f[0]}", tv._bwd_fused_kernel, args.dtype, dict(common, BLOCK=f[0]), f[2])


if __name__ == "__main__":
    main()
