"""Helpers shared by every attention family; nothing here knows a family.

    alloc.py      the allocator of every kernel output (tests swap it for a NaN-filled one)
    jit.py        Triton device helpers: interpreter-safe dot and cast, exp2-domain constants
    softmax.py    online-softmax step, the causal/document/window key bound, delta = rowsum(O·dO)
    softmax_bwd.py  the softmax backward's tile math (mask kinds as constexpr hooks) and loops
    launch.py     host-side launch options: dot precision, register caps, config tables, TMA
    checks.py     argument validation (check_qkv and the cu_seqlens / Triton-path rules)
    documents.py  per-key document bounds and the block table over documents (torch ops)

Index arithmetic (every family's kernels): T·H·D passes 2^31 at long contexts (2^21 tokens x 8
heads x 128), so element offsets are formed as an int64 base (batch, the tile's first row or the
chunk's first key, times the row stride) plus int32 offsets inside the tile (BLOCK·H·D, small);
gathered rows take an int64 row offset each. Positions, row and block indices stay int32 (every
tensor has fewer than 2^31 rows: B·T·H·D elements of at least 2 bytes with H·D >= 16 would not
fit a GPU), so loops and masks keep 32-bit arithmetic.

Importing this package loads no Triton module: the families import the modules they use.
"""
