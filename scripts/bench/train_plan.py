"""What bench_train.py runs: its argument parsers (sizes, flags, families) and the plan of its
sweep and longest-context runs (batch shape per T, run specs, run names, data size), apart from
running them (bench_train.py) and reporting them (train_report.py)."""
from __future__ import annotations

import re
from pathlib import Path

from harness import ROOT
from train_report import HF

HYBRID_PATTERN = ["lightning"] * 7 + ["flash"]
# family -> train.py overrides selecting it
FAMILIES = {
    "sdpa": ["attn=sdpa"],
    "flash": ["attn=flash"],
    "linear": ["attn=linear"],
    "lightning": ["attn=lightning"],
    "moba": ["attn=moba"],
    "nsa": ["attn=nsa"],
    "hybrid": ["attn=lightning", "model.layer_pattern=[" + ",".join(HYBRID_PATTERN) + "]"],
}
DEFAULT_BYTES = 4_000_000  # configs/data/builtin.yaml's data.max_bytes, if the yaml can't be read


# ----------------------------------------------------------------------------- arguments
def parse_size(text: str, flag: str) -> int:
    """'2k' -> 2048, '1M' -> 1048576, '4096' -> 4096 (binary multiples, as sequence lengths)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not m or int(m.group(1)) <= 0:
        raise SystemExit(f"error: {flag}: {text!r} is not a positive size (e.g. 8192, 8k, 1M)")
    return int(m.group(1)) * {"": 1, "k": 1024, "m": 1 << 20}[m.group(2).lower()]


def parse_sizes(text: str, flag: str) -> list[int]:
    return [parse_size(t, flag) for t in text.split(",") if t.strip()]


def parse_bools(text: str, flag: str) -> list[bool]:
    table = {"true": True, "false": False, "1": True, "0": False, "on": True, "off": False}
    out = []
    for t in text.split(","):
        if t.strip().lower() not in table:
            raise SystemExit(f"error: {flag}: {t!r} must be true or false "
                             "(a comma list: false,true)")
        out.append(table[t.strip().lower()])
    return list(dict.fromkeys(out))


def parse_families(text: str, flag: str, allow_hf: bool = False,
                   with_start: bool = False) -> list[tuple[str, int | None]]:
    valid = list(FAMILIES) + ([HF] if allow_hf else [])
    out = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, start = item.partition(":")
        if name not in valid:
            raise SystemExit(f"error: {flag}: unknown family {name!r}; valid: {', '.join(valid)}")
        if start and not with_start:
            raise SystemExit(f"error: {flag}: {item!r}: a start T (family:T) only applies to "
                             "--longest")
        out.append((name, parse_size(start, flag) if start else None))
    return out


def read_yaml(path: Path) -> dict:
    try:
        import yaml
    except ImportError:  # hydra brings PyYAML; without it fall back to the documented defaults
        return {}
    with open(path) as f:
        return yaml.safe_load(f) or {}


# ----------------------------------------------------------------------------- planning
def batch_shape(T: int, tokens: int, micro_tokens: int) -> tuple[int, int]:
    """(global_batch, micro_batch) for --tokens per step at T, micro_batch within the cap."""
    global_batch = max(1, tokens // T)
    cap = max(1, micro_tokens // T)
    micro = max(d for d in range(1, min(global_batch, cap) + 1) if global_batch % d == 0)
    return global_batch, micro


def model_max_seq(model: str) -> int:
    return int(read_yaml(ROOT / "configs" / "model" / f"{model}.yaml").get("max_seq_len", 0))


def data_max_bytes() -> int:
    cfg = read_yaml(ROOT / "configs" / "data" / "builtin.yaml")
    return int(cfg.get("max_bytes", DEFAULT_BYTES))


def plan_sweep(a) -> list[dict]:
    """Run specs, T-major (a cut-off budget leaves whole columns), the HF anchor first per T."""
    specs = []
    for model in a.models:
        for T in a.seqlens:
            G, M = batch_shape(T, a.tokens, a.micro_tokens)
            ac = T >= a.ac_from
            steps = a.steps_long if ac else a.steps
            base = dict(kind="sweep", model=model, T=T, global_batch=G, micro_batch=M,
                        grad_accum=G // M, ac=ac, steps=steps, log_every=a.log_every,
                        warmup=a.warmup, tokens_per_step=G * T)
            if a.hf:
                for c in a.hf_compile:
                    specs.append(dict(base, family=HF, impl="hf", compile=c, doc_mask=False))
            for fam, _ in a.families:
                for c in a.compile:
                    for d in a.doc_mask:
                        specs.append(dict(base, family=fam, impl="ours", compile=c, doc_mask=d))
    return specs


def longest_spec(a, model: str, family: str, T: int) -> dict:
    return dict(kind="longest", model=model, family=family, impl="hf" if family == HF else "ours",
                compile=a.longest_compile, doc_mask=False if family == HF else a.doc_mask[0],
                T=T, global_batch=1, micro_batch=1, grad_accum=1, ac=True,
                steps=a.longest_steps, log_every=1, warmup=1, tokens_per_step=T)


def run_name(spec: dict) -> str:
    return (f"{spec['kind']}-{spec['model']}-{spec['family']}-T{spec['T']}"
            f"-c{int(spec['compile'])}-d{int(spec['doc_mask'])}")


def spec_max_bytes(a, spec: dict) -> int | None:
    """data.max_bytes: --max-bytes, or for longest runs enough text for about three rows (the
    stdlib holds ~10 MB: T >= 4M then gets fewer rows, and a T with none is a data limit)."""
    if a.max_bytes:
        return a.max_bytes
    if spec["kind"] == "longest" and 3 * spec["T"] > data_max_bytes():
        return 3 * spec["T"]
    return None
