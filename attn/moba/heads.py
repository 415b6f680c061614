"""Head pieces: the routed and tile steps of MoBA run over pieces of (batch, KV head) so that the
routed partials stay within flash's gradient bytes.

The routed kernels (routed.py) write one partial row of D per (query row, head, routed slot):
OP in the forward, DQP in the backward, NSEL × the size of o. Without GQA at top-3 that is
2 × o, the bytes of dk + dv, so the dQ phase holds no more than the dK/dV phase (o, dq, dk, dv:
flash's backward). With GQA, dk and dv shrink by the group size G = Hq / Hkv and the partials do
not: at 16 / 4 heads the dQ phase held 1.6 × flash's peak (docs/moba_notes.md). So the steps that
make and consume partials run per piece, a piece's partials at most 2·B·Hkv rows per token (the
rows of dk + dv), about G · NSEL / 2 pieces, or PIECE_FLOOR bytes when that is more. One KV head
of one sequence, with its whole query group, is the smallest piece: when its G · NSEL rows alone
pass the bound, the partials stay at G · NSEL / (2·B·Hkv) × dk + dv.

A piece is whole sequences b0 .. b1 − 1 with every head, or one sequence with the KV heads
g0 .. g1 − 1 and their query heads. Either way every per-(batch, head) tensor of the piece is a
contiguous slice (lse, delta [B, H, T], sel [B, Hq, T, NSEL], the inverse index's ROWPTR), and
q, k, v, dO, o, dq are views with the full tensor's token stride that the kernels read and write
in place (the Triton kernels' STRIDE_QT / STRIDE_KT and the Gluon kernels' TMA descriptors take
the view's strides, the Gluon routed producers the full head count: gather_heads). Each
(batch, head)'s work is independent of the others, so the pieces give the same bits as one call.

MOBA_HEAD_CHUNKS (read at import): auto (the rule above, the default) or a number of pieces
(1: one call over all heads; more are capped at B · Hkv).
"""
from __future__ import annotations

import os
from dataclasses import dataclass


def _setting(value: str) -> int:
    """0 for auto, else the requested number of pieces; anything else is refused by name."""
    if value == "auto":
        return 0
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(f"MOBA_HEAD_CHUNKS={value!r}: must be auto or an integer >= 1")


HEAD_CHUNKS = _setting(os.environ.get("MOBA_HEAD_CHUNKS", "auto"))
# bytes of routed partials a piece may hold whatever dk + dv's: smaller pieces would add launches
# (host time per piece and direction) to save little memory. At 16 / 4 heads, D 128, bf16 the
# dk + dv bound takes over from 64k tokens on (one piece at 16k, two at 32k, four from 64k)
PIECE_FLOOR = 128 * 2 ** 20


@dataclass(frozen=True)
class Piece:
    """Sequences b0 .. b1 − 1 and KV heads g0 .. g1 − 1 (their query heads g0·G .. g1·G − 1)."""
    b0: int
    b1: int
    g0: int
    g1: int
    group: int  # G = Hq / Hkv

    def q(self, t):
        """The piece of a [B, T, Hq, ...] tensor (q, dO, o, dq): a view."""
        return t[self.b0:self.b1, :, self.g0 * self.group:self.g1 * self.group]

    def kv(self, t):
        """The piece of a [B, T, Hkv, ...] tensor (k, v): a view."""
        return t[self.b0:self.b1, :, self.g0:self.g1]

    def heads(self, t):
        """The piece of a [B, Hq, ...] tensor (lse, delta, sel): a contiguous slice."""
        return t[self.b0:self.b1, self.g0 * self.group:self.g1 * self.group]

    def index(self, index, hq: int, nb: int):
        """The piece's inverse index: ROWPTR's rows of its (batch, head)s, ENTRIES whole (ROWPTR
        holds absolute offsets into it); None stays None."""
        if index is None:
            return None
        rowptr, entries = index
        bh0 = self.b0 * hq + self.g0 * self.group
        bh1 = (self.b1 - 1) * hq + self.g1 * self.group
        return rowptr[bh0 * nb:bh1 * nb + 1], entries


