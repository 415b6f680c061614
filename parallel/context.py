"""Context parallelism applied from outside the model: swap each attention core's `attend`.

`parallel.cp_strategy=auto` picks per layer family (so `model.layer_pattern` mixes work, every
layer keeping its own strategy over one token layout); a named strategy applies to every layer
and must support each family present.
"""
from __future__ import annotations

from parallel.allgather import make_allgather_attend
from parallel.lasp import make_lasp_attend
from parallel.ring import make_ring_attend
from parallel.sharding import LAYOUTS
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


def apply_context_parallel(model, mesh, strategy: str = "auto", layout: str = "zigzag") -> dict:
    """Wrap every layer's attention for the cp group; returns {layer index: strategy}."""
    if layout not in LAYOUTS:
        raise ValueError(f"parallel.cp_layout={layout!r} must be one of {LAYOUTS}")
    chosen = {}
    for i, layer in enumerate(model.layers):
        core = layer.attn
        name = strategy_for(core.family, strategy)
        if name == "allgather":
            core.attend = make_allgather_attend(core.attend, mesh, layout)
        elif name == "ring":
            core.attend = make_ring_attend(mesh, layout, core.scale)
        elif name == "lasp":
            core.attend = make_lasp_attend(core, mesh, layout)
        else:
            check_ulysses_heads(core.n_heads, core.n_kv_heads, mesh.cp, f"layer {i}")
            core.attend = make_ulysses_attend(core.attend, mesh, layout, core.n_heads)
        chosen[i] = name
    return chosen
