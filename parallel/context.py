"""Context parallelism applied from outside the model: swap each attention core's `attend`.

`parallel.cp_strategy=auto` picks per layer family (so `model.layer_pattern` mixes work, every
layer keeping its own strategy over one token layout); a named strategy applies to every layer
and must support each family present.

With a Ulysses degree u = `parallel.ulysses` > 1 (2-D context parallelism, parallel/ulysses.py)
every layer is wrapped in all-to-alls over its Ulysses subgroup and the layer's strategy runs
over the outer group of cp/u ranks; with u = cp the outer group is one rank and the family's op
runs directly (pure Ulysses). With u = 1 the strategy runs over the cp group as it always has.
"""
from __future__ import annotations

import torch

from parallel.allgather import make_allgather_attend, make_softmax_allgather_attend
from parallel.lasp import make_lasp_attend
from parallel.ring import make_ring_attend
from parallel.sharding import LAYOUTS, SeqGroup, layout_placement
from parallel.ulysses import check_ulysses_heads, make_ulysses_attend

# strategy -> families it serves
SUPPORTS = {
    "ring": {"sdpa", "flash"},
    "allgather": {"sdpa", "flash", "moba", "nsa"},
    "lasp": {"linear", "lightning"},
    "ulysses": {"sdpa", "flash", "linear", "lightning", "moba", "nsa"},
}
AUTO = {"sdpa": "allgather", "flash": "allgather", "moba": "allgather", "nsa": "allgather",
        "linear": "lasp", "lightning": "lasp"}


def strategy_for(family: str, requested: str) -> str:
    name = AUTO.get(family) if requested == "auto" else requested
    if name not in SUPPORTS:
        raise ValueError(f"parallel.cp_strategy={requested!r} must be auto or one of "
                         f"{', '.join(SUPPORTS)}")
    if family not in SUPPORTS[name]:
        raise ValueError(f"parallel.cp_strategy={name} does not support attn family {family!r} "
                         f"(it serves {', '.join(sorted(SUPPORTS[name]))}); use auto")
    return name


def check_ulysses_degree(strategy: str, cp: int, u: int) -> None:
    if u < 1 or cp % u:
        raise ValueError(f"parallel.ulysses={u} must be >= 1 and divide parallel.cp={cp}")
    if strategy == "ulysses" and 1 < u < cp:
        raise ValueError(f"parallel.cp_strategy=ulysses is Ulysses over the whole cp group; with "
                         f"parallel.ulysses={u} < parallel.cp={cp} pick the outer strategy "
                         "(auto, allgather, lasp or ring) or set parallel.ulysses=1")


def _outer_attend(core, name: str, seq: SeqGroup):
    if name == "allgather":
        if core.family in ("sdpa", "flash"):      # gather overlapped with the own blocks
            return make_softmax_allgather_attend(seq, core.scale)
        return make_allgather_attend(core.attend, seq)
    if name == "ring":
        return make_ring_attend(seq, core.scale)
    return make_lasp_attend(core, seq)


def apply_context_parallel(model, mesh, strategy: str = "auto", layout: str = "zigzag") -> dict:
    """Wrap every layer's attention for the cp group; returns {layer index: strategy}
    ("ulysses+<outer>" under 1 < parallel.ulysses < parallel.cp)."""
    if layout not in LAYOUTS:
        raise ValueError(f"parallel.cp_layout={layout!r} must be one of {LAYOUTS}")
    u = getattr(mesh, "ulysses", 1)
    check_ulysses_degree(strategy, mesh.cp, u)
    base = layout_placement(mesh.cp, layout)
    chosen = {}
    for i, layer in enumerate(model.layers):
        _wrap_layer(layer.attn, i, mesh, strategy, u, base, chosen)
        layer.attn.attend = torch.compiler.disable(layer.attn.attend, recursive=True)
    return chosen


def _wrap_layer(core, i, mesh, strategy, u, base, chosen) -> None:
    """Swap one core's attend for its context-parallel version; record the strategy."""
    name = strategy_for(core.family, strategy)
    if name == "ulysses" or u == mesh.cp:  # pure Ulysses: the op runs on the whole sequence
        asks = (f"parallel.cp_strategy=ulysses with parallel.cp={mesh.cp}" if u == 1
                else f"parallel.ulysses={u}")
        check_ulysses_heads(core.n_heads, core.n_kv_heads, mesh.cp, asks, f"layer {i}")
        group = mesh.cp_group if u == 1 else mesh.uly_group  # the same group when u == cp
        core.attend = make_ulysses_attend(core.attend, group, mesh.cp, mesh.cp_rank, 0, base,
                                          core.n_heads)
        chosen[i] = "ulysses"
    elif u == 1:
        core.attend = _outer_attend(core, name, SeqGroup(base, mesh.cp_rank, mesh.cp_group))
        chosen[i] = name
    else:
        check_ulysses_heads(core.n_heads, core.n_kv_heads, u, f"parallel.ulysses={u}",
                            f"layer {i}")
        outer = SeqGroup(base.grouped(u), mesh.outer_rank, mesh.outer_group)
        core.attend = make_ulysses_attend(_outer_attend(core, name, outer), mesh.uly_group, u,
                                          mesh.uly_rank, mesh.outer_rank, base, core.n_heads)
        chosen[i] = f"ulysses+{name}"
