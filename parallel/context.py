"""Context parallelism applied from outside the model: swap each attention core's `attend`.

A strategy serves a core through a capability the core declares (attn/base.py
`cp_capabilities`), never through its family name:

    strategy   capability it needs          what runs
    ring       lse_blocks                   the core's softmax block primitives, K/V around a ring
    allgather  lse_blocks                   the same primitives, gather overlapped with own blocks
               or gather_kv                 the core's own attend per query chunk, q_offset
    lasp       state_passing                attend_with_state per chunk, states combined
    ulysses    head_parallel                the core's own attend on a slice of the heads

`cp.strategy=auto` takes each core's `cp_default` (so `model.layer_pattern` mixes work, every
layer keeping its own strategy over one token layout); a named strategy applies to every layer
and must be servable for each. With a Ulysses degree u = `cp.ulysses` > 1 (2-D context
parallelism, parallel/ulysses.py) every layer is wrapped in all-to-alls over its Ulysses
subgroup and the layer's strategy runs over the outer group of cp/u ranks; with u = cp the
outer group is one rank and the core's op runs directly (pure Ulysses).

`CPSettings` is the one place the cp settings are validated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel.allgather import make_allgather_attend, make_softmax_allgather_attend
from parallel.lasp import make_lasp_attend
from parallel.ring import make_ring_attend
from parallel.sharding import LAYOUTS, SeqGroup, layout_placement
from parallel.ulysses import check_ulysses_heads, make_ulysses_attend

# strategy -> the capabilities it can serve a core through (any one of them)
STRATEGIES = {
    "ring": ("lse_blocks",),
    "allgather": ("lse_blocks", "gather_kv"),
    "lasp": ("state_passing",),
    "ulysses": ("head_parallel",),
}


@dataclass(frozen=True)
class CPSettings:
    """The `cp` config group, validated against the launch (configs/cp/default.yaml)."""
    size: int = 1               # ranks one sequence is split over
    strategy: str = "auto"      # auto | ring | allgather | lasp | ulysses
    layout: str = "zigzag"      # zigzag | contiguous
    ulysses: int = 1            # Ulysses degree inside cp

    @classmethod
    def from_config(cls, cfg, *, world: int, tokens_per_micro_batch: int) -> "CPSettings":
        """Check every rule once; the message names the key and the rule."""
        s = cls(int(cfg.get("size", 1)), str(cfg.get("strategy", "auto")),
                str(cfg.get("layout", "zigzag")), int(cfg.get("ulysses", 1)))
        if s.size < 1 or world % s.size:
            raise ValueError(f"cp.size={s.size} must be >= 1 and divide the number of processes "
                             f"({world}); data parallelism gets the rest")
        if s.strategy != "auto" and s.strategy not in STRATEGIES:
            raise ValueError(f"cp.strategy={s.strategy!r} must be auto or one of "
                             f"{', '.join(STRATEGIES)}")
        if s.layout not in LAYOUTS:
            raise ValueError(f"cp.layout={s.layout!r} must be one of {', '.join(LAYOUTS)}")
        if s.ulysses < 1 or s.size % s.ulysses:
            raise ValueError(f"cp.ulysses={s.ulysses} must be >= 1 and divide cp.size={s.size}")
        if s.strategy == "ulysses" and 1 < s.ulysses < s.size:
            raise ValueError(f"cp.strategy=ulysses is Ulysses over the whole cp group; with "
                             f"cp.ulysses={s.ulysses} < cp.size={s.size} pick the outer strategy "
                             "(auto, allgather, lasp or ring) or set cp.ulysses=1")
        chunks = (2 if s.layout == "zigzag" else 1) * s.size
        if s.size > 1 and tokens_per_micro_batch % chunks:
            raise ValueError(f"trainer.micro_batch × trainer.seq_len = {tokens_per_micro_batch} "
                             f"must be divisible by {chunks} ({s.layout} layout over "
                             f"cp.size={s.size})")
        return s


def strategy_for(core, requested: str) -> str:
    """The strategy that serves `core` when `requested` (auto or a name) is asked for."""
    name = core.cp_default if requested == "auto" else requested
    if name not in STRATEGIES:
        raise ValueError(f"cp.strategy={requested!r} must be auto or one of "
                         f"{', '.join(STRATEGIES)}")
    declared = set(core.cp_capabilities)
    if not declared & set(STRATEGIES[name]):
        servable = [s for s, needs in STRATEGIES.items() if declared & set(needs)]
        raise ValueError(f"cp.strategy={name} needs a core declaring "
                         f"{' or '.join(STRATEGIES[name])}; attn={core.family} declares "
                         f"{', '.join(sorted(declared)) or 'none'} (strategies: auto, "
                         f"{', '.join(servable)})")
    return name


def _require_heads(core, asks: str, i: int) -> None:
    """Ulysses (asked for by the settings `asks`) shards heads: the core must declare it."""
    if "head_parallel" not in core.cp_capabilities:
        raise ValueError(f"{asks} needs a core declaring head_parallel; attn={core.family} "
                         f"(layer {i}) declares {', '.join(sorted(core.cp_capabilities))}")


def _outer_attend(core, name: str, seq: SeqGroup):
    if name == "ring":
        return make_ring_attend(seq, core.scale, *core.lse_blocks())
    if name == "allgather":
        if "lse_blocks" in core.cp_capabilities:   # gather overlapped with the own blocks
            return make_softmax_allgather_attend(seq, core.scale, *core.lse_blocks(),
                                                 whole=core.attend)
        return make_allgather_attend(core.attend, seq)
    return make_lasp_attend(core, seq)


def apply_context_parallel(model, mesh, cp: CPSettings) -> dict:
    """Wrap every layer's attention for the cp group; returns {layer index: strategy}
    ("ulysses+<outer>" under 1 < cp.ulysses < cp.size). The wrapped attends run outside
    compiled graphs (collectives and host-side chunk bookkeeping)."""
    base = layout_placement(mesh.cp, cp.layout)
    chosen = {}
    for i, layer in enumerate(model.layers):
        _wrap_layer(layer.attn, i, mesh, cp.strategy, mesh.ulysses, base, chosen)
        layer.attn.attend = torch.compiler.disable(layer.attn.attend, recursive=True)
    return chosen


def _wrap_layer(core, i, mesh, strategy, u, base, chosen) -> None:
    """Swap one core's attend for its context-parallel version; record the strategy."""
    name = strategy_for(core, strategy)
    if name == "ulysses" or u == mesh.cp:  # pure Ulysses: the op runs on the whole sequence
        asks = (f"cp.strategy=ulysses with cp.size={mesh.cp}" if u == 1
                else f"cp.ulysses={u}")
        _require_heads(core, asks, i)
        check_ulysses_heads(core.n_heads, core.n_kv_heads, mesh.cp, asks, f"layer {i}")
        group = mesh.cp_group if u == 1 else mesh.uly_group  # the same group when u == cp
        core.attend = make_ulysses_attend(core.attend, group, mesh.cp, mesh.cp_rank, 0, base,
                                          core.n_heads)
        chosen[i] = "ulysses"
    elif u == 1:
        core.attend = _outer_attend(core, name, SeqGroup(base, mesh.cp_rank, mesh.cp_group))
        chosen[i] = name
    else:
        _require_heads(core, f"cp.ulysses={u}", i)
        check_ulysses_heads(core.n_heads, core.n_kv_heads, u, f"cp.ulysses={u}", f"layer {i}")
        outer = SeqGroup(base.grouped(u), mesh.outer_rank, mesh.outer_group)
        core.attend = make_ulysses_attend(_outer_attend(core, name, outer), mesh.uly_group, u,
                                          mesh.uly_rank, mesh.outer_rank, base, core.n_heads)
        chosen[i] = f"ulysses+{name}"
