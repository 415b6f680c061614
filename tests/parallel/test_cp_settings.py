"""The cp settings' one validation site (CPSettings) and capability-based strategy choice:
every rule's message names the key, and no strategy is chosen by family name."""
from types import SimpleNamespace

import pytest
import torch

from attn import available, get_core
from attn.base import SoftmaxAttention
from parallel.context import STRATEGIES, CPSettings, apply_context_parallel, strategy_for
from parallel.mesh import Mesh


def settings(world=4, tokens=64, **cp):
    return CPSettings.from_config(cp, world=world, tokens_per_micro_batch=tokens)


def test_settings_rules_name_the_key():
    assert settings(size=4, strategy="ring", layout="contiguous") == CPSettings(4, "ring",
                                                                               "contiguous", 1)
    for cp, match in [
            (dict(size=3), r"cp.size=3 must be >= 1 and divide the number of processes \(4\)"),
            (dict(size=0), r"cp.size=0 must be >= 1"),
            (dict(size=2, strategy="rings"), r"cp.strategy='rings' must be auto or one of ring, "
                                             r"allgather, lasp, ulysses"),
            (dict(size=2, layout="diagonal"), r"cp.layout='diagonal' must be one of zigzag, "
                                              r"contiguous"),
            (dict(size=4, ulysses=3), r"cp.ulysses=3 must be >= 1 and divide cp.size=4"),
            (dict(size=4, strategy="ulysses", ulysses=2), r"cp.strategy=ulysses is Ulysses over "
                                                          r"the whole cp group; with cp.ulysses=2 "
                                                          r"< cp.size=4")]:
        with pytest.raises(ValueError, match=match):
            settings(**cp)
    with pytest.raises(ValueError, match=r"trainer.micro_batch × trainer.seq_len = 126 must be "
                                         r"divisible by 4 \(zigzag layout over cp.size=2\)"):
        settings(size=2, tokens=126)
    settings(size=2, tokens=126, layout="contiguous")      # 2 chunks divide 126
    settings(size=4, strategy="ulysses", ulysses=4)


class _Blocks(SoftmaxAttention):
    """A family unknown to parallel/: softmax blocks with lse (flash's primitives), no name."""
    family = "made_up"
    cp_capabilities = frozenset({"lse_blocks"})
    cp_default = "ring"

    def attend(self, q, k, v, cu_seqlens=None, *, q_offset=0, heads=None):
        raise AssertionError("ring runs the block primitives, not attend")

    def lse_blocks(self):
        from attn.flash import flash_bwd, flash_fwd
        return flash_fwd, flash_bwd


def test_strategies_follow_declared_capabilities():
    for name in available():
        core = get_core(name)(32, 4, 2 if name not in ("linear", "lightning") else 4)
        servable = {s for s, needs in STRATEGIES.items() if core.cp_capabilities & set(needs)}
        assert strategy_for(core, "auto") == core.cp_default in servable
        for s in STRATEGIES:
            if s in servable:
                assert strategy_for(core, s) == s
            else:
                with pytest.raises(ValueError, match=f"cp.strategy={s} needs a core declaring"):
                    strategy_for(core, s)
    sdpa = get_core("sdpa")(32, 4, 2)
    with pytest.raises(ValueError, match=r"cp.strategy=ring needs a core declaring lse_blocks; "
                                         r"attn=sdpa declares gather_kv, head_parallel "
                                         r"\(strategies: auto, allgather, ulysses\)"):
        strategy_for(sdpa, "ring")
    made_up = _Blocks(32, 4, 2)
    assert strategy_for(made_up, "auto") == "ring" and strategy_for(made_up, "allgather")
    with pytest.raises(ValueError, match="cp.strategy=ulysses needs a core declaring "
                                         "head_parallel; attn=made_up declares lse_blocks"):
        strategy_for(made_up, "ulysses")


def test_wrapping_checks_heads_and_capabilities_before_any_collective():
    mesh = Mesh(0, 4, 1, 4, 0, 0, ulysses=2)  # no process group is touched before the checks
    holder = SimpleNamespace(layers=[SimpleNamespace(attn=get_core("sdpa")(48, 6, 3))])
    with pytest.raises(ValueError, match=r"cp.ulysses=2 needs model.n_heads=6 and "
                                         r"model.n_kv_heads=3 divisible by the Ulysses degree 2 "
                                         r"\(layer 0\)"):
        apply_context_parallel(holder, mesh, settings(size=4, ulysses=2))
    holder = SimpleNamespace(layers=[SimpleNamespace(attn=get_core("linear")(32, 4, 4))])
    with pytest.raises(ValueError, match=r"cp.strategy=ring needs a core declaring lse_blocks; "
                                         r"attn=linear"):
        apply_context_parallel(holder, mesh, settings(size=4, strategy="ring"))
    holder = SimpleNamespace(layers=[SimpleNamespace(attn=_Blocks(32, 4, 2))])
    with pytest.raises(ValueError, match=r"cp.ulysses=2.*needs a core declaring head_parallel"):
        apply_context_parallel(holder, mesh, settings(size=4, ulysses=2))


def test_linear_cores_refuse_q_offset():
    core = get_core("linear")(32, 4, 4)
    q = torch.randn(1, 8, 4, 8)
    with pytest.raises(ValueError, match="q_offset=2: attn=linear takes no q_offset"):
        core.attend(q, q, q, q_offset=2)
