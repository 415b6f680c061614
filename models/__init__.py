"""Single-device model code (no torch.distributed import: see parallel/ for distribution)."""
from models.loss import IGNORE_INDEX, chunked_cross_entropy
from models.rope import Rotary
from models.transformer import ModelConfig, Transformer

__all__ = ["IGNORE_INDEX", "ModelConfig", "Rotary", "Transformer", "chunked_cross_entropy"]
