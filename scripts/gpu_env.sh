#!/usr/bin/env bash
# The card and the versions every GPU session records (the `env` stage of scripts/gpu_*.sh).
#   scripts/gpu_env.sh [--fla]     (--fla: also fla's version, for the fla baselines)
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if [ "${1:-}" = "--fla" ]; then
  python3 -c "import fla; print('fla', getattr(fla, '__version__', '?'))" 2>&1 | tail -1
fi