def pieces_of(q, k, nsel: int, routed: bool) -> list[Piece]:
    """head_pieces for q [B, Tq, Hq, D] and k [B, Tk, Hkv, D], PIECE_FLOOR in rows per token."""
    B, tq, hq, d = q.shape
    floor_rows = PIECE_FLOOR // max(1, tq * d * q.element_size())
    return head_pieces(B, hq, k.shape[2], nsel, routed, floor_rows=floor_rows)


def head_pieces(B: int, hq: int, hkv: int, nsel: int, routed: bool,
                setting: int | None = None, floor_rows: int = 0) -> list[Piece]:
    """The pieces the routed and tile steps run over (module docstring): auto (setting 0) as
    many whole sequences per piece, or else KV heads of one sequence, as keep a piece's partials
    within max(2·B·Hkv, floor_rows) rows per token; setting N: about N equal pieces. One piece
    covering everything when nothing is routed."""
    setting = HEAD_CHUNKS if setting is None else setting
    group = hq // hkv
    one = [Piece(0, B, 0, hkv, group)]
    if not routed:
        return one
    if setting:
        n = min(setting, B * hkv)
        per_seq = -(-B // n) if n <= B else 0
        per_kv = -(-hkv // -(-n // B))
    else:
        budget = max(2 * B * hkv, floor_rows)     # dk + dv's rows per token, or the floor
        per_seq = budget // (hq * nsel)      # whole sequences within it (0: not even one)
        per_kv = max(1, budget // (group * nsel))
    if per_seq >= B:
        return one
    if per_seq:
        return [Piece(b, min(b + per_seq, B), 0, hkv, group) for b in range(0, B, per_seq)]
    return [Piece(b, b + 1, g, min(g + per_kv, hkv), group)
            for b in range(B) for g in range(0, hkv, per_kv)]


def token_stride(*views) -> int:
    """The token stride shared by [B, T, H, D] views that one kernel addresses with one set of
    offsets (q with o, dO, dq; k with v). Each must have rows of D contiguous, heads D apart and
    a batch stride of T × the token stride (one sequence, or whole contiguous ones): a full
    contiguous tensor or a Piece's view of one."""
    first = views[0]
    for t in views:
        B, T, H, D = t.shape
        ok = t.stride(3) == 1 and (H == 1 or t.stride(2) == D) and t.stride(1) >= H * D \
            and (B == 1 or t.stride(0) == T * t.stride(1))
        # one sequence: its batch stride is never used (and a size-1 dim's stride is arbitrary)
        same = t.stride()[1:] == first.stride()[1:] and (B == 1 or t.stride(0) == first.stride(0))
        if not ok or t.shape != first.shape or not same:
            raise ValueError(f"moba: a [B, T, H, D] view of shape {tuple(t.shape)}, strides "
                             f"{t.stride()} (with {tuple(first.shape)}, {first.stride()}) is not "
                             "one the kernels can address (heads.token_stride)")
    return first.stride(1)


def gather_heads(q, *others) -> int:
    """The head count the Gluon routed kernels' producer (routed_gluon.chunk_producer) takes for
    q [B, T, Hq, D] (with dO): it splits batch·head as b = bh // H, h = bh % H and steps tokens
    by H·D, so H is the full tensor's head count, token_stride / D. For a head piece (one
    sequence, b = 0 for every bh < its heads <= H) and for whole sequences (H its own) that gives
    the piece's rows; several sequences of a head slice would not."""
    stride = token_stride(q, *others)
    B, _, hq, d = q.shape
    if B > 1 and stride != hq * d:
        raise ValueError(f"moba: a head slice of {B} sequences (shape {tuple(q.shape)}, strides "
                         f"{q.stride()}) is not a piece the Gluon routed kernels can gather")
    return stride // d
