"""Triton device helpers shared by every family's kernels, correct on the GPU and in the
interpreter, and the constants of the exp2 domain.

Triton's interpreter (3.9) returns garbage for tl.dot on bfloat16 operands and truncates
fp32 -> bf16 casts. Under TRITON_INTERPRET=1 the dot operands are upcast to fp32 first (exact:
bf16 values are fp32 values, and the GPU's bf16 MMA also forms exact products accumulated in
fp32) and casts round to nearest even on the bits. On the GPU both are the plain operations.
"""
from __future__ import annotations

import triton
import triton.language as tl

from attn.dispatch import INTERPRET

LOG2E_F = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
LN2_F = 0.6931471805599453  # ln(2): natural-log lse = log2-domain lse * LN2
LOG2E = tl.constexpr(LOG2E_F)  # the same, usable inside kernels
LN2 = tl.constexpr(LN2_F)

_INTERP = tl.constexpr(INTERPRET)


@triton.jit
def mma(a, b, acc, DOT_PREC: tl.constexpr):
    """acc + a @ b (acc may be None), fp32 result."""
    if _INTERP:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PREC)


@triton.jit
def cvt(x, DTYPE: tl.constexpr):
    """x.to(DTYPE), rounding to nearest even also under the interpreter."""
    if _INTERP:
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000  # round half to even
            x = bits.to(tl.float32, bitcast=True)
    return x.to(DTYPE)
