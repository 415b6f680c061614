"""Export a checkpoint's model as one consolidated safetensors file, in one process.

    python -m parallel.export outputs/<run>                      # its newest usable checkpoint
    python -m parallel.export outputs/<run>/checkpoints/step_00000300 --out model.safetensors
    python -m parallel.export <folder> --dtype bf16              # cast floating tensors

Reads either format (full: model.pt; sharded: the torch.distributed.checkpoint shards of every
rank, reassembled), verifies the folder first (sizes and digests), and writes the parameters
keyed by name, with the step and the run's model/attn config as metadata. Memory: the model's
parameters once (the optimizer state is never read).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from parallel import sharded_checkpoint as sharded
from parallel.checkpoint import CheckpointError, checkpoint_problem, step_folders

DTYPES = {"keep": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def find_checkpoint(path: Path) -> Path:
    """`path` if it is a step folder, else the newest usable step folder in the run folder
    `path` (or its checkpoints/)."""
    if (path / "meta.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        for folder in reversed(step_folders(root)):
            if checkpoint_problem(folder) is None:
                return folder
    raise CheckpointError(f"no usable checkpoint in {path} (expected a step_<8 digits> folder "
                          "with meta.json, or a run folder holding checkpoints/)")


def model_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(parameters by name, meta.json) of a verified checkpoint folder."""
    why = checkpoint_problem(folder)
    if why:
        raise CheckpointError(f"checkpoint {folder} is corrupt ({why}); not exporting it")
    meta = json.loads((folder / "meta.json").read_text())
    if meta.get("format", "full") == "sharded":
        return sharded.read_model(folder), meta
    return torch.load(folder / "model.pt", map_location="cpu", weights_only=True), meta


def export(path: Path, out: Path | None = None, dtype: str = "keep") -> Path:
    from safetensors.torch import save_file
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} must be one of {', '.join(DTYPES)}")
    folder = find_checkpoint(Path(path))
    state, meta = model_state(folder)
    cast = DTYPES[dtype]
    # own contiguous storage per tensor: safetensors refuses shared (tied) storage
    tensors = {k: (v.to(cast) if cast is not None and v.is_floating_point() else v)
               .detach().contiguous().clone() for k, v in state.items()}
    config = meta.get("config") or {}
    info = {"step": str(meta["step"]), "source": str(folder),
            "model": json.dumps(config.get("model")), "attn": json.dumps(config.get("attn"))}
    out = Path(out) if out else folder.with_suffix(".safetensors")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=info)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", type=Path, help="a step folder, or a run folder (newest checkpoint)")
    ap.add_argument("--out", type=Path, help="output file (default: <step folder>.safetensors beside it)")
    ap.add_argument("--dtype", default="keep", help=f"one of {', '.join(DTYPES)}")
    a = ap.parse_args(argv)
    try:
        out = export(a.path, a.out, a.dtype)
    except (CheckpointError, ValueError, OSError) as err:
        sys.exit(f"error: {err}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
