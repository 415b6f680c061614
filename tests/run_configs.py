"""Shared settings for tests that compose the real train config (imported by conftest and tests;
a module of its own, since `conftest` is not importable by name once sub-folders have one)."""
import os

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# a model and run small enough for a CPU test: 2 layers of width 32, rows of 64 tokens
SMALL_RUN = ["model=tiny", "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
             "trainer.seq_len=64", "trainer.global_batch=4", "trainer.micro_batch=2",
             "trainer.steps=6", "trainer.log_every=1", "trainer.val_every=3", "trainer.ckpt_every=3",
             "trainer.progress=false", "data.max_bytes=300000", "data.val_batches=2",
             "logger=jsonl", "logger.console=false", "optim.warmup_steps=2", "optim.lr=3e-3"]
