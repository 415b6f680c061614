"""Attention families and their registry: `attn=<name>` picks a core class from REGISTRY.

Families register lazily (importing a family may import Triton), so `import attn` stays cheap
and a missing optional dependency only matters for the family that needs it.
"""
from __future__ import annotations

import importlib

from attn.base import AttentionCore

# name -> "module:Class" of the layer core (see attn/base.py for the contract)
_CORES = {
    "sdpa": "attn.sdpa:SDPACore",
    "flash": "attn.flash:FlashCore",
    "linear": "attn.linear:LinearCore",
    "lightning": "attn.lightning:LightningCore",
    "nsa": "attn.nsa:NSACore",
    "moba": "attn.moba:MoBACore",
    "swa": "attn.swa:SWACore",
}


def available() -> list[str]:
    """Families whose package exists in this checkout."""
    out = []
    for name, target in _CORES.items():
        if importlib.util.find_spec(target.split(":")[0]) is not None:
            out.append(name)
    return out


def get_core(name: str) -> type[AttentionCore]:
    """Return the core class registered as `name`; unknown names list the valid ones."""
    names = available()
    if name not in names:
        raise ValueError(f"attn.name={name!r} is not a known attention family; "
                         f"valid: {', '.join(names)}")
    module, cls = _CORES[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["AttentionCore", "available", "get_core"]
