"""Context parallelism under gloo (2 and 4 CPU ranks): every family × strategy × layout, with
and without documents, equals the single-process result (fp32, relative error < 1e-5)."""
import pytest

from attn import available

import cp_cases

FAMILIES = [f for f in available()
            if f in ("sdpa", "flash", "linear", "lightning", "moba", "nsa", "swa")]
# several blocks per shard at T = 48
OPTIONS = {"moba": {"block_size": 4, "topk": 3}, "swa": {"window": 7},
           "nsa": {"cmp_block": 4, "cmp_stride": 2, "sel_block": 8, "topk": 3, "window": 6}}


def cases(seed):
    out = []
    for family in FAMILIES:
        for strategy in cp_cases.servable(family):
            for layout in ("zigzag", "contiguous"):
                for docs in (False, True):
                    out.append(("core", 1, family, strategy, layout, docs, seed, OPTIONS.get(family)))
    if "nsa" in FAMILIES:  # without the window branch (attn.window=0: two gates)
        for strategy in cp_cases.servable("nsa"):
            out.append(("core", 1, "nsa", strategy, "zigzag", True, seed,
                        {**OPTIONS["nsa"], "window": 0}))
    pattern = [f for f in ("lightning", "sdpa") if f in FAMILIES] + ["sdpa"]
    for layout in ("zigzag", "contiguous"):
        out.append(("model", 1, pattern, layout, seed + 1))
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_context_parallel_matches_single_process(world, tmp_path, fresh_seed):
    cp_cases.run_workers(world, cases(fresh_seed), tmp_path)


def test_triton_kernels_under_context_parallel(monkeypatch, tmp_path, fresh_seed):
    """The kernels' own CP paths (flash's overlapped allgather, moba's and nsa's q_offset against
    gathered keys, lightning's state in/out under lasp) through the Triton interpreter, zigzag with
    documents: CP equals the single-process run of the same kernels (2 ranks)."""
    monkeypatch.setenv("ATTN_IMPL", "triton")          # inherited by the spawned ranks
    kernels = {"flash": ("allgather", {}), "lightning": ("lasp", {}),
               "moba": ("allgather", OPTIONS["moba"]), "nsa": ("allgather", OPTIONS["nsa"])}
    run = [("core", 1, f, s, "zigzag", True, fresh_seed, {**opts, "head_dim": 16})
           for f, (s, opts) in kernels.items() if f in FAMILIES]
    cp_cases.run_workers(2, run, tmp_path)
