"""Triton helpers shared by every family's kernels, correct on the GPU and in the interpreter.

Triton's interpreter (3.9) returns garbage for tl.dot on bfloat16 operands and truncates
fp32 -> bf16 casts. Under TRITON_INTERPRET=1 the dot operands are upcast to fp32 first (exact:
bf16 values are fp32 values, and the GPU's bf16 MMA also forms exact products accumulated in
fp32) and casts round to nearest even on the bits. On the GPU both are the plain operations.
"""
import triton
import triton.language as tl

from attn.dispatch import INTERPRET

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


@triton.jit
def softmax_step(s, v, acc, m_i, l_i, DOT_PREC: tl.constexpr):
    """One online-softmax step over a key chunk: log2-domain scores s [M, N] (−inf where masked;
    m_i starts finite, so a fully masked chunk adds exactly 0), values v [N, D]. Returns the
    updated (acc, m_i, l_i): acc the unnormalised fp32 output, m_i the running max, l_i the
    running sum of exp2(s − m_i)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = mma(cvt(p, v.dtype), v, acc * alpha[:, None], DOT_PREC)
    return acc, m_new, l_i
